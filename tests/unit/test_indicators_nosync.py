"""The per-step path never synchronises with the host.

On the CPU there is no device to wait for, so we count the calls that WOULD synchronise
on an accelerator: every way a tensor's value reaches Python (item, tolist, numpy,
__float__/__int__/__bool__/__index__, __array__), copies to the CPU (.cpu(), .to(cpu)),
and ops whose output size depends on values (nonzero, masked_select, unique). For K-1
steps of `on_step` there must be none; at a collect step exactly one (`.tolist()` of the
buffer). The GPU-marked twin of this test uses torch.cuda.set_sync_debug_mode("error").
"""

from __future__ import annotations

import collections

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fineline_monitor.core.config import IndicatorConfig, MonitorConfig
from fineline_monitor.indicators import StepIndicators

torch.set_num_threads(1)

_VALUE_METHODS = (
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__float__",
    "__int__",
    "__bool__",
    "__index__",
    "__array__",
    "nonzero",
    "masked_select",
    "unique",
)


class SyncCounter:
    def __init__(self, monkeypatch):
        self.calls = collections.Counter()
        self.armed = False
        for name in _VALUE_METHODS:
            orig = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, orig))
        for name in ("nonzero", "masked_select", "unique"):
            monkeypatch.setattr(torch, name, self._wrap("torch." + name, getattr(torch, name)))
        orig_to = torch.Tensor.to

        def to(t, *args, **kwargs):
            dev = kwargs.get("device")
            for a in args:
                if isinstance(a, (str, torch.device)):
                    dev = a
            if self.armed and dev is not None and torch.device(dev).type == "cpu":
                self.calls["to(cpu)"] += 1
            return orig_to(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", to)

    def _wrap(self, name, orig):
        def f(*args, **kwargs):
            if self.armed:
                self.calls[name] += 1
            return orig(*args, **kwargs)

        return f

    def total(self):
        return sum(self.calls.values())


def tiny_gpt2():
    torch.manual_seed(0)
    m = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_head=2,
            n_embd=32,
            vocab_size=128,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    decay = [p for n, p in m.named_parameters() if p.dim() >= 2]
    other = [p for n, p in m.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "name": "decay"}, {"params": other, "weight_decay": 0.0}], lr=1e-3
    )
    return m, opt


@pytest.mark.parametrize("loss_kind", ["tensor", "float"])
def test_no_host_sync_between_collects(monkeypatch, loss_kind):
    K = 8
    m, opt = tiny_gpt2()
    ind = StepIndicators(m, opt, IndicatorConfig(collect_every=K))
    counter = SyncCounter(monkeypatch)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    for step in range(1, 3 * K + 1):
        loss = m(x, labels=x).loss
        loss.backward()
        opt.step()
        gn = None
        scale = None
        if loss_kind == "float":
            loss_v, scale = 2.5, 1024.0
        else:
            loss_v = loss.detach()
            gn = torch.nn.utils.clip_grad_norm_(m.parameters(), 1e9) if step % 2 else None
            scale = torch.tensor(65536.0)
        counter.calls.clear()
        counter.armed = True
        ind.on_step(
            step=step,
            loss=loss_v,
            lr=1e-3,
            tokens=step * 32,
            grad_norm=gn,
            loss_scale=scale,
            skipped=False,
            batch_tokens=32,
        )
        counter.armed = False
        assert counter.total() == 0, f"step {step}: on_step synchronised: {dict(counter.calls)}"
        if step % K == 0:
            counter.armed = True
            out = ind.collect(step)
            counter.armed = False
            assert dict(counter.calls) == {"tolist": 1}, dict(counter.calls)
            # and the one transfer carried everything
            for key in (
                "train/loss",
                "optim/grad_norm",
                "optim/param_norm",
                "optim/update_ratio",
                "optim/update_ratio/decay",
                "optim/update_ratio/1",
                "optim/loss_scale",
                "train/lr",
            ):
                assert key in out, key
        opt.zero_grad()


def test_monitor_step_with_indicators_does_not_sync(monkeypatch, tmp_path):
    """The same through the real FineLineMonitor (probes off, no sinks)."""
    from fineline_monitor import FineLineMonitor

    K = 5
    m, opt = tiny_gpt2()
    # strict=False only so that parts other teams are still writing (the alert engine)
    # may be missing; the indicators must not be among the disabled parts.
    cfg = MonitorConfig(
        out_dir=str(tmp_path),
        probe_every=0,
        strict=False,
        indicators=IndicatorConfig(collect_every=K),
        sinks={"enabled": []},
    )
    mon = FineLineMonitor(model=m, optimizer=opt, config=cfg)
    counter = SyncCounter(monkeypatch)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    for step in range(1, K):
        loss = m(x, labels=x).loss
        loss.backward()
        opt.step()
        counter.armed = True
        mon.step(step=step, loss=loss.detach(), tokens=step * 32, lr=1e-3)
        counter.armed = False
        opt.zero_grad()
    assert counter.total() == 0, dict(counter.calls)
    assert mon.indicators is not None and "indicators" not in mon.disabled_parts, mon.disabled_parts
    mon.close()
