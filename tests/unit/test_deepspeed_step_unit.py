"""DeepSpeedMonitor.step: once per optimizer step (gradient accumulation), mean loss of the
step's micro-batches, skipped fp16 steps flagged, grad norm and loss scale from the engine.
A stand-in engine with DeepSpeed's attribute names drives it: a unit test of the adapter's
bookkeeping (the real engine: tests/integration/test_deepspeed_scaler.py, tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from fineline_monitor.integrations import deepspeed as dsi


class FakeEngine:
    def __init__(self, gas: int):
        self.module = torch.nn.Linear(2, 2)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1)
        self.optimizer.cur_scale = 1024.0
        self.gas, self.micro, self.global_steps, self.skipped_steps = gas, 0, 0, 0
        self.overflow_at = set()

    def zero_optimization_stage(self):
        return 1

    def fp16_enabled(self):
        return True

    def bfloat16_enabled(self):
        return False

    def get_global_grad_norm(self):
        return 2.5

    def get_lr(self):
        return [0.1]

    def step(self):
        self.micro += 1
        if self.micro % self.gas == 0:
            if self.global_steps + 1 in self.overflow_at:
                self.skipped_steps += 1
            self.global_steps += 1


def test_steps_once_per_optimizer_step_with_mean_loss(monkeypatch):
    calls = []

    class Recorder:
        def __init__(self, **kw):
            self.disabled_parts, self.should_stop, self.last_probe = {}, False, None

        def step(self, **kw):
            calls.append(kw)
            return []

    import fineline_monitor.monitor as mon

    monkeypatch.setattr(mon, "FineLineMonitor", lambda **kw: Recorder(**kw))
    eng = FakeEngine(gas=3)
    eng.overflow_at = {2}
    m = dsi.DeepSpeedMonitor(eng, config={"probe_every": 0, "sinks": {"enabled": []}})
    losses = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    for loss in losses:
        eng.step()
        m.step(loss=torch.tensor(loss), tokens=eng.micro * 10)
    assert [c["step"] for c in calls] == [1, 2]
    assert [float(c["loss"]) for c in calls] == pytest.approx([2.0, 5.0])
    assert [c["skipped"] for c in calls] == [False, True]
    assert all(
        c["grad_norm"] == 2.5 and c["loss_scale"] == 1024.0 and c["lr"] == 0.1 for c in calls
    )
