"""Prometheus exporter: the monitor's state as `fineline_*` metrics, for alert rules and Grafana.

Three ways out, one collector:
- `http`: a /metrics endpoint on the logging rank (127.0.0.1 unless told otherwise; port 0
  picks a free one, read it back from `sink.port`);
- `textfile`: a `.prom` file for node_exporter's textfile collector, replaced atomically;
- `pushgateway`: pushed to a Pushgateway whose URL comes from an environment variable.

Why a custom collector and not prometheus_client Gauges: the sink only records plain numbers
under a lock on the training thread (a dict assignment per metric); the exposition is built
from a snapshot at scrape time, so the training step never pays for formatting, and the
registry is passed explicitly (no global state; tests use a fresh CollectorRegistry).
prometheus_client is imported inside functions only (never at `import fineline_monitor`).

The name mapping from the monitor's metric names is `prom_name()`; the README (Observability)
lists it. Every series carries `run`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from fineline_monitor.core.types import Alert, ProbeRound
from fineline_monitor.sinks.background import BackgroundWorker, workers
from fineline_monitor.sinks.base import Sink

log = logging.getLogger("fineline_monitor.sinks")

PHASES = ("warmup", "stable", "decay", "anneal", "rewarm", "unknown")

# monitor metric name -> (Prometheus family, help). Gauges unless listed in COUNTERS.
SIMPLE: Dict[str, Tuple[str, str]] = {
    "train/loss": ("fineline_train_loss", "Training loss at the last collection step."),
    "train/loss_z": ("fineline_train_loss_z", "Loss z-score against its rolling window."),
    "train/lr": ("fineline_train_lr", "Learning rate."),
    "train/tokens": ("fineline_train_tokens", "Training tokens seen so far."),
    "train/tokens_per_s": ("fineline_train_tokens_per_second", "Training throughput in tokens per second."),
    "optim/grad_norm": ("fineline_optim_grad_norm", "Global gradient norm."),
    "optim/param_norm": ("fineline_optim_param_norm", "Global parameter norm."),
    "optim/nonfinite_loss": ("fineline_optim_nonfinite_loss", "Non-finite losses in the last collection window."),
    "optim/nonfinite_grad": ("fineline_optim_nonfinite_grad", "Non-finite gradients in the last collection window."),
    "optim/loss_scale": ("fineline_optim_loss_scale", "Mixed-precision loss scale."),
    "optim/skipped_steps": ("fineline_optim_skipped_steps", "Optimizer steps skipped for overflow since the last collection."),
    "optim/grad_rms_over_eps_min": ("fineline_optim_grad_rms_over_eps_min",
                                    "Smallest gradient RMS / Adam eps over parameter groups."),
    "optim/hessian_trace": ("fineline_optim_hessian_trace", "Hutchinson estimate of the Hessian trace."),
    "stability/output_logit_max": ("fineline_stability_output_logit_max", "Largest output logit in the probe round."),
    "stability/output_logsumexp_mean": ("fineline_stability_output_logsumexp_mean",
                                        "Mean output log-partition (logit divergence indicator)."),
    "monitor/probe_seconds": ("fineline_probe_round_seconds", "Wall time of the last probe round."),
    "monitor/probe_tokens_per_s": ("fineline_probe_tokens_per_second", "Tokens per second scored by the last probe round."),
    "monitor/overhead": ("fineline_monitor_overhead_ratio",
                         "Time inside the monitor over the loop's own training time, since attach."),
}

# prefix -> (family, per-item label, help). `prefix` alone is exported with label value "all".
PER_ITEM: Dict[str, Tuple[str, str, str]] = {
    "optim/update_ratio": ("fineline_optim_update_ratio", "group", "Update/parameter norm ratio."),
    "optim/grad_rms": ("fineline_optim_grad_rms", "group", "Gradient RMS per parameter group."),
    "stability/attn_logit_max": ("fineline_stability_attn_logit_max", "layer", "Max attention logit."),
    "stability/act_rms": ("fineline_stability_act_rms", "layer", "Activation RMS per layer."),
}

_BAD = re.compile(r"[^a-zA-Z0-9_]")


def prom_name(name: str) -> Tuple[str, Dict[str, str]]:
    """Map a monitor metric name to (family, extra labels). Probe/capability/error names
    are handled by the sink itself; anything unknown becomes `fineline_<sanitized>`."""
    if name in SIMPLE:
        return SIMPLE[name][0], {}
    for prefix, (family, label, _) in PER_ITEM.items():
        if name == prefix:
            return family, {label: "all"}
        if name.startswith(prefix + "/"):
            return family, {label: name[len(prefix) + 1:]}
    return "fineline_" + _BAD.sub("_", name).strip("_"), {}


def _finite(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v  # NaN/inf are valid sample values in the exposition format, and informative


class _State:
    """What the collector reads; written under `lock` by the sink's methods."""

    def __init__(self, run: str, alert_hold_s: float):
        self.lock = threading.Lock()
        self.run = run
        self.alert_hold_s = alert_hold_s
        self.gauges: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float] = {}
        self.helps: Dict[str, str] = {}
        self.task_capability: Dict[str, str] = {}
        self.probe: Dict[Tuple[str, str, str], Tuple[float, Optional[float]]] = {}  # (cap, task, metric)
        self.probe_docs: Dict[Tuple[str, str], int] = {}
        self.capability: Dict[str, float] = {}
        self.expected: Dict[str, Tuple[Optional[float], Optional[float], Optional[float]]] = {}
        self.alerts: Dict[str, Dict[str, Any]] = {}  # dedup_key -> labels + last fired time
        self.alert_counts: Dict[Tuple[str, str], int] = {}
        self.phase = "unknown"
        self.phase_start_step: Optional[int] = None
        self.last_step: Optional[int] = None
        self.last_step_ts: Optional[float] = None
        self.last_probe_step: Optional[int] = None
        self.last_probe_ts: Optional[float] = None
        self.probe_rounds = 0
        self.probe_every: Optional[int] = None
        self.internal_errors = 0.0
        self.part_errors: Dict[str, float] = {}
        self.probe_failures = 0.0
        self.start_ts = time.time()
        self.finished = False


MAX_ALERT_SERIES = 1000


class _Collector:
    """Builds the exposition from a snapshot of `_State` at scrape time."""

    def __init__(self, state: _State, own_sink: str):
        self.state = state
        self.own_sink = own_sink

    def collect(self):  # noqa: C901 - one flat list of families reads best here
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.state
        now = time.time()
        with s.lock:
            run = s.run
            gauges = dict(s.gauges)
            helps = dict(s.helps)
            probe = dict(s.probe)
            probe_docs = dict(s.probe_docs)
            capability = dict(s.capability)
            expected = dict(s.expected)
            alerts = [dict(a) for a in s.alerts.values()]
            alert_counts = dict(s.alert_counts)
            snap = {k: getattr(s, k) for k in ("phase", "phase_start_step", "last_step", "last_step_ts",
                                               "last_probe_step", "last_probe_ts", "probe_rounds", "probe_every",
                                               "internal_errors", "probe_failures", "start_ts", "finished",
                                               "alert_hold_s")}
            part_errors = dict(s.part_errors)

        def g(name: str, doc: str, labels: List[str]) -> Any:
            return GaugeMetricFamily(name, doc, labels=["run"] + labels)

        # ---- run liveness -------------------------------------------------------------
        fam = g("fineline_run_start_timestamp_seconds", "Unix time the monitor attached.", [])
        fam.add_metric([run], snap["start_ts"])
        yield fam
        fam = g("fineline_run_finished", "1 once the monitor was closed (the run ended).", [])
        fam.add_metric([run], 1.0 if snap["finished"] else 0.0)
        yield fam
        if snap["last_step"] is not None:
            fam = g("fineline_last_step", "Last optimizer step the monitor saw.", [])
            fam.add_metric([run], float(snap["last_step"]))
            yield fam
            fam = g("fineline_last_step_timestamp_seconds", "Unix time of the last step the monitor saw.", [])
            fam.add_metric([run], snap["last_step_ts"])
            yield fam

        # ---- indicators (gauges keyed by family) -------------------------------------------
        families: Dict[str, Any] = {}
        for (family, labels), value in sorted(gauges.items()):
            label_names = [k for k, _ in labels]
            fam = families.get(family)
            if fam is None:
                fam = families[family] = g(family, helps.get(family, "FineLine monitor metric."), label_names)
            fam.add_metric([run] + [v for _, v in labels], value)
        # Known families are declared even before their first sample (e.g. the Hessian trace is
        # off by default), so dashboards and rules refer to names the exposition always has.
        for family, doc in [v for v in SIMPLE.values()] + [(f, d) for f, _, d in PER_ITEM.values()]:
            if family not in families:
                families[family] = g(family, doc, [])
        yield from families.values()

        # ---- probes ---------------------------------------------------------------------
        fam = g("fineline_probe_value", "Probe metric per task (acc, acc_norm, bpb, ...).",
                ["capability", "task", "metric"])
        fam_err = g("fineline_probe_stderr", "Standard error of the probe metric.", ["capability", "task", "metric"])
        for (cap, task, metric), (value, stderr) in sorted(probe.items()):
            fam.add_metric([run, cap, task, metric], value)
            if stderr is not None:
                fam_err.add_metric([run, cap, task, metric], stderr)
        yield fam
        yield fam_err
        fam = g("fineline_probe_docs", "Documents scored per task in each probe round.", ["capability", "task"])
        for (cap, task), n in sorted(probe_docs.items()):
            fam.add_metric([run, cap, task], float(n))
        yield fam
        fam = g("fineline_capability_score", "Capability score (chance-normalised mean over its tasks).",
                ["capability"])
        for cap, value in sorted(capability.items()):
            fam.add_metric([run, cap], value)
        yield fam
        fam = CounterMetricFamily("fineline_probe_rounds", "Probe rounds completed.", labels=["run"])
        fam.add_metric([run], float(snap["probe_rounds"]))
        yield fam
        if snap["last_probe_step"] is not None:
            fam = g("fineline_probe_last_step", "Step of the last completed probe round.", [])
            fam.add_metric([run], float(snap["last_probe_step"]))
            yield fam
            fam = g("fineline_last_probe_timestamp_seconds", "Unix time of the last completed probe round.", [])
            fam.add_metric([run], snap["last_probe_ts"])
            yield fam
        fam = g("fineline_probe_every_steps", "Configured probe cadence in steps (0: by tokens or off).", [])
        fam.add_metric([run], float(snap["probe_every"] or 0))
        yield fam

        # ---- expectations -----------------------------------------------------------------
        fams = {k: g(f"fineline_expected_{k}", doc, ["name", "capability", "task", "metric"]) for k, doc in (
            ("value", "Expected value of a curve for the current phase."),
            ("low", "Lower edge of the expected band."),
            ("high", "Upper edge of the expected band."))}
        for name, (exp, low, high) in sorted(expected.items()):
            labels = [run, name] + list(self._curve_labels(name))
            for k, v in (("value", exp), ("low", low), ("high", high)):
                if v is not None:
                    fams[k].add_metric(labels, v)
        yield from fams.values()

        # ---- phase ------------------------------------------------------------------------
        fam = g("fineline_phase", "Current training phase (1 for the current one, 0 otherwise).", ["phase"])
        for p in PHASES if snap["phase"] in PHASES else PHASES + (snap["phase"],):
            fam.add_metric([run, p], 1.0 if p == snap["phase"] else 0.0)
        yield fam
        if snap["phase_start_step"] is not None:
            fam = g("fineline_phase_start_step", "Step at which the current phase began.", [])
            fam.add_metric([run], float(snap["phase_start_step"]))
            yield fam

        # ---- alerts -----------------------------------------------------------------------
        fam = g("fineline_alert_active",
                f"1 while a monitor alert is active (fired within the last {snap['alert_hold_s']:g}s).",
                ["rule", "severity", "capability", "task", "metric"])
        for a in sorted(alerts, key=lambda a: (a["rule"], a["severity"], a["capability"], a["task"], a["metric"])):
            active = now - a["ts"] < snap["alert_hold_s"]
            fam.add_metric([run, a["rule"], a["severity"], a["capability"], a["task"], a["metric"]],
                           1.0 if active else 0.0)
        yield fam
        fam = CounterMetricFamily("fineline_alerts", "Monitor alerts fired.", labels=["run", "rule", "severity"])
        for (rule, sev), n in sorted(alert_counts.items()):
            fam.add_metric([run, rule, sev], float(n))
        yield fam

        # ---- the monitor's own health --------------------------------------------------------
        fam = CounterMetricFamily("fineline_internal_errors", "Errors isolated inside the monitor (training went on).",
                                  labels=["run"])
        fam.add_metric([run], snap["internal_errors"])
        yield fam
        fam = CounterMetricFamily("fineline_component_errors", "Isolated monitor errors per component.",
                                  labels=["run", "part"])
        for part, n in sorted(part_errors.items()):
            fam.add_metric([run, part], n)
        yield fam
        fam = CounterMetricFamily("fineline_probe_failures", "Probe rounds that failed.", labels=["run"])
        fam.add_metric([run], snap["probe_failures"])
        yield fam
        stats = {w.name: w.stats() for w in workers()}
        stats.setdefault(self.own_sink, {"dropped": 0, "failed": 0, "queued": 0})
        drop = CounterMetricFamily("fineline_sink_dropped", "Items a sink dropped (queue full or closed).",
                                   labels=["run", "sink"])
        fail = CounterMetricFamily("fineline_sink_failed", "Items a sink gave up on after retries.",
                                   labels=["run", "sink"])
        depth = g("fineline_sink_queue_depth", "Items waiting in a sink's background queue.", ["sink"])
        for name, st in sorted(stats.items()):
            drop.add_metric([run, name], float(st["dropped"]))
            fail.add_metric([run, name], float(st["failed"]))
            depth.add_metric([run, name], float(st["queued"]))
        yield drop
        yield fail
        yield depth

    def _curve_labels(self, name: str) -> Tuple[str, str, str]:
        """(capability, task, metric) of an expectation row's curve name."""
        parts = name.split("/")
        if parts[0] == "capability" and len(parts) == 2:
            return parts[1], "", "score"
        if parts[0] == "probe" and len(parts) == 3:
            return self.state.task_capability.get(parts[1], ""), parts[1], parts[2]
        return "", "", ""


class PrometheusSink(Sink):
    """Records the monitor's state for Prometheus. See the module docstring for the modes."""

    name = "prometheus"

    def __init__(self, run: str, *, mode: str = "http", registry: Any = None, host: str = "127.0.0.1",
                 port: int = 0, textfile: Optional[Path] = None, pushgateway_url: Optional[str] = None,
                 pushgateway_url_env: Optional[str] = None, alert_hold_s: float = 1800.0,
                 write_interval_s: float = 2.0, queue_size: int = 1):
        from prometheus_client import CollectorRegistry

        if mode not in ("http", "textfile", "pushgateway"):
            raise ValueError(f"prometheus mode {mode!r}: allowed http, textfile, pushgateway")
        self.mode = mode
        self.state = _State(run, alert_hold_s)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.collector = _Collector(self.state, self.name)
        self.registry.register(self.collector)
        self.host = host
        self.port: Optional[int] = None
        self.textfile = Path(textfile) if textfile is not None else None
        # from_config passes the variable's name, not its value: the URL (which may carry
        # credentials) is read from the environment at each push and never kept on the sink
        self._push_url = pushgateway_url
        self._push_url_env = pushgateway_url_env
        self.write_interval_s = write_interval_s
        self._last_write = 0.0
        self._server = None
        self._worker: Optional[BackgroundWorker] = None
        self._closed = False
        if mode == "http":
            from prometheus_client import start_http_server

            self._server, self._server_thread = start_http_server(int(port), addr=host, registry=self.registry)
            self.port = int(self._server.server_port)
            log.info("fineline: Prometheus exporter on http://%s:%d/metrics", host, self.port)
        elif mode == "textfile":
            if self.textfile is None:
                raise ValueError("prometheus textfile mode needs a textfile path")
            self.textfile.parent.mkdir(parents=True, exist_ok=True)
            # Queue of one: a pending write already exports the newest state, so coalesce.
            self._worker = BackgroundWorker("prometheus", lambda _: self._write_textfile(), queue_size=queue_size,
                                            max_retries=1, backoff_s=0.2)
        else:
            if not self._url():
                raise ValueError("prometheus pushgateway mode needs a push-gateway URL")
            self._worker = BackgroundWorker("prometheus", lambda _: self._push(), queue_size=queue_size,
                                            max_retries=2, backoff_s=1.0, redact=self._redact)

    @classmethod
    def from_config(cls, config: Any, out_dir: Path, run: str) -> "PrometheusSink":
        sc = config.sinks
        kw: Dict[str, Any] = {"mode": sc.prometheus_mode, "host": sc.prometheus_host, "port": sc.prometheus_port,
                              "alert_hold_s": getattr(sc, "prometheus_alert_hold_s", 1800.0)}
        if sc.prometheus_mode == "textfile":
            kw["textfile"] = Path(sc.prometheus_textfile) if sc.prometheus_textfile else Path(out_dir) / "metrics.prom"
        elif sc.prometheus_mode == "pushgateway":
            url = os.environ.get(sc.pushgateway_url_env, "").strip()
            if not url:
                from fineline_monitor.core.config import ConfigError

                raise ConfigError(f"sinks.prometheus_mode is `pushgateway` but the environment variable "
                                  f"`{sc.pushgateway_url_env}` (sinks.pushgateway_url_env) is empty; set it to the "
                                  f"push-gateway URL, e.g. http://pushgateway:9091")
            kw["pushgateway_url_env"] = sc.pushgateway_url_env
        return cls(run, **kw)

    # ---- delivery ------------------------------------------------------------------------
    def _write_textfile(self) -> None:
        from prometheus_client import write_to_textfile

        write_to_textfile(str(self.textfile), self.registry)  # tmp file + os.replace: atomic

    def _push(self) -> None:
        from prometheus_client import push_to_gateway

        push_to_gateway(self._url(), job="fineline", registry=self.registry,
                        grouping_key={"run": self.state.run}, timeout=5.0)

    def _url(self) -> str:
        if self._push_url_env:
            return os.environ.get(self._push_url_env, "").strip()
        return self._push_url or ""

    def _redact(self, text: str) -> str:
        url = self._url()
        return text.replace(url, "<pushgateway-url>") if url else text

    def _export_soon(self, force: bool = False) -> None:
        if self._worker is None:
            return
        now = time.monotonic()
        if force or now - self._last_write >= self.write_interval_s:
            self._last_write = now
            if self._worker._q.full():
                return  # a write not yet started will export this newest state too: coalesced, not dropped
            self._worker.submit(None)

    # ---- Sink interface -----------------------------------------------------------------------
    def start_run(self, run: str, config: Dict[str, Any], meta: Dict[str, Any]) -> None:
        with self.state.lock:
            self.state.run = run
            every = config.get("probe_every") if isinstance(config, dict) else None
            self.state.probe_every = int(every) if isinstance(every, (int, float)) else None
        self._export_soon(force=True)

    def log_metrics(self, step: int, tokens: Optional[int], metrics: Dict[str, float]) -> None:
        s = self.state
        with s.lock:
            s.last_step = int(step) if s.last_step is None else max(s.last_step, int(step))
            s.last_step_ts = time.time()
            for name, value in metrics.items():
                v = _finite(value)
                if v is None:
                    continue
                if name.startswith("probe/"):
                    parts = name.split("/", 2)
                    if len(parts) == 3:
                        task, metric = parts[1], parts[2]
                        cap = s.task_capability.get(task, "")
                        old = s.probe.get((cap, task, metric))
                        s.probe[(cap, task, metric)] = (v, old[1] if old else None)
                        continue
                if name.startswith("capability/"):
                    s.capability[name.split("/", 1)[1]] = v
                    continue
                if name == "fineline/internal_error":
                    s.internal_errors = v
                    continue
                if name.startswith("fineline/internal_error/"):
                    part = name.split("/", 2)[2]
                    s.part_errors[part] = v
                    if part == "probes":
                        s.probe_failures = v
                    continue
                if name == "fineline/probe_failures":
                    s.probe_failures = v
                    continue
                family, extra = prom_name(name)
                if family not in s.helps:
                    s.helps[family] = self._help(name, family)
                s.gauges[(family, tuple(sorted(extra.items())))] = v
        self._export_soon()

    @staticmethod
    def _help(name: str, family: str) -> str:
        for key, (fam, doc) in SIMPLE.items():
            if fam == family:
                return f"{doc} (monitor name `{key}`)"
        for prefix, (fam, _, doc) in PER_ITEM.items():
            if fam == family:
                return f"{doc} (monitor name `{prefix}[/...]`)"
        return f"Monitor metric `{name}`."

    def log_probe(self, round: ProbeRound) -> None:
        s = self.state
        with s.lock:
            for task, r in round.tasks.items():
                s.task_capability[task] = r.capability
                s.probe_docs[(r.capability, task)] = int(r.n_docs)
                for metric, value in r.metrics.items():
                    v = _finite(value)
                    if v is None:
                        continue
                    # drop a stale entry logged before the task's capability was known
                    s.probe.pop(("", task, metric), None)
                    s.probe[(r.capability, task, metric)] = (v, _finite(r.stderr.get(metric)))
            for cap, value in round.capability_scores.items():
                v = _finite(value)
                if v is not None:
                    s.capability[cap] = v
            s.probe_rounds += 1
            s.last_probe_step = int(round.step)
            s.last_probe_ts = time.time()
        self._export_soon(force=True)

    def log_alert(self, alert: Alert) -> None:
        s = self.state
        with s.lock:
            key = alert.dedup_key + "|" + alert.severity
            if key not in s.alerts and len(s.alerts) >= MAX_ALERT_SERIES:
                # bound the series count: forget the oldest inactive alert
                oldest = min(s.alerts, key=lambda k: s.alerts[k]["ts"])
                del s.alerts[oldest]
            s.alerts[key] = {"rule": alert.rule, "severity": alert.severity, "capability": alert.capability or "",
                             "task": alert.task or "", "metric": alert.metric or "", "ts": time.time()}
            s.alert_counts[(alert.rule, alert.severity)] = s.alert_counts.get((alert.rule, alert.severity), 0) + 1
        self._export_soon(force=True)

    def log_phase(self, step: int, tokens: Optional[int], phase: str, previous: Optional[str]) -> None:
        with self.state.lock:
            self.state.phase = phase
            self.state.phase_start_step = int(step)
        self._export_soon(force=True)

    def log_expectations(self, step: int, rows: list) -> None:
        with self.state.lock:
            for r in rows:
                self.state.expected[str(r["name"])] = (_finite(r.get("expected")), _finite(r.get("low")),
                                                       _finite(r.get("high")))
        self._export_soon()

    def flush(self) -> None:
        if self._worker is not None:
            self._export_soon(force=True)
            self._worker.flush(10.0)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self.state.lock:
            self.state.finished = True
        if self._worker is not None:
            self._worker.close(5.0)
            try:  # the final state, written once more in this thread (bounded by the push timeout)
                self._write_textfile() if self.mode == "textfile" else self._push()
            except Exception as e:  # noqa: BLE001 - never raise out of close
                log.warning("fineline: final Prometheus export failed: %s", self._redact(str(e)))
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        try:
            self.registry.unregister(self.collector)
        except KeyError:
            pass

    def exposition(self) -> str:
        """The current exposition text (what a scrape would return)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()
