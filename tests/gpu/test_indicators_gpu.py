"""GPU twin of the no-host-sync test: torch.cuda.set_sync_debug_mode("error") makes any
synchronising call (item, .cpu(), nonzero, a blocking copy...) raise during on_step.
Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_head=4,
            n_embd=64,
            vocab_size=256,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).cuda()
    decay = [p for n, p in m.named_parameters() if p.dim() >= 2]
    other = [p for n, p in m.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "name": "decay"}, {"params": other, "weight_decay": 0.0}],
        lr=1e-3,
        fused=True,
    )
    return m, opt


@pytest.mark.parametrize("framework_grad_norm", [False, True])
def test_on_step_never_syncs_on_cuda(framework_grad_norm):
    from fineline_monitor.core.config import IndicatorConfig
    from fineline_monitor.indicators import StepIndicators

    K = 6
    m, opt = _model()
    ind = StepIndicators(m, opt, IndicatorConfig(collect_every=K))
    x = torch.randint(0, 256, (4, 32), device="cuda")
    scale = torch.tensor(65536.0, device="cuda")
    for step in range(1, 3 * K + 1):
        loss = m(x, labels=x).loss
        loss.backward()
        gn = (
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1e9, foreach=True)
            if framework_grad_norm
            else None
        )
        opt.step()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ind.on_step(
                step=step,
                loss=loss.detach(),
                lr=1e-3,
                tokens=step * 128,
                grad_norm=gn,
                loss_scale=scale,
                batch_tokens=128,
            )
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if step % K == 0:
            out = ind.collect(step)
            assert out["train/loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
            for key in (
                "optim/grad_norm",
                "optim/param_norm",
                "optim/update_ratio",
                "optim/update_ratio/decay",
            ):
                assert key in out and out[key] > 0
        opt.zero_grad(set_to_none=True)


def test_probe_round_on_cuda_matches_cpu():
    from fineline_monitor.core.config import IndicatorConfig
    from fineline_monitor.indicators import StepIndicators

    m, opt = _model()
    m.eval()
    x = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    res = {}
    for dev in ("cuda", "cpu"):
        m.to(dev)
        ind = StepIndicators(m, None, IndicatorConfig())
        ctx = ind.probe_context()
        with ctx, torch.no_grad():
            m(x.to(dev))
        res[dev] = ind.probe_round_metrics(ctx)
    assert res["cuda"].keys() == res["cpu"].keys()
    for k, v in res["cpu"].items():
        assert res["cuda"][k] == pytest.approx(v, rel=1e-3, abs=1e-4), k
