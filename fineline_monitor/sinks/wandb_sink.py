"""Weights & Biases sink: the curves next to the loss, where pretraining teams already look.

- Tokens and steps are both x axes: every row carries `train/step` and the `train/tokens`
  the indicators log; `define_metric` makes `train/tokens` the default x axis of every
  chart (capability curves are compared across runs on tokens, not steps).
- Probe metrics are grouped by capability: `probe/<task>/<metric>` is logged as
  `probe_<capability>/<task>/<metric>`, so W&B puts each capability in its own section;
  expected values and bands go next to their curve (`<curve>_expected`, `_low`, `_high`).
- The monitor config and run metadata are the run's config.
- Offline mode works with no account (WANDB_MODE=offline, the default in SinkConfig).
- Warnings and criticals call `run.alert` when online. Offline runs cannot alert, so those
  alerts are counted (`alerts_not_sent`) and paging never depends on W&B (use the
  Prometheus rules or the webhook sink for that).
- If the training script already has a W&B run (`wandb.run`), the monitor logs into it and
  does not finish it.

All wandb calls run on one background thread (BackgroundSink): `wandb.init` can take
seconds and the network can stall, neither may delay a training step. wandb is imported
on that thread, at first use.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional

from fineline_monitor import metric_names as names
from fineline_monitor.core.types import Alert, ProbeRound
from fineline_monitor.sinks.background import BackgroundSink
from fineline_monitor.sinks.base import Sink

log = logging.getLogger("fineline_monitor.sinks")

PHASE_INDEX = {"warmup": 0, "stable": 1, "decay": 2, "anneal": 3, "rewarm": 4}
X_AXES = (names.TOKENS, names.STEP)


def wandb_key(name: str, task_capability: Dict[str, str]) -> str:
    """The W&B key of a monitor metric name (probe metrics grouped by capability)."""
    probe = names.split_probe_key(name)
    if probe is not None:
        task, metric = probe
        return f"probe_{task_capability.get(task) or 'other'}/{task}/{metric}"
    return name


class _WandbWriter(Sink):
    """Does the wandb calls; runs on the BackgroundSink's thread only."""

    name = "wandb"

    def __init__(self, project: str, mode: str, out_dir: Path, entity: Optional[str] = None):
        self.project = project
        self.mode = mode
        self.out_dir = Path(out_dir)
        self.entity = entity
        self.run_obj: Any = None
        self._own_run = False
        self._disabled = False
        self._last_step = -1
        self._task_cap: Dict[str, str] = {}
        self._probe_logged_step: Optional[int] = None
        self.alerts_sent = 0
        self.alerts_not_sent = 0
        self._alert_counts: Dict[str, int] = {}

    # ---- run lifecycle -----------------------------------------------------------------
    def start_run(self, run: str, config: Dict[str, Any], meta: Dict[str, Any]) -> None:
        import wandb

        try:
            if wandb.run is not None:  # the training script's own run: log into it
                self.run_obj = wandb.run
                self.run_obj.config.update(
                    {"fineline": config, "fineline_meta": meta}, allow_val_change=True
                )
            else:
                wandb_dir = os.environ.get("WANDB_DIR") or str(self.out_dir)
                Path(wandb_dir).mkdir(parents=True, exist_ok=True)
                self.run_obj = wandb.init(
                    project=self.project,
                    entity=self.entity,
                    name=run,
                    id=_safe_id(run),
                    resume="allow",
                    dir=wandb_dir,
                    mode=os.environ.get("WANDB_MODE") or self.mode,
                    config={"fineline": config, "fineline_meta": meta},
                    settings=wandb.Settings(console="off", silent=True),
                )
                self._own_run = True
        except Exception as e:  # noqa: BLE001 - e.g. online with no API key: disable, say so once
            self._disabled = True
            log.error("fineline: W&B sink disabled, wandb.init failed: %s: %s", type(e).__name__, e)
            return
        r = self.run_obj
        for axis in X_AXES:
            r.define_metric(axis, hidden=False)
        # Every other metric plots against tokens by default; steps stay available.
        r.define_metric("*", step_metric=names.TOKENS)
        for cap_key in (names.capability_key("*"), "probe_*"):
            r.define_metric(cap_key, step_metric=names.TOKENS, summary="last")
        r.define_metric(names.LOSS, step_metric=names.TOKENS, summary="min")

    @property
    def offline(self) -> bool:
        r = self.run_obj
        return (
            r is None
            or bool(getattr(r.settings, "_offline", False))
            or getattr(r.settings, "mode", "") in ("offline", "dryrun", "disabled")
        )

    def _log(self, step: int, tokens: Optional[int], row: Dict[str, Any]) -> None:
        if self._disabled or self.run_obj is None or not row:
            return
        row = {k: v for k, v in row.items() if v is not None}
        row[names.STEP] = int(step)
        if tokens is not None:
            row[names.TOKENS] = int(tokens)
        if step >= self._last_step:
            self.run_obj.log(row, step=int(step))
            self._last_step = int(step)
        else:  # a resumed run re-logging old steps: W&B steps only go forward
            self.run_obj.log(row)

    # ---- Sink interface ------------------------------------------------------------------
    def log_metrics(self, step: int, tokens: Optional[int], metrics: Dict[str, float]) -> None:
        row: Dict[str, Any] = {}
        for name, value in metrics.items():
            if names.split_probe_key(name) is not None and self._probe_logged_step == step:
                continue  # already logged with capability and stderr by log_probe
            row[wandb_key(name, self._task_cap)] = _num(value)
        self._log(step, tokens, row)

    def log_probe(self, round: ProbeRound) -> None:
        row: Dict[str, Any] = {}
        for task, r in round.tasks.items():
            self._task_cap[task] = r.capability
            for metric, value in r.metrics.items():
                key = wandb_key(names.probe_key(task, metric), self._task_cap)
                row[key] = _num(value)
                if metric in r.stderr:
                    row[key + "_stderr"] = _num(r.stderr[metric])
        for cap, value in round.capability_scores.items():
            row[names.capability_key(cap)] = _num(value)
        row[names.PROBE_SECONDS] = round.seconds
        self._probe_logged_step = int(round.step)
        self._log(int(round.step), round.tokens, row)

    def log_expectations(self, step: int, rows: list) -> None:
        out: Dict[str, Any] = {}
        for r in rows:
            key = wandb_key(str(r["name"]), self._task_cap)
            for suffix, field in (("_expected", "expected"), ("_low", "low"), ("_high", "high")):
                if r.get(field) is not None:
                    out[key + suffix] = _num(r[field])
        self._log(step, None, out)

    def log_phase(
        self, step: int, tokens: Optional[int], phase: str, previous: Optional[str]
    ) -> None:
        self._log(step, tokens, {names.PHASE_INDEX: PHASE_INDEX.get(phase, -1)})
        if not self._disabled and self.run_obj is not None:
            self.run_obj.summary["phase"] = phase

    def log_alert(self, alert: Alert) -> None:
        if self._disabled or self.run_obj is None:
            return
        self._alert_counts[alert.severity] = self._alert_counts.get(alert.severity, 0) + 1
        self._log(
            alert.step,
            alert.tokens,
            {names.alert_count_key(alert.severity): self._alert_counts[alert.severity]},
        )
        self.run_obj.summary["last_alert"] = alert.to_json()
        if alert.severity not in ("warning", "critical"):
            return
        if self.offline:
            self.alerts_not_sent += (
                1  # offline W&B cannot alert; paging goes through Prometheus/webhook
            )
            return
        import wandb

        level = wandb.AlertLevel.ERROR if alert.severity == "critical" else wandb.AlertLevel.WARN
        self.run_obj.alert(
            title=f"[{alert.severity}] {alert.rule} ({alert.capability or 'run'})",
            text=alert.message,
            level=level,
            wait_duration=60,
        )
        self.alerts_sent += 1

    def flush(self) -> None:
        pass  # wandb delivers on its own; nothing buffered here

    def close(self) -> None:
        if self.run_obj is not None and self._own_run and not self._disabled:
            self.run_obj.finish()
        self.run_obj = None


def _num(x: Any) -> Any:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if not math.isnan(v) else None


def _safe_id(run: str) -> str:
    """W&B run ids allow letters, digits, - and _; a stable id makes a restarted run resume."""
    import re

    return re.sub(r"[^A-Za-z0-9_-]", "-", run)[:64] or "fineline"


class WandbSink(BackgroundSink):
    """The W&B sink: `_WandbWriter` behind a bounded background queue."""

    name = "wandb"

    def __init__(
        self,
        project: str = "fineline",
        mode: str = "offline",
        out_dir: Path = Path("."),
        entity: Optional[str] = None,
        queue_size: int = 10000,
        close_timeout_s: float = 60.0,
    ):
        # wandb retries network calls itself; ours would only duplicate rows.
        super().__init__(
            _WandbWriter(project, mode, out_dir, entity),
            queue_size=queue_size,
            max_retries=0,
            close_timeout_s=close_timeout_s,
        )

    @classmethod
    def from_config(cls, config: Any, out_dir: Path, run: str) -> "WandbSink":
        import importlib.util

        if (
            importlib.util.find_spec("wandb") is None
        ):  # fail at attach time, not on the worker thread
            raise ImportError("No module named 'wandb'")
        sc = config.sinks
        return cls(
            project=sc.wandb_project,
            mode=sc.wandb_mode,
            out_dir=Path(out_dir),
            queue_size=sc.queue_size,
        )

    @property
    def writer(self) -> _WandbWriter:
        return self.inner  # type: ignore[return-value]
