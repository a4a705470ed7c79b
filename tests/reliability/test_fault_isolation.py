"""Fault isolation with the real monitor on a real (tiny) model.

Each case injects one fault into one part (a probe forward, an indicator, the store, the
console, the Prometheus exporter, the webhook, W&B) while a tiny GPT-2 trains. What must
hold for every case:
- training is untouched: its losses are bit-identical to a run without the monitor;
- in-process faults are reported once (one log record, one `internal_error` event row in
  the store, the `fineline/internal_error` metric) and only that part is disabled;
- network sinks retry with backoff on their own thread and never block a step;
- `strict=True` raises instead (tests and CI want to see the bug).
"""

from __future__ import annotations

import io
import logging
import socket
import time
from pathlib import Path

import pytest
import torch

from fineline_monitor import FineLineMonitor, MonitorConfig
from fineline_monitor.core.types import Alert
from fineline_monitor.sinks.base import Sink

from ._train import train, write_requests
from .conftest import tiny_gpt2

pytestmark = pytest.mark.timeout(120)

STEPS = 12
PROBE_EVERY = 5
COLLECT = 2
AREA = "fault isolation"


class Recorder(Sink):
    """An extra sink that keeps what it got, to check what the other sinks still receive."""

    name = "recorder"

    def __init__(self):
        self.metrics = []
        self.alerts = []

    def log_metrics(self, step, tokens, metrics):
        self.metrics.append((step, dict(metrics)))

    def log_alert(self, alert):
        self.alerts.append(alert)


def _cfg(tmp_path: Path, **kw) -> MonitorConfig:
    req = write_requests(tmp_path / "requests.jsonl")
    base = dict(
        run_name="rel",
        out_dir=str(tmp_path / "out"),
        probe_every=PROBE_EVERY,
        probe_at_start=True,
        probe_max_overhead=0.0,  # fixed cadence: the tests count rounds
        indicators={"collect_every": COLLECT},
        probes={"tasks": [], "requests_files": [str(req)], "docs_per_task": 3, "batch_size": 4},
        sinks={"enabled": ["store", "console"], "console_every": 1},
    )
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return MonitorConfig(**base)


@pytest.fixture(scope="module")
def vocab(tiny_tokenizer):
    return len(tiny_tokenizer)


@pytest.fixture(scope="module")
def baseline(vocab):
    """Losses of the same training run without any monitor."""
    torch.set_num_threads(1)
    losses, _ = train(lambda: tiny_gpt2(vocab), STEPS, vocab)
    return losses


def _run(tmp_path, tokenizer, vocab, cfg, *, inject=None, before_build=None, recorder=None):
    def monitor_fn(model, opt):
        if before_build is not None:
            before_build(model)
        return FineLineMonitor(
            model=model,
            optimizer=opt,
            config=cfg,
            tokenizer=tokenizer,
            sinks=[recorder] if recorder is not None else None,
        )

    return train(lambda: tiny_gpt2(vocab), STEPS, vocab, monitor_fn=monitor_fn, on_step=inject)


def _db(mon):
    """A read-only view of the run store (the monitor closed its own connection)."""
    from fineline_monitor.core.store import RunStore

    return RunStore(Path(mon.config.out_dir) / "run.db", run=mon.run, readonly=True)


def _error_logs(caplog, part):
    return [
        r for r in caplog.records if r.getMessage().startswith(f"fineline_monitor: {part} failed")
    ]


def _assert_reported_once(mon, caplog, part, *, store_alive=True):
    assert part in mon.disabled_parts, mon.disabled_parts
    assert len(_error_logs(caplog, part)) == 1, [r.getMessage()[:200] for r in caplog.records]
    if store_alive:
        ev = [e for e in _db(mon).events() if e["kind"] == "internal_error" and e["key"] == part]
        assert len(ev) == 1, _db(mon).events()
        series = [v for _, _, v in _db(mon).series("fineline/internal_error")]
        assert series and series[-1] >= 1.0


# ---- in-process faults: reported once, part disabled, training bit-identical ------------------


def _raise_in_probe_forward(step, mon):
    """From step 0 on (after the monitor attached and its scorer checked the model), a model
    hook fails in no-grad forwards, i.e. inside a probe round: an OOM in the middle of it."""
    if step != 0:
        return

    def hook(module, args, output):
        if not torch.is_grad_enabled():
            raise RuntimeError("CUDA out of memory (injected in a probe forward)")

    mon.model.transformer.h[0].register_forward_hook(hook)


def test_probe_forward_raises(tmp_path, tiny_tokenizer, vocab, baseline, caplog, fault_table):
    rec = Recorder()
    with caplog.at_level(logging.ERROR, logger="fineline_monitor"):
        losses, mon = _run(
            tmp_path,
            tiny_tokenizer,
            vocab,
            _cfg(tmp_path),
            inject=_raise_in_probe_forward,
            recorder=rec,
        )
    assert mon.probes is not None, (
        "the probe runner was not built (is fineline_monitor.probes.ProbeRunner there?)"
    )
    assert losses == baseline
    _assert_reported_once(mon, caplog, "probes")
    assert (
        "out of memory" in mon.disabled_parts["probes"]
        or "probe round" in mon.disabled_parts["probes"]
    )
    assert _db(mon).probe_rounds() == []  # the failed round recorded nothing half-done
    # indicators and the store went on for every collect step
    assert len(_db(mon).series("train/loss")) == STEPS // COLLECT
    fault_table.record(
        AREA,
        "exception in a probe forward (model hook raising under no_grad)",
        "probes disabled after the first round, reported once; loss bit-identical",
        injected=1,
        survived=1,
        rows_lost=STEPS // COLLECT - len(_db(mon).series("train/loss")),
    )


def test_probe_forward_raises_strict(tmp_path, tiny_tokenizer, vocab, fault_table):
    with pytest.raises(RuntimeError, match="out of memory"):
        _run(
            tmp_path,
            tiny_tokenizer,
            vocab,
            _cfg(tmp_path, strict=True),
            inject=_raise_in_probe_forward,
        )
    fault_table.record(
        AREA, "same faults with strict=True", "raises to the caller", injected=1, survived=1
    )


COLLECT_BUG = (
    "monitor.py FineLineMonitor._collect: when indicators.collect raises, the error guard returns {} and "
    "that collect step logs nothing (its loss row is lost); the no-indicator fallback starts only at "
    "the next collect. Fix in the report."
)


@pytest.mark.parametrize("method", ["on_step", "collect", "probe_context", "probe_round_metrics"])
def test_indicator_raises(tmp_path, tiny_tokenizer, vocab, baseline, caplog, fault_table, method):
    fault_step = 3 if method in ("on_step", "collect") else 0
    rec = Recorder()

    def inject(step, mon):
        if step == fault_step:
            assert mon.indicators is not None, "indicators were not built"

            def boom(*a, **k):
                raise ValueError(f"indicator bug in {method} (injected)")

            setattr(mon.indicators, method, boom)

    with caplog.at_level(logging.ERROR, logger="fineline_monitor"):
        losses, mon = _run(
            tmp_path, tiny_tokenizer, vocab, _cfg(tmp_path), inject=inject, recorder=rec
        )
    steps_with_loss = {s for s, _, _ in _db(mon).series("train/loss")}
    lost = len(set(range(0, STEPS, COLLECT)) - steps_with_loss)
    assert losses == baseline
    _assert_reported_once(mon, caplog, "indicators")
    assert "probes" not in mon.disabled_parts  # a broken indicator does not take the probes along
    assert len(_db(mon).probe_rounds()) == len(range(0, STEPS, PROBE_EVERY))
    # The loss still reaches the store on every collect step (from the monitor's own fallback),
    # including the step whose indicator collection failed.
    assert lost == 0, sorted(steps_with_loss)
    fault_table.record(
        AREA,
        "exception in an indicator (on_step, collect, probe hooks, probe metrics)",
        "indicators disabled, reported once; loss still logged, probes go on; loss bit-identical",
        injected=1,
        survived=1,
    )


def test_indicator_raises_strict(tmp_path, tiny_tokenizer, vocab, fault_table):
    def inject(step, mon):
        if step == 3:
            mon.indicators.collect = lambda *a, **k: (_ for _ in ()).throw(
                ValueError("indicator bug")
            )

    with pytest.raises(ValueError, match="indicator bug"):
        _run(tmp_path, tiny_tokenizer, vocab, _cfg(tmp_path, strict=True), inject=inject)
    fault_table.record(
        AREA, "same faults with strict=True", "raises to the caller", injected=1, survived=1
    )


def test_store_breaks_mid_run(tmp_path, tiny_tokenizer, vocab, baseline, caplog, fault_table):
    rec = Recorder()

    def inject(step, mon):
        if step == 5:
            mon.store._db.close()  # the database goes away under the monitor (disk gone, fd closed)

    with caplog.at_level(logging.ERROR, logger="fineline_monitor"):
        losses, mon = _run(
            tmp_path, tiny_tokenizer, vocab, _cfg(tmp_path), inject=inject, recorder=rec
        )
    assert losses == baseline
    _assert_reported_once(mon, caplog, "sink:store", store_alive=False)
    # the other sinks still get every collect step, with the error counted
    loss_rows = [(s, m) for s, m in rec.metrics if "train/loss" in m]
    assert [s for s, _ in loss_rows] == list(range(0, STEPS, COLLECT))
    assert loss_rows[-1][1]["fineline/internal_error"] >= 1.0
    fault_table.record(
        AREA,
        "store: SQLite connection closed mid-run",
        "store sink disabled, reported once "
        "(log + metric in the other sinks); other sinks get every row; loss bit-identical",
        injected=1,
        survived=1,
    )


def test_store_breaks_strict(tmp_path, tiny_tokenizer, vocab, fault_table):
    def inject(step, mon):
        if step == 5:
            mon.store._db.close()

    with pytest.raises(Exception, match="closed"):
        _run(tmp_path, tiny_tokenizer, vocab, _cfg(tmp_path, strict=True), inject=inject)
    fault_table.record(
        AREA, "same faults with strict=True", "raises to the caller", injected=1, survived=1
    )


def test_console_stream_closed(tmp_path, tiny_tokenizer, vocab, baseline, caplog, fault_table):
    def inject(step, mon):
        if step == 4:
            dead = io.StringIO()
            dead.close()  # stderr gone (a closed pipe): every write raises ValueError
            for s in mon.sinks:
                if getattr(s, "name", "") == "console":
                    s.stream = dead

    with caplog.at_level(logging.ERROR, logger="fineline_monitor"):
        losses, mon = _run(tmp_path, tiny_tokenizer, vocab, _cfg(tmp_path), inject=inject)
    assert losses == baseline
    _assert_reported_once(mon, caplog, "sink:console")
    assert len(_db(mon).series("train/loss")) == STEPS // COLLECT
    fault_table.record(
        AREA,
        "console: output stream closed mid-run",
        "console sink disabled, reported once; store complete; loss bit-identical",
        injected=1,
        survived=1,
        rows_lost=STEPS // COLLECT - len(_db(mon).series("train/loss")),
    )


def test_prometheus_port_taken_does_not_take_the_store_down(
    tmp_path, tiny_tokenizer, vocab, baseline, caplog, fault_table
):
    pytest.importorskip("prometheus_client")
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    port = squatter.getsockname()[1]
    try:
        cfg = _cfg(
            tmp_path, sinks={"enabled": ["store", "console", "prometheus"], "prometheus_port": port}
        )
        with caplog.at_level(logging.ERROR, logger="fineline_monitor"):
            losses, mon = _run(tmp_path, tiny_tokenizer, vocab, cfg)
    finally:
        squatter.close()
    rows = len(_db(mon).series("train/loss")) if mon.store is not None else 0
    assert losses == baseline
    # The exporter failing to bind is reported, but the store and console still work.
    assert any("prometheus" in p or p == "sinks" for p in mon.disabled_parts), mon.disabled_parts
    assert mon.store is not None, (
        f"a Prometheus port clash took the run store down too: {mon.disabled_parts}"
    )
    assert rows == STEPS // COLLECT
    fault_table.record(
        AREA,
        "prometheus: exporter port already in use",
        "exporter reported and disabled; store and console go on; loss bit-identical",
        injected=1,
        survived=1,
    )


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return port


def _timed_run(tmp_path, tokenizer, vocab, cfg, inject=None):
    durations = []
    orig = FineLineMonitor.step

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return orig(self, *a, **k)
        finally:
            durations.append(time.perf_counter() - t0)

    FineLineMonitor.step = timed
    try:
        losses, mon = _run(tmp_path, tokenizer, vocab, cfg, inject=inject)
    finally:
        FineLineMonitor.step = orig
    return losses, mon, durations


def test_pushgateway_unreachable_never_blocks(
    tmp_path, tiny_tokenizer, vocab, baseline, caplog, monkeypatch, fault_table
):
    pytest.importorskip("prometheus_client")
    monkeypatch.setenv("FINELINE_PUSHGATEWAY_URL", f"http://127.0.0.1:{_closed_port()}")
    cfg = _cfg(
        tmp_path,
        probe_every=0,
        sinks={"enabled": ["store", "prometheus"], "prometheus_mode": "pushgateway"},
    )
    with caplog.at_level(logging.WARNING, logger="fineline_monitor"):
        losses, mon, durations = _timed_run(tmp_path, tiny_tokenizer, vocab, cfg)
    assert losses == baseline
    prom = [s for s in mon.sinks if getattr(s, "name", "") == "prometheus"]
    assert prom, mon.disabled_parts
    stats = prom[0]._worker.stats()
    assert stats["failed"] + stats["retries"] >= 1, stats  # it did try, and failed
    assert max(durations) < 0.5, f"a step waited on the dead push gateway: {max(durations):.2f}s"
    assert len(_db(mon).series("train/loss")) == STEPS // COLLECT
    fault_table.record(
        AREA,
        "prometheus: push gateway unreachable (connection refused)",
        "retried with backoff on the sink's thread, logged; no step blocked; loss bit-identical",
        injected=1,
        survived=1,
        rows_lost=STEPS // COLLECT - len(_db(mon).series("train/loss")),
    )


def test_webhook_unreachable_never_blocks_and_is_redacted(
    tmp_path, tiny_tokenizer, vocab, baseline, caplog, monkeypatch, fault_table
):
    secret = "s3cr3t-T0KEN-abcdef"
    monkeypatch.setenv("FINELINE_WEBHOOK_URL", f"http://127.0.0.1:{_closed_port()}/hook/{secret}")
    cfg = _cfg(tmp_path, probe_every=0, sinks={"enabled": ["store", "webhook"]})
    sent = []

    def inject(step, mon):
        # Alerts go through the real sinks; the alert engine is another test's concern.
        if step == 6:
            a = Alert(
                rule="nonfinite_loss",
                severity="critical",
                step=step,
                message="loss is NaN (injected)",
            )
            mon._handle_alerts([a])
            sent.append(a)

    with caplog.at_level(logging.DEBUG, logger="fineline_monitor"):
        losses, mon, durations = _timed_run(tmp_path, tiny_tokenizer, vocab, cfg, inject=inject)
    assert losses == baseline
    hook = [s for s in mon.sinks if getattr(s, "name", "") == "webhook"]
    assert hook, mon.disabled_parts
    stats = hook[0].stats
    assert stats["retries"] >= 1, stats  # backoff, not a give-up on the first refusal
    assert max(durations) < 0.5, f"a step waited on the dead webhook: {max(durations):.2f}s"
    text = "\n".join(r.getMessage() for r in caplog.records) + repr(hook[0]) + str(stats)
    assert secret not in text
    assert secret.encode() not in (Path(cfg.out_dir) / "run.db").read_bytes()
    fault_table.record(
        AREA,
        "webhook: endpoint unreachable (connection refused)",
        "retried with backoff on the sink's thread, URL redacted in logs; no step blocked",
        injected=1,
        survived=1,
    )


def test_wandb_unreachable(
    tmp_path, tiny_tokenizer, vocab, baseline, caplog, monkeypatch, fault_table
):
    wandb = pytest.importorskip("wandb")

    def dead_init(*a, **k):
        raise ConnectionError("wandb.init: api.wandb.ai unreachable (injected)")

    monkeypatch.setattr(wandb, "init", dead_init)
    cfg = _cfg(tmp_path, probe_every=0, sinks={"enabled": ["store", "wandb"]})
    with caplog.at_level(logging.WARNING, logger="fineline_monitor"):
        losses, mon, durations = _timed_run(tmp_path, tiny_tokenizer, vocab, cfg)
    assert losses == baseline
    assert max(durations) < 0.5
    msgs = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert 1 <= len(msgs) <= 2, msgs  # reported, not once per step
    assert len(_db(mon).series("train/loss")) == STEPS // COLLECT
    fault_table.record(
        AREA,
        "wandb: wandb.init raises (service unreachable)",
        "reported once on the sink's thread; store complete; loss bit-identical",
        injected=1,
        survived=1,
        rows_lost=STEPS // COLLECT - len(_db(mon).series("train/loss")),
    )
