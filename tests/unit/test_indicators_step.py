"""Per-step indicators against direct computations (norms, ratios, z-score, counts)."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from fineline_monitor.core.config import IndicatorConfig
from fineline_monitor.indicators import StepIndicators

torch.set_num_threads(1)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.l1 = torch.nn.Linear(16, 32)
        self.l2 = torch.nn.Linear(32, 50)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(self.emb(x))))


def make(collect_every=5, **kw):
    torch.manual_seed(0)
    m = Tiny()
    decay = [p for n, p in m.named_parameters() if p.dim() >= 2]
    other = [p for n, p in m.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "name": "decay"}, {"params": other, "weight_decay": 0.0}],
        lr=3e-3,
        eps=1e-8,
    )
    ind = StepIndicators(m, opt, IndicatorConfig(collect_every=collect_every, **kw))
    return m, opt, ind


def train_step(m, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50, (4, 8), generator=g)
    y = torch.randint(0, 50, (4, 8), generator=g)
    loss = torch.nn.functional.cross_entropy(m(x).reshape(-1, 50), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return loss


def l2(ts):
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in ts))


def test_norms_and_update_ratios_match_direct_computation():
    m, opt, ind = make(collect_every=5)
    groups = [g["params"] for g in opt.param_groups]
    for step in range(1, 11):
        loss = train_step(m, opt, step)
        if step % 5 == 0:  # θ before the collect step's update
            before = [[p.detach().clone() for p in g] for g in groups]
        opt.step()
        grads = [p.grad for g in groups for p in g]
        ind.on_step(step=step, loss=loss, lr=3e-3, tokens=step * 32)
        if step % 5 == 0:
            out = ind.collect(step)
            # grad norm (computed by the indicators since none was given)
            assert out["optim/grad_norm"] == pytest.approx(l2(grads), rel=1e-5)
            # param norm, after the update
            assert out["optim/param_norm"] == pytest.approx(
                l2([p for g in groups for p in g]), rel=1e-5
            )
            # update ratio ||θ_t - θ_{t-1}|| / ||θ_t||, per group and global
            d = [[p.detach() - b for p, b in zip(g, bg)] for g, bg in zip(groups, before)]
            for name, dg, g in zip(("decay", "1"), d, groups):
                assert out[f"optim/update_ratio/{name}"] == pytest.approx(l2(dg) / l2(g), rel=1e-4)
            assert out["optim/update_ratio"] == pytest.approx(
                l2([t for dg in d for t in dg]) / l2([p for g in groups for p in g]), rel=1e-4
            )
            assert out["train/loss"] == pytest.approx(float(loss.detach()))
            assert out["train/lr"] == 3e-3 and out["train/tokens"] == step * 32


def test_framework_grad_norm_tensor_is_passed_through():
    m, opt, ind = make(collect_every=2)
    for step in (1, 2):
        loss = train_step(m, opt, step)
        gn = torch.nn.utils.clip_grad_norm_(m.parameters(), 1e9)
        opt.step()
        ind.on_step(step=step, loss=loss.detach(), grad_norm=gn * 0 + 123.0)
    out = ind.collect(2)
    assert out["optim/grad_norm"] == pytest.approx(123.0)


def test_missing_grads_are_handled():
    m, opt, ind = make(collect_every=2)
    for step in (1, 2):
        train_step(m, opt, step)
        opt.step()
        opt.zero_grad(set_to_none=True)  # grads gone before the monitor: no grad norm, no error
        ind.on_step(step=step, loss=1.0)
    out = ind.collect(2)
    assert "optim/grad_norm" not in out and "optim/nonfinite_grad" not in out
    assert out["train/loss"] == 1.0 and "optim/param_norm" in out


def test_loss_mean_and_z_score_match_direct_computation():
    cfg = IndicatorConfig(collect_every=4, loss_window=20)
    ind = StepIndicators(Tiny(), None, cfg)
    rng = np.random.default_rng(0)
    losses = list(3.0 + 0.05 * rng.standard_normal(40))
    losses[33] = 5.0  # a one-step spike between two collect steps (collects at 32, 36)
    hist = []
    for step, x in enumerate(losses, start=1):
        ind.on_step(step=step, loss=torch.tensor(x))
        if step % 4 == 0:
            out = ind.collect(step)
            zs = []
            for v in losses[step - 4 : step]:
                h = hist[-20:]
                if len(h) >= 10:
                    zs.append((v - np.mean(h)) / np.std(h, ddof=1))
                hist.append(v)
            assert out["train/loss_mean"] == pytest.approx(np.mean(hist[-20:]), rel=1e-6)
            if zs:
                assert out["train/loss_z"] == pytest.approx(max(zs), rel=1e-4)
            else:
                assert "train/loss_z" not in out
            if step == 36:
                assert out["train/loss_z"] > 20  # the spike at step 34 is seen at the next collect


def test_nonfinite_counts_skipped_steps_and_loss_scale():
    m, opt, ind = make(collect_every=6)
    losses = [1.0, float("nan"), 1.0, float("inf"), 1.0, 1.0]
    for step, x in enumerate(losses, start=1):
        train_step(m, opt, step)
        skipped = step == 5
        if step in (3, 5):
            m.l1.weight.grad[0, 0] = float(
                "inf"
            )  # step 3 applied it, step 5 was skipped (fp16 overflow)
        ind.on_step(
            step=step,
            loss=torch.tensor(x),
            loss_scale=torch.tensor(2.0 ** (16 - step)),
            skipped=skipped,
        )
    out = ind.collect(6)
    assert out["optim/nonfinite_loss"] == 2
    assert out["optim/nonfinite_grad"] == 1  # the skipped overflow step is not counted here
    assert out["optim/skipped_steps"] == 1
    assert out["optim/loss_scale"] == 2.0**10
    assert out["train/loss"] == 1.0
    # non-finite losses stay out of the rolling window
    assert out["train/loss_mean"] == 1.0
    # next window starts clean; a float loss scale passes through too
    for step in range(7, 13):
        train_step(m, opt, step)
        ind.on_step(step=step, loss=2.0, loss_scale=1024.0)
    out = ind.collect(12)
    assert out["optim/nonfinite_loss"] == 0 and out["optim/nonfinite_grad"] == 0
    assert out["optim/skipped_steps"] == 0 and out["optim/loss_scale"] == 1024.0


def test_tokens_per_second_from_batch_tokens(monkeypatch):
    clock = iter(np.arange(0.0, 100.0, 0.5))
    monkeypatch.setattr(
        "fineline_monitor.indicators.step.time.perf_counter", lambda: float(next(clock))
    )
    ind = StepIndicators(Tiny(), None, IndicatorConfig(collect_every=4))
    for step in range(1, 9):
        ind.on_step(step=step, loss=1.0, batch_tokens=100)
        if step % 4 == 0:
            out = ind.collect(step)
    # steps 5..8 at 0.5 s each, 100 tokens each; reference is step 4's time and count
    assert out["train/tokens"] == 800 and out["train/tokens_per_s"] == pytest.approx(200.0)


def test_group_names_use_name_else_index():
    m, opt, ind = make()
    assert ind.group_names == ["decay", "1"]


def test_state_dict_round_trip_continues_identically():
    cfg = IndicatorConfig(collect_every=5, loss_window=15)
    a = StepIndicators(Tiny(), None, cfg)
    rng = np.random.default_rng(1)
    losses = list(2 + 0.1 * rng.standard_normal(30))
    for step in range(1, 16):
        a.on_step(step=step, loss=losses[step - 1], batch_tokens=10)
        if step % 5 == 0:
            a.collect(step)
    sd = a.state_dict()
    sd = json.loads(json.dumps(sd))  # JSON-able
    pickle.dumps(sd)
    b = StepIndicators(Tiny(), None, cfg)
    b.load_state_dict(sd)
    for step in range(16, 21):
        for ind in (a, b):
            ind.on_step(step=step, loss=losses[step - 1], batch_tokens=10)
    oa, ob = a.collect(20), b.collect(20)
    for k in ("train/loss_mean", "train/loss_z", "train/tokens"):
        assert oa[k] == ob[k]
    with pytest.raises(ValueError, match="version"):
        b.load_state_dict({"version": 99})
