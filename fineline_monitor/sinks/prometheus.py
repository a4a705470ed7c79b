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

Every family, its help text and its labels are registered in `fineline_monitor.metric_names`,
which also maps the monitor's metric names to families (`prom_name()`). Every series
carries `run`.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from fineline_monitor import metric_names as names
from fineline_monitor.core.types import Alert, ProbeRound
from fineline_monitor.metric_names import FAMILIES, prom_name  # noqa: F401 - prom_name: the mapping, re-exported
from fineline_monitor.sinks.background import BackgroundWorker, workers
from fineline_monitor.sinks.base import Sink

log = logging.getLogger("fineline_monitor.sinks")

PHASES = ("warmup", "stable", "decay", "anneal", "rewarm", "unknown")
MAX_ALERT_SERIES = 1000


def _finite(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v  # NaN/inf are valid sample values in the exposition format, and informative


def _help(name: str, family: str) -> str:
    """HELP of a family that has samples: the registry's text and the monitor name it carries."""
    for m in names.metric_families():
        if m.family == family:
            return f"{m.help} (monitor name `{m.name}{'[/...]' if m.item else ''}`)"
    return f"Monitor metric `{name}`."


class _State:
    """What the collector reads; written under `lock` by the sink's methods."""

    def __init__(self, run: str, alert_hold_s: float):
        self.lock = threading.Lock()
        self.run = run
        self.alert_hold_s = alert_hold_s
        self.gauges: Dict[
            Tuple[str, Tuple[Tuple[str, str], ...]], float
        ] = {}  # (family, labels) -> value
        self.helps: Dict[str, str] = {}
        self.task_capability: Dict[str, str] = {}
        self.probe: Dict[
            Tuple[str, str, str], Tuple[float, Optional[float]]
        ] = {}  # (cap, task, metric)
        self.probe_docs: Dict[Tuple[str, str], int] = {}
        self.capability: Dict[str, float] = {}
        self.expected: Dict[str, Tuple[Optional[float], Optional[float], Optional[float]]] = {}
        self.alerts: Dict[
            str, Dict[str, Any]
        ] = {}  # dedup_key|severity -> labels + last fired time
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

    def snapshot(self) -> "_State":
        """A copy to build the exposition from, taken under the lock (the training thread
        keeps writing while the scrape formats)."""
        with self.lock:
            snap = copy.copy(self)
            for key, value in vars(self).items():
                if isinstance(value, dict):
                    setattr(snap, key, dict(value))
            snap.alerts = {k: dict(a) for k, a in self.alerts.items()}
        return snap


class _Collector:
    """Builds the exposition from a snapshot of `_State` at scrape time, one section after
    the other: liveness, indicators, probes, expectations, phase, alerts, the monitor's
    own health. Every family's help, type and labels come from `metric_names.FAMILIES`."""

    def __init__(self, state: _State, own_sink: str):
        self.state = state
        self.own_sink = own_sink

    def collect(self):
        s = self.state.snapshot()
        yield from self._liveness(s)
        yield from self._indicators(s)
        yield from self._probes(s)
        yield from self._expectations(s)
        yield from self._phase(s)
        yield from self._alerts(s, time.time())
        yield from self._health(s)

    @staticmethod
    def _family(
        s: _State, name: str, help: Optional[str] = None, labels: Optional[List[str]] = None
    ) -> Any:
        """An empty family of the registry's `name` (every series has `run` first)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        spec = FAMILIES.get(name)
        doc = help if help is not None else spec.help.format(hold_s=s.alert_hold_s)
        label_names = ["run"] + list(labels if labels is not None else spec.labels)
        cls = (
            CounterMetricFamily
            if spec is not None and spec.kind == "counter"
            else GaugeMetricFamily
        )
        return cls(name, doc, labels=label_names)

    def _single(self, s: _State, name: str, value: float) -> Any:
        fam = self._family(s, name)
        fam.add_metric([s.run], value)
        return fam

    def _liveness(self, s: _State):
        yield self._single(s, "fineline_run_start_timestamp_seconds", s.start_ts)
        yield self._single(s, "fineline_run_finished", 1.0 if s.finished else 0.0)
        if s.last_step is not None:
            yield self._single(s, "fineline_last_step", float(s.last_step))
            yield self._single(s, "fineline_last_step_timestamp_seconds", s.last_step_ts)

    def _indicators(self, s: _State):
        families: Dict[str, Any] = {}
        for (family, labels), value in sorted(s.gauges.items()):
            fam = families.get(family)
            if fam is None:
                fam = families[family] = self._family(
                    s,
                    family,
                    s.helps.get(family, "FineLine monitor metric."),
                    [k for k, _ in labels],
                )
            fam.add_metric([s.run] + [v for _, v in labels], value)
        # Registered families are declared even before their first sample (e.g. the Hessian trace
        # is off by default), so dashboards and rules refer to names the exposition always has.
        for m in names.metric_families():
            if m.family not in families:
                families[m.family] = self._family(s, m.family, m.help, [])
        yield from families.values()

    def _probes(self, s: _State):
        value = self._family(s, "fineline_probe_value")
        stderr = self._family(s, "fineline_probe_stderr")
        for (cap, task, metric), (v, err) in sorted(s.probe.items()):
            value.add_metric([s.run, cap, task, metric], v)
            if err is not None:
                stderr.add_metric([s.run, cap, task, metric], err)
        yield value
        yield stderr
        docs = self._family(s, "fineline_probe_docs")
        for (cap, task), n in sorted(s.probe_docs.items()):
            docs.add_metric([s.run, cap, task], float(n))
        yield docs
        score = self._family(s, "fineline_capability_score")
        for key, v in sorted(s.capability.items()):
            cap, _, series = key.partition("/")  # `math/bpb`: capability math, series bpb
            score.add_metric([s.run, cap, series or "score"], v)
        yield score
        yield self._single(s, "fineline_probe_rounds", float(s.probe_rounds))
        if s.last_probe_step is not None:
            yield self._single(s, "fineline_probe_last_step", float(s.last_probe_step))
            yield self._single(s, "fineline_last_probe_timestamp_seconds", s.last_probe_ts)
        yield self._single(s, "fineline_probe_every_steps", float(s.probe_every or 0))

    def _expectations(self, s: _State):
        fams = {k: self._family(s, f"fineline_expected_{k}") for k in ("value", "low", "high")}
        for name, (exp, low, high) in sorted(s.expected.items()):
            labels = [s.run, name] + list(self._curve_labels(s, name))
            for k, v in (("value", exp), ("low", low), ("high", high)):
                if v is not None:
                    fams[k].add_metric(labels, v)
        yield from fams.values()

    @staticmethod
    def _curve_labels(s: _State, name: str) -> Tuple[str, str, str]:
        """(capability, task, metric) of an expectation row's curve name."""
        cap = names.split_capability_key(name)
        if cap is not None and cap.count("/") == 1:  # capability/<cap>/<series>
            cap, series = cap.split("/")
            return cap, "", series
        if cap is not None and "/" not in cap:
            return cap, "", "score"
        probe = names.split_probe_key(name)
        if probe is not None and "/" not in probe[1]:
            return s.task_capability.get(probe[0], ""), probe[0], probe[1]
        return "", "", ""

    def _phase(self, s: _State):
        fam = self._family(s, "fineline_phase")
        for p in PHASES if s.phase in PHASES else PHASES + (s.phase,):
            fam.add_metric([s.run, p], 1.0 if p == s.phase else 0.0)
        yield fam
        if s.phase_start_step is not None:
            yield self._single(s, "fineline_phase_start_step", float(s.phase_start_step))

    def _alerts(self, s: _State, now: float):
        active = self._family(s, "fineline_alert_active")
        for a in sorted(
            s.alerts.values(),
            key=lambda a: (a["rule"], a["severity"], a["capability"], a["task"], a["metric"]),
        ):
            active.add_metric(
                [s.run, a["rule"], a["severity"], a["capability"], a["task"], a["metric"]],
                1.0 if now - a["ts"] < s.alert_hold_s else 0.0,
            )
        yield active
        fired = self._family(s, "fineline_alerts")
        for (rule, sev), n in sorted(s.alert_counts.items()):
            fired.add_metric([s.run, rule, sev], float(n))
        yield fired

    def _health(self, s: _State):
        yield self._single(s, "fineline_internal_errors", s.internal_errors)
        parts = self._family(s, "fineline_component_errors")
        for part, n in sorted(s.part_errors.items()):
            parts.add_metric([s.run, part], n)
        yield parts
        yield self._single(s, "fineline_probe_failures", s.probe_failures)
        stats = {w.name: w.stats() for w in workers()}
        stats.setdefault(self.own_sink, {"dropped": 0, "failed": 0, "queued": 0})
        drop, fail, depth = (
            self._family(s, f"fineline_sink_{k}") for k in ("dropped", "failed", "queue_depth")
        )
        for name, st in sorted(stats.items()):
            drop.add_metric([s.run, name], float(st["dropped"]))
            fail.add_metric([s.run, name], float(st["failed"]))
            depth.add_metric([s.run, name], float(st["queued"]))
        yield drop
        yield fail
        yield depth


class PrometheusSink(Sink):
    """Records the monitor's state for Prometheus. See the module docstring for the modes."""

    name = "prometheus"

    def __init__(
        self,
        run: str,
        *,
        mode: str = "http",
        registry: Any = None,
        host: str = "127.0.0.1",
        port: int = 0,
        textfile: Optional[Path] = None,
        pushgateway_url: Optional[str] = None,
        pushgateway_url_env: Optional[str] = None,
        alert_hold_s: float = 1800.0,
        write_interval_s: float = 2.0,
        queue_size: int = 1,
    ):
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

            self._server, self._server_thread = start_http_server(
                int(port), addr=host, registry=self.registry
            )
            self.port = int(self._server.server_port)
            log.info("fineline: Prometheus exporter on http://%s:%d/metrics", host, self.port)
        elif mode == "textfile":
            if self.textfile is None:
                raise ValueError("prometheus textfile mode needs a textfile path")
            self.textfile.parent.mkdir(parents=True, exist_ok=True)
            # Queue of one: a pending write already exports the newest state, so coalesce.
            self._worker = BackgroundWorker(
                "prometheus",
                lambda _: self._write_textfile(),
                queue_size=queue_size,
                max_retries=1,
                backoff_s=0.2,
            )
        else:
            if not self._url():
                raise ValueError("prometheus pushgateway mode needs a push-gateway URL")
            self._worker = BackgroundWorker(
                "prometheus",
                lambda _: self._push(),
                queue_size=queue_size,
                max_retries=2,
                backoff_s=1.0,
                redact=self._redact,
            )

    @classmethod
    def from_config(cls, config: Any, out_dir: Path, run: str) -> "PrometheusSink":
        sc = config.sinks
        kw: Dict[str, Any] = {
            "mode": sc.prometheus_mode,
            "host": sc.prometheus_host,
            "port": sc.prometheus_port,
            "alert_hold_s": getattr(sc, "prometheus_alert_hold_s", 1800.0),
        }
        if sc.prometheus_mode == "textfile":
            kw["textfile"] = (
                Path(sc.prometheus_textfile)
                if sc.prometheus_textfile
                else Path(out_dir) / "metrics.prom"
            )
        elif sc.prometheus_mode == "pushgateway":
            url = os.environ.get(sc.pushgateway_url_env, "").strip()
            if not url:
                from fineline_monitor.core.config import ConfigError

                raise ConfigError(
                    f"sinks.prometheus_mode is `pushgateway` but the environment variable "
                    f"`{sc.pushgateway_url_env}` (sinks.pushgateway_url_env) is empty; set it to the "
                    f"push-gateway URL, e.g. http://pushgateway:9091"
                )
            kw["pushgateway_url_env"] = sc.pushgateway_url_env
        return cls(run, **kw)

    # ---- delivery ------------------------------------------------------------------------
    def _write_textfile(self) -> None:
        from prometheus_client import write_to_textfile

        write_to_textfile(str(self.textfile), self.registry)  # tmp file + os.replace: atomic

    def _push(self) -> None:
        from prometheus_client import push_to_gateway

        push_to_gateway(
            self._url(),
            job="fineline",
            registry=self.registry,
            grouping_key={"run": self.state.run},
            timeout=5.0,
        )

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
            if self._worker.queue_full():
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
                if v is not None:
                    self._record(s, name, v)
        self._export_soon()

    @staticmethod
    def _record(s: _State, name: str, v: float) -> None:
        """One `log_metrics` value into the state (under its lock)."""
        metric, part = names.lookup(name)
        if metric is not None and metric.name in (names.PROBE_METRIC, names.CAPABILITY_SCORE):
            return  # exported from the probe round itself (log_probe), with capability and stderr
        if metric is not None and metric.name == names.INTERNAL_ERROR:
            s.internal_errors = v
        elif metric is not None and metric.name == names.PART_ERRORS:
            s.part_errors[part] = v
            if part == "probes":
                s.probe_failures = v
        else:
            family, extra = names.prom_name(name)
            if family not in s.helps:
                s.helps[family] = _help(name, family)
            s.gauges[(family, tuple(sorted(extra.items())))] = v

    def log_probe(self, round: ProbeRound) -> None:
        s = self.state
        with s.lock:
            for task, r in round.tasks.items():
                s.task_capability[task] = r.capability
                s.probe_docs[(r.capability, task)] = int(r.n_docs)
                for metric, value in r.metrics.items():
                    v = _finite(value)
                    if v is not None:
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
            s.alerts[key] = {
                "rule": alert.rule,
                "severity": alert.severity,
                "capability": alert.capability or "",
                "task": alert.task or "",
                "metric": alert.metric or "",
                "ts": time.time(),
            }
            s.alert_counts[(alert.rule, alert.severity)] = (
                s.alert_counts.get((alert.rule, alert.severity), 0) + 1
            )
        self._export_soon(force=True)

    def log_phase(
        self, step: int, tokens: Optional[int], phase: str, previous: Optional[str]
    ) -> None:
        with self.state.lock:
            self.state.phase = phase
            self.state.phase_start_step = int(step)
        self._export_soon(force=True)

    def log_expectations(self, step: int, rows: list) -> None:
        with self.state.lock:
            for r in rows:
                self.state.expected[str(r["name"])] = (
                    _finite(r.get("expected")),
                    _finite(r.get("low")),
                    _finite(r.get("high")),
                )
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
