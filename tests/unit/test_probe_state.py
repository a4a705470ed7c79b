"""A probe round changes no weight, gradient, optimizer state, train/eval mode or RNG stream."""

import contextlib
import copy
import random

import numpy as np
import pytest
import torch

from fineline_monitor.core.config import ProbeConfig
from fineline_monitor.probes import ProbeRunner
from fineline_monitor.probes._testing import build_tiny_model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    d = build_tiny_model(str(tmp_path_factory.mktemp("tiny")), n_positions=128)
    return AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)


def _rng_snapshot():
    return (random.getstate(), np.random.get_state(), torch.get_rng_state().clone())


def _draws():
    return (random.random(), float(np.random.rand()), float(torch.rand(1)))


def test_round_leaves_training_state_untouched(hf):
    model, tok = hf
    model.train()
    model.transformer.h[0].eval()  # a mixed mode must come back mixed, not all-train
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()  # optimizer state exists
    model(input_ids=x, labels=x).loss.backward()  # and gradients are populated
    runner = ProbeRunner(
        ProbeConfig(tasks=["piqa:rc_0shot", "gsm8k:gold_bpb_5shot"], docs_per_task=4, batch_size=4),
        model=model,
        tokenizer=tok,
    )

    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt_state = copy.deepcopy(opt.state_dict())
    modes = {n: m.training for n, m in model.named_modules()}
    rng = _rng_snapshot()

    rnd = runner.run(step=3)
    assert len(rnd.requests) == 12

    assert {n: m.training for n, m in model.named_modules()} == modes
    assert any(modes.values()) and not all(modes.values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, grads[n]), n
    new_opt = opt.state_dict()
    for pid, st in opt_state["state"].items():
        for key, val in st.items():
            assert torch.equal(new_opt["state"][pid][key], val)
    after = _rng_snapshot()
    assert after[0] == rng[0]
    assert (
        after[1][0] == rng[1][0]
        and np.array_equal(after[1][1], rng[1][1])
        and after[1][2:] == rng[1][2:]
    )
    assert torch.equal(after[2], rng[2])
    # the next draws are exactly those of a run without the probe round
    got = _draws()
    random.setstate(rng[0]), np.random.set_state(rng[1]), torch.set_rng_state(rng[2])
    assert got == _draws()


def test_state_restored_even_when_scoring_fails(hf):
    model, tok = hf
    model.train()
    runner = ProbeRunner(
        ProbeConfig(tasks=["piqa:rc_0shot"], docs_per_task=2, batch_size=2),
        model=model,
        tokenizer=tok,
    )
    runner.scorer.score_tokens = lambda batch: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore
    torch.manual_seed(5)
    rng = torch.get_rng_state().clone()
    with pytest.raises(RuntimeError, match="boom"):
        runner.run(step=0)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


def test_hooks_context_sees_the_probe_forwards(hf):
    model, tok = hf
    runner = ProbeRunner(
        ProbeConfig(tasks=["arc_easy:rc_0shot"], docs_per_task=3, batch_size=2),
        model=model,
        tokenizer=tok,
    )
    seen = {"calls": 0, "entered": 0, "inference": []}

    @contextlib.contextmanager
    def hooks():
        def hook(mod, inp, out):
            seen["calls"] += 1
            seen["inference"].append(torch.is_inference_mode_enabled())

        seen["entered"] += 1
        h = model.transformer.h[0].attn.register_forward_hook(hook)
        try:
            yield
        finally:
            h.remove()

    runner.run(step=0, hooks=hooks())
    assert seen["entered"] == 1 and seen["calls"] >= 1 and all(seen["inference"])


def test_padding_rows_of_a_short_rank_do_not_double_scores(hf):
    """With rows dealt over 2 data-parallel ranks, the shorter rank pads with a copy of its
    last row (every rank must run the same number of forwards). The copy's scores must not
    be added to the requests it copies."""
    from fineline_monitor.distributed import DistContext

    model, tok = hf
    model.eval()  # score_batches is called directly here, outside the round's own eval()
    cfg = ProbeConfig(tasks=["piqa:rc_0shot", "arc_easy:rc_0shot"], docs_per_task=3, batch_size=1)
    single = ProbeRunner(cfg, model=model, tokenizer=tok)
    single._ensure_batches()
    ref = single.scorer.score_batches(single._batches)
    n_rows = len(single.rows)
    if n_rows % 2 == 0:  # make the row count odd so that rank 1 needs padding
        cfg = ProbeConfig(
            tasks=["piqa:rc_0shot", "arc_easy:rc_0shot"], docs_per_task=2, batch_size=1
        )
        single = ProbeRunner(cfg, model=model, tokenizer=tok)
        single._ensure_batches()
        ref = single.scorer.score_batches(single._batches)
        n_rows = len(single.rows)
    assert n_rows % 2 == 1, n_rows
    seen = {}
    for rank in (0, 1):
        dist = DistContext(rank=rank, world_size=2, dp_rank=rank, dp_size=2)
        r = ProbeRunner(cfg, model=model, tokenizer=tok, dist=dist)
        r._ensure_batches()
        local = r.scorer.score_batches(r._batches)
        for k, (lp, n, _greedy) in local.items():
            if k < 0:
                continue  # padding
            assert n == ref[k][1] and abs(lp - ref[k][0]) < 1e-4, (rank, k, lp, ref[k])
            seen[k] = lp
    assert set(seen) == set(ref)
