"""The monitor never takes training down: a failing part is reported once and disabled,
the rest goes on; strict mode raises instead."""

import logging

import pytest

from fineline_monitor import FineLineMonitor, MonitorConfig
from fineline_monitor.sinks.base import Sink


class Boom(Sink):
    name = "boom"

    def __init__(self, on="log_metrics"):
        self.on = on
        self.calls = 0

    def log_metrics(self, step, tokens, metrics):
        self.calls += 1
        if self.on == "log_metrics":
            raise RuntimeError("sink down")


class Recorder(Sink):
    name = "recorder"

    def __init__(self):
        self.metrics = []

    def log_metrics(self, step, tokens, metrics):
        self.metrics.append((step, dict(metrics)))


def _cfg(tmp_path, **kw):
    base = dict(run_name="t", out_dir=str(tmp_path), probe_every=0, indicators={"collect_every": 1},
                sinks={"enabled": ["store"]})
    base.update(kw)
    return MonitorConfig(**base)


def test_failing_sink_is_disabled_alone_and_reported_once(tmp_path, caplog):
    boom, rec = Boom(), Recorder()
    mon = FineLineMonitor(config=_cfg(tmp_path), sinks=[boom, rec])
    with caplog.at_level(logging.ERROR, logger="fineline_monitor"):
        for step in range(20):
            mon.step(step=step, loss=1.0 / (step + 1), tokens=step * 10, lr=1e-3)
    assert boom.calls == 1  # disabled after the first failure
    assert len(rec.metrics) == 20  # the other sinks go on
    assert sum("sink:boom failed" in r.getMessage() for r in caplog.records) == 1
    assert "sink:boom" in mon.disabled_parts
    # The failure is visible in the data: an event row and the internal_error metric.
    assert any(e["kind"] == "internal_error" and e["key"] == "sink:boom" for e in mon.store.events())
    assert rec.metrics[-1][1]["fineline/internal_error"] == 1.0
    mon.close()


def test_strict_mode_raises(tmp_path):
    mon = FineLineMonitor(config=_cfg(tmp_path, strict=True), sinks=[Boom()])
    with pytest.raises(RuntimeError, match="sink down"):
        mon.step(step=0, loss=1.0, tokens=0, lr=1e-3)


def test_failing_indicator_part_does_not_stop_steps(tmp_path, monkeypatch):
    class BadIndicators:
        def on_step(self, **kw):
            raise ValueError("indicator bug")

    monkeypatch.setattr(FineLineMonitor, "_build_indicators", lambda self, fn: BadIndicators())
    import torch

    model = torch.nn.Linear(2, 2)
    mon = FineLineMonitor(model=model, config=_cfg(tmp_path, probes={"tasks": ["default"]}), sinks=[Recorder()])
    for step in range(5):
        mon.step(step=step, loss=1.0, tokens=step, lr=1e-3)
    assert "indicators" in mon.disabled_parts
    # With indicators gone the loss still reaches the store.
    assert [v for _, _, v in mon.store.series("train/loss")] == [1.0] * 5
    mon.close()


def test_failing_probe_round_disables_probes_and_training_continues(tmp_path, monkeypatch):
    class BadProbes:
        calls = 0

        def run(self, step, tokens, hooks=None):
            BadProbes.calls += 1
            raise RuntimeError("probe OOM")

    monkeypatch.setattr(FineLineMonitor, "_build_probes", lambda self, scorer: BadProbes())
    import torch

    mon = FineLineMonitor(model=torch.nn.Linear(2, 2), config=_cfg(tmp_path, probe_every=2), sinks=[])
    for step in range(10):
        mon.step(step=step, loss=1.0, tokens=step, lr=1e-3)
    assert BadProbes.calls == 1 and "probes" in mon.disabled_parts
    mon.close()


def test_closed_monitor_ignores_steps(tmp_path):
    rec = Recorder()
    mon = FineLineMonitor(config=_cfg(tmp_path), sinks=[rec])
    mon.step(step=0, loss=1.0)
    mon.close()
    mon.step(step=1, loss=1.0)
    mon.close()
    assert len(rec.metrics) == 1


def test_expensive_probe_rounds_are_spaced_to_the_budget(tmp_path, monkeypatch):
    """A round that costs more than probe_max_overhead of the training time between
    rounds pushes the next one out to a later multiple of probe_every."""
    import time as _time

    from fineline_monitor.core.types import ProbeRound

    class SlowProbes:
        steps = []

        def run(self, step, tokens, hooks=None):
            SlowProbes.steps.append(step)
            _time.sleep(0.2)
            return ProbeRound(step=step, tokens=tokens, tasks={}, requests=[], seconds=0.2, tokens_scored=0)

    monkeypatch.setattr(FineLineMonitor, "_build_probes", lambda self, scorer: SlowProbes())
    import torch

    cfg = _cfg(tmp_path, probe_every=10, probe_max_overhead=0.5, indicators={"enabled": False})
    mon = FineLineMonitor(model=torch.nn.Linear(2, 2), config=cfg, sinks=[])
    for step in range(200):
        _time.sleep(0.005)  # 5 ms of "training" a step
        mon.step(step=step, loss=1.0, tokens=step, lr=1e-3)
    mon.close()
    # The round at step 0 has no step timing yet, so the next comes at probe_every; from
    # then on 0.2 s rounds on >= 5 ms steps at a 50% budget need <= 80 steps between rounds
    # (sleep overshoots, so fewer), far more than probe_every.
    gaps = [b - a for a, b in zip(SlowProbes.steps, SlowProbes.steps[1:])]
    assert SlowProbes.steps[:2] == [0, 10] and len(gaps) >= 2, SlowProbes.steps
    assert all(40 <= g <= 80 and g % 10 == 0 for g in gaps[1:]), SlowProbes.steps

    SlowProbes.steps = []
    cfg = _cfg(tmp_path / "fixed", probe_every=10, probe_max_overhead=0.0, indicators={"enabled": False})
    mon = FineLineMonitor(model=torch.nn.Linear(2, 2), config=cfg, sinks=[])
    for step in range(50):
        mon.step(step=step, loss=1.0, tokens=step, lr=1e-3)
    mon.close()
    assert SlowProbes.steps == [0, 10, 20, 30, 40]

    # A run that starts at step 1 (DeepSpeed counts from 1) anchors at 1 and then keeps the
    # plain multiples of probe_every while within budget.
    SlowProbes.steps = []
    cfg = _cfg(tmp_path / "from1", probe_every=2, probe_max_overhead=0.9, indicators={"enabled": False})
    mon = FineLineMonitor(model=torch.nn.Linear(2, 2), config=cfg, sinks=[])
    for step in range(1, 7):
        _time.sleep(0.5)  # steps far slower than the 0.2 s round: within budget
        mon.step(step=step, loss=1.0, tokens=step, lr=1e-3)
    mon.close()
    assert SlowProbes.steps == [1, 2, 4, 6]
