"""Probe-round indicators against explicit computations from the model weights.

Attention logits are recomputed here by hand (q and k from the projection weights, RoPE
for Llama, grouped-query heads, causal + padding masks) and compared to what the hooks
recorded during an ordinary forward pass.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fineline_monitor.core.config import IndicatorConfig
from fineline_monitor.indicators import StepIndicators
from fineline_monitor.indicators.attention import max_attention_logit

torch.set_num_threads(1)


def gpt2(attn="eager", n_layer=3):
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=n_layer,
        n_head=4,
        n_embd=32,
        vocab_size=97,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg._attn_implementation = attn
    m = GPT2LMHeadModel(cfg).eval()
    # Make the logits non-trivial (init is small; scale q/k weights up a little).
    with torch.no_grad():
        for blk in m.transformer.h:
            blk.attn.c_attn.weight.mul_(4.0)
    return m


def llama(attn="sdpa"):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    cfg._attn_implementation = attn
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return m


def batch(seed=0, B=3, T=12, lengths=(12, 9, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 97, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return x, mask


def explicit_max(q, k, scale, mask2d):
    """Brute force: max over b, h, i, j<=i with key j a real token (q, k: [B, H, T, D])."""
    B, H, T, _ = q.shape
    best = -math.inf
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    for b in range(B):
        for i in range(T):
            for j in range(i + 1):
                if mask2d[b, j]:
                    best = max(best, float(s[b, :, i, j].max()))
    return best


def run_probe(model, batches, cfg=None, optimizer=None):
    ind = StepIndicators(model, optimizer, cfg or IndicatorConfig())
    ctx = ind.probe_context()
    outs = []
    for x, mask in batches:
        with ctx, torch.no_grad():
            outs.append(model(input_ids=x, attention_mask=mask))
    return ind, ind.probe_round_metrics(ctx), outs


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_attention_logits_match_explicit_qk(attn):
    m = gpt2(attn)
    x, mask = batch()
    ind, met, _ = run_probe(m, [(x, mask)])
    assert [a[0] for a in ind.attention] == ["h.0", "h.1", "h.2"]
    with torch.no_grad():
        hs = m(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states
        per_layer = []
        for i, blk in enumerate(m.transformer.h):
            q, k, _ = blk.attn.c_attn(blk.ln_1(hs[i])).split(32, dim=2)
            q = q.view(3, 12, 4, 8).transpose(1, 2)
            k = k.view(3, 12, 4, 8).transpose(1, 2)
            per_layer.append(explicit_max(q, k, 8**-0.5, mask))
    for i, v in enumerate(per_layer):
        assert met[f"stability/attn_logit_max/h.{i}"] == pytest.approx(v, rel=1e-4, abs=1e-5)
    assert met["stability/attn_logit_max"] == pytest.approx(max(per_layer), rel=1e-4)
    # a real signal, not zero: the largest logit is well away from 0
    assert abs(met["stability/attn_logit_max"]) > 0.5


def test_hooks_do_not_change_outputs_and_are_removed():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.gpt2 import modeling_gpt2

    before_eager = modeling_gpt2.eager_attention_forward
    before_sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    m = gpt2("sdpa")
    x, mask = batch()
    with torch.no_grad():
        ref = m(input_ids=x, attention_mask=mask).logits
    _, _, outs = run_probe(m, [(x, mask)])
    torch.testing.assert_close(outs[0].logits, ref)
    assert modeling_gpt2.eager_attention_forward is before_eager
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before_sdpa


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_gqa_rope_attention_logits_match_explicit_qk(attn):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m = llama(attn)
    x, mask = batch(seed=3)
    ind, met, _ = run_probe(m, [(x, mask)])
    assert [a[0] for a in ind.attention] == ["layers.0", "layers.1"]
    with torch.no_grad():
        hs = m(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states
        pos = torch.arange(12).unsqueeze(0)
        for i, layer in enumerate(m.model.layers):
            h = layer.input_layernorm(hs[i])
            q = layer.self_attn.q_proj(h).view(3, 12, 4, 8).transpose(1, 2)
            k = layer.self_attn.k_proj(h).view(3, 12, 2, 8).transpose(1, 2)
            cos, sin = m.model.rotary_emb(h, pos)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(2, dim=1)  # kv head j serves query heads 2j, 2j+1
            want = explicit_max(q, k, 8**-0.5, mask)
            assert met[f"stability/attn_logit_max/layers.{i}"] == pytest.approx(
                want, rel=1e-4, abs=1e-5
            )


def test_output_logit_stats_and_activation_rms_match_direct_computation():
    m = gpt2("sdpa")
    b1, b2 = batch(seed=1), batch(seed=2, lengths=(7, 12, 3))
    _, met, outs = run_probe(m, [b1, b2])  # entered twice: statistics accumulate over the round
    zmax, lse_sum, lse_n = -math.inf, 0.0, 0
    sumsq = [0.0, 0.0]
    count = [0, 0]
    with torch.no_grad():
        for (x, mask), out in zip((b1, b2), outs):
            keep = mask.bool()
            z = out.logits.double()
            zmax = max(zmax, float(z[keep].max()))
            lse = torch.logsumexp(z, dim=-1)
            lse_sum += float(lse[keep].sum())
            lse_n += int(keep.sum())
            hs = m(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states
            for i in range(
                2
            ):  # hidden_states[i+1] is block i's output (the last one has ln_f applied)
                h = hs[i + 1].double()
                sumsq[i] += float(h[keep].pow(2).sum())
                count[i] += int(keep.sum()) * h.shape[-1]
    assert met["stability/output_logit_max"] == pytest.approx(zmax, rel=1e-5)
    assert met["stability/output_logsumexp_mean"] == pytest.approx(lse_sum / lse_n, rel=1e-5)
    for i in range(2):
        assert met[f"stability/act_rms/h.{i}"] == pytest.approx(
            math.sqrt(sumsq[i] / count[i]), rel=1e-5
        )
    assert "stability/act_rms/h.2" in met


class MHABlock(torch.nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.ff = torch.nn.Linear(16, 16)

    def forward(self, x, mask, kpm):
        return (
            self.ff(self.attn(x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=False)[0])
            + x
        )


class MHAModel(torch.nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.emb = torch.nn.Embedding(97, 16)
        self.blocks = torch.nn.ModuleList([MHABlock(batch_first) for _ in range(2)])
        self.out = torch.nn.Linear(16, 50)

    def forward(self, x, kpm=None):
        T = x.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # True = not allowed (torch convention)
        h = self.emb(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        for blk in self.blocks:
            h = blk(h, causal, kpm)
        return self.out(h)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_logits_match_explicit_qk(batch_first):
    torch.manual_seed(0)
    m = MHAModel(batch_first).eval()
    x, mask = batch(seed=4, T=10, lengths=(10, 6, 8))
    kpm = ~mask.bool()  # True = padding (torch convention)
    ind = StepIndicators(m, None, IndicatorConfig())
    assert [(a[0], a[1]) for a in ind.attention] == [("blocks.0", "mha"), ("blocks.1", "mha")]
    ctx = ind.probe_context()
    with ctx, torch.no_grad():
        m(x, kpm)
    met = ind.probe_round_metrics(ctx)
    with torch.no_grad():
        h = m.emb(x)
        for i, blk in enumerate(m.blocks):
            W, bias = blk.attn.in_proj_weight, blk.attn.in_proj_bias
            q = (h @ W[:16].T + bias[:16]).view(3, 10, 4, 4).transpose(1, 2)
            k = (h @ W[16:32].T + bias[16:32]).view(3, 10, 4, 4).transpose(1, 2)
            want = explicit_max(q, k, 4**-0.5, mask)
            assert met[f"stability/attn_logit_max/blocks.{i}"] == pytest.approx(
                want, rel=1e-4, abs=1e-5
            )
            hh = h if batch_first else h.transpose(0, 1)
            hh = blk(hh, torch.ones(10, 10, dtype=torch.bool).triu(1), kpm)
            h = hh if batch_first else hh.transpose(0, 1)


def test_max_attention_logit_kernel_chunks_and_masks(monkeypatch):
    import fineline_monitor.indicators.attention as A

    g = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(5, 4, 7, 8, generator=g),
        torch.randn(5, 2, 9, 8, generator=g),
    )  # Tq < Tk (cache)
    allowed = torch.rand(5, 1, 1, 9, generator=g) > 0.3
    ref = A.max_attention_logit(q, k, 0.3, causal=True, allowed=allowed)
    monkeypatch.setattr(A, "_CHUNK_ELEMS", 4 * 7 * 9)  # one batch element per chunk
    assert float(A.max_attention_logit(q, k, 0.3, causal=True, allowed=allowed)) == float(ref)
    kk = k.repeat_interleave(2, dim=1)
    s = torch.einsum("bhid,bhjd->bhij", q, kk) * 0.3
    ok = torch.ones(7, 9, dtype=torch.bool).tril(diagonal=2) & allowed
    assert float(ref) == pytest.approx(float(s.masked_fill(~ok, -math.inf).max()), rel=1e-6)
    assert float(max_attention_logit(q, k, 0.3, causal=False)) == pytest.approx(
        float(s.max()), rel=1e-6
    )


# ---- megatron-core -------------------------------------------------------------------------


@pytest.fixture
def megatron_cpu(monkeypatch):
    """A real megatron-core DotProductAttention on the CPU (the two CUDA-only spots patched
    for this test only, as fineline_monitor.integrations.megatron_cpu_patches does)."""
    import contextlib
    import types

    mc = pytest.importorskip("megatron.core")
    from megatron.core import utils as mcore_utils
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    monkeypatch.setattr(
        mcore_utils.GlobalMemoryBuffer,
        "get_tensor",
        lambda self, shape, dtype, name, mem_alloc_context=None: torch.empty(
            tuple(shape), dtype=dtype
        ),
    )
    monkeypatch.setattr(
        mrandom.CudaRNGStatesTracker, "fork", lambda self, name="x": contextlib.nullcontext()
    )
    monkeypatch.setattr(
        mc.parallel_state, "get_global_memory_buffer", lambda: mcore_utils.GlobalMemoryBuffer()
    )
    pg = ProcessGroupCollection()
    pg.tp = types.SimpleNamespace(size=lambda: 1, rank=lambda: 0)

    def build(layer_number, scaling):
        cfg = TransformerConfig(
            num_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_query_groups=2,
            apply_query_key_layer_scaling=scaling,
            masked_softmax_fusion=False,
            attention_softmax_in_fp32=True,
            attention_dropout=0.0,
        )
        return DotProductAttention(
            cfg,
            layer_number=layer_number,
            attn_mask_type=AttnMaskType.causal,
            attention_type="self",
            pg_collection=pg,
        )

    return build, AttnMaskType


@pytest.mark.parametrize("scaling", [False, True])
def test_megatron_dot_product_attention_logits_match_explicit_qk(megatron_cpu, scaling):
    build, AttnMaskType = megatron_cpu

    class Layer(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.core_attention = build(n, scaling)

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer(1), Layer(2)])
            self.proj = torch.nn.Linear(4, 4)  # gives the stack parameters, like a real model

    model = Stack()
    for layer in model.layers:
        layer.core_attention.register_parameter("w", torch.nn.Parameter(torch.zeros(1)))
    ind = StepIndicators(model, None, IndicatorConfig())
    assert [(a[0], a[1]) for a in ind.attention] == [
        ("layers.0", "megatron"),
        ("layers.1", "megatron"),
    ]
    g = torch.Generator().manual_seed(0)
    sq, b = 6, 2
    qs = [torch.randn(sq, b, 4, 8, generator=g) * 3 for _ in range(2)]
    ks = [torch.randn(sq, b, 2, 8, generator=g) * 3 for _ in range(2)]
    vs = [torch.randn(sq, b, 2, 8, generator=g) for _ in range(2)]
    # The scores the module itself feeds its softmax (softmax_scale already applied; with
    # layer scaling the softmax multiplies by the layer number again).
    seen = {}
    for i, layer in enumerate(model.layers):
        layer.core_attention.scale_mask_softmax.register_forward_pre_hook(
            lambda mod, args, i=i: seen.__setitem__(
                i, args[0].detach().clone() * (mod.scale or 1.0)
            )
        )
    # megatron's mask convention: True = masked out. Causal everywhere, and in batch row 1
    # the last two keys are padding.
    causal = torch.ones(sq, sq, dtype=torch.bool).tril()
    allowed = causal.expand(b, 1, sq, sq).clone()
    allowed[1, :, :, -2:] = False
    ctx = ind.probe_context()
    with ctx, torch.no_grad():
        for i, layer in enumerate(model.layers):
            layer.core_attention(qs[i], ks[i], vs[i], ~allowed, attn_mask_type=AttnMaskType.causal)
    met = ind.probe_round_metrics(ctx)
    causal = allowed
    for i in range(2):
        q = qs[i].permute(1, 2, 0, 3).double()
        k = ks[i].permute(1, 2, 0, 3).repeat_interleave(2, dim=1).double()
        want = float(
            (torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(8))
            .masked_fill(~causal, -math.inf)
            .max()
        )
        got = met[f"stability/attn_logit_max/layers.{i}"]
        assert got == pytest.approx(want, rel=1e-5)
        # and the module's own pre-softmax logits agree
        assert got == pytest.approx(float(seen[i].masked_fill(~causal, -math.inf).max()), rel=1e-5)


# ---- optimizer state -----------------------------------------------------------------------


def _trained_gpt2(steps=3):
    m = gpt2("sdpa", n_layer=2).train()
    decay = [p for n, p in m.named_parameters() if p.dim() >= 2]
    other = [p for n, p in m.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "name": "decay", "eps": 1e-6},
            {"params": other, "weight_decay": 0.0, "eps": 1e-8},
        ],
        lr=1e-3,
    )
    x, mask = batch(seed=5)
    for _ in range(steps):
        opt.zero_grad()
        m(input_ids=x, attention_mask=mask, labels=x).loss.backward()
        opt.step()
    return m, opt


def test_grad_rms_vs_eps_and_second_moment_match_direct_computation():
    m, opt = _trained_gpt2()
    ind = StepIndicators(m, opt, IndicatorConfig(attention_hooks=False))
    ctx = ind.probe_context()  # grads of the last step are still in .grad
    met = ind.probe_round_metrics(ctx)
    ratios = []
    for name, g in zip(("decay", "1"), opt.param_groups):
        grads = [p.grad.double() for p in g["params"]]
        n = sum(t.numel() for t in grads)
        rms = math.sqrt(sum(float(t.pow(2).sum()) for t in grads) / n)
        assert met[f"optim/grad_rms/{name}"] == pytest.approx(rms, rel=1e-5)
        ratios.append(rms / g["eps"])
        vs = [opt.state[p]["exp_avg_sq"].double() for p in g["params"]]
        assert met[f"optim/exp_avg_sq_mean/{name}"] == pytest.approx(
            sum(float(v.sum()) for v in vs) / n, rel=1e-5
        )
        bc = 1 - g["betas"][1] ** 3
        below = sum(int((torch.sqrt(v / bc) < g["eps"]).sum()) for v in vs)
        assert met[f"optim/v_below_eps_frac/{name}"] == pytest.approx(below / n, abs=1e-6)
    assert met["optim/grad_rms_over_eps_min"] == pytest.approx(min(ratios), rel=1e-5)
    assert met["optim/adam_eps"] == 1e-8

    # after zero_grad(set_to_none) the RMS comes from Adam's bias-corrected second moment
    opt.zero_grad(set_to_none=True)
    met2 = ind.probe_round_metrics(ind.probe_context())
    for name, g in zip(("decay", "1"), opt.param_groups):
        vs = [opt.state[p]["exp_avg_sq"].double() for p in g["params"]]
        n = sum(v.numel() for v in vs)
        bc = 1 - g["betas"][1] ** 3
        assert met2[f"optim/grad_rms/{name}"] == pytest.approx(
            math.sqrt(sum(float(v.sum()) for v in vs) / n / bc), rel=1e-5
        )


def test_hutchinson_trace_exact_for_diagonal_hessian():
    w = torch.nn.Parameter(torch.randn(50))
    a = torch.rand(50) * 3
    model = torch.nn.Module()
    model.w = w
    ind = StepIndicators(
        model, None, IndicatorConfig(hessian_trace=True, hessian_samples=3, attention_hooks=False)
    )
    ind.set_hessian_batch(lambda: 0.5 * (a * w * w).sum() + (w.sin()).sum() * 0)
    met = ind.probe_round_metrics(ind.probe_context())
    # v^T diag(a) v = sum(a) for every Rademacher v: exact, not just in expectation
    assert met["optim/hessian_trace"] == pytest.approx(float(a.sum()), rel=1e-5)
    assert w.grad is None  # .grad untouched


def test_hutchinson_trace_matches_exact_trace_on_a_small_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x, y = torch.randn(16, 3), torch.randn(16, 1)

    def loss_fn():
        return torch.nn.functional.mse_loss(net(x), y)

    params = list(net.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    sizes = [p.numel() for p in params]

    def f(v):
        ps = torch.split(v, sizes)
        h = torch.tanh(x @ ps[0].view(4, 3).T + ps[1])
        return torch.nn.functional.mse_loss(h @ ps[2].view(1, 4).T + ps[3], y)

    H = torch.autograd.functional.hessian(f, flat.double().float())
    exact = float(torch.diagonal(H).sum())
    S = 2000
    sigma = math.sqrt(2 * float((H.pow(2).sum() - torch.diagonal(H).pow(2).sum())) / S)
    ind = StepIndicators(
        net, None, IndicatorConfig(hessian_trace=True, hessian_samples=S, attention_hooks=False)
    )
    ind.set_hessian_batch(loss_fn)
    est = ind.probe_round_metrics(ind.probe_context())["optim/hessian_trace"]
    assert abs(est - exact) < 4 * sigma + 1e-6, (est, exact, sigma)
