"""The scorer against lm-eval-harness 0.4.x's HF backend on real benchmark documents.

A small GPT-2-style model is built locally (BPE tokenizer trained on the probe text,
seeded init, save_pretrained); both this plugin and lm-eval's HFLM load it from disk and
score the identical (context, continuation) requests.
"""

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fineline_monitor.core.config import ProbeConfig
from fineline_monitor.probes import HFScorer, ProbeRunner, TorchScorer
from fineline_monitor.probes._testing import build_tiny_model

TASKS = [
    "hellaswag:rc_5shot",  # 5-shot contexts longer than the 256-token model: left truncation
    "arc_easy:rc_0shot",
    "piqa:rc_0shot",
    "winogrande:rc_0shot",  # winogrande: contexts differ per choice
    "boolq:rc_0shot",  # one-token continuations (lm-eval's logits cache path)
    "naturalqs_open:bpb_5shot",
]  # a gold-bpb task


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(2)
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")), n_positions=256)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def ours(hf):
    model, tok = hf
    runner = ProbeRunner(
        ProbeConfig(tasks=TASKS, docs_per_task=8, batch_size=8, seed=7), model=model, tokenizer=tok
    )
    return runner, runner.run(step=0)


@pytest.mark.slow
def test_matches_lm_eval_hflm(model_dir, ours):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    runner, rnd = ours
    assert (
        runner.scorer.supports_packing and runner.scorer.fast_head
    )  # the fast path is what is tested
    assert rnd.n_truncated > 0  # left truncation exercised
    lm = HFLM(pretrained=model_dir, device="cpu", batch_size=8)
    insts = [
        Instance(request_type="loglikelihood", doc={}, arguments=(q.context, q.continuation), idx=i)
        for i, q in enumerate(runner.requests)
    ]
    res = lm.loglikelihood(insts, disable_tqdm=True)
    assert len(res) == len(rnd.requests) > 100
    diffs = [abs(a[0] - b.logprob) for a, b in zip(res, rnd.requests)]
    assert max(diffs) < 1e-4, max(diffs)
    assert [a[1] for a in res] == [b.is_greedy for b in rnd.requests]
    # acc / acc_norm with lm-eval's formulas on lm-eval's numbers
    ll = {(q.task, q.doc_id, q.choice): res[i][0] for i, q in enumerate(runner.requests)}
    for name, entries in runner.docs.items():
        m = rnd.tasks[name].metrics
        assert rnd.tasks[name].n_docs == 8
        # gold bpb from lm-eval's own log-likelihoods: bits per UTF-8 byte of the gold
        # continuation (leading space included), averaged over documents
        gold_bpb = [
            -ll[(name, d.doc_id, d.gold if runner.tasks[name].kind == "mc" else 0)]
            / (
                math.log(2)
                * len(
                    d.continuations[d.gold if runner.tasks[name].kind == "mc" else 0].encode(
                        "utf-8"
                    )
                )
            )
            for d, _ in entries
        ]
        assert m["bpb"] == pytest.approx(float(np.mean(gold_bpb)), rel=1e-5, abs=1e-6), name
        if runner.tasks[name].kind != "mc":
            assert set(m) == {"bpb", "gold_logprob"}
            continue
        acc, accn = [], []
        for d, _ in entries:
            lls = np.array([ll[(name, d.doc_id, c)] for c in range(d.n_choices)])
            lens = np.array(
                [float(len(c[1:] if c.startswith(" ") else c)) for c in d.continuations]
            )
            acc.append(float(np.argmax(lls) == d.gold))
            accn.append(float(np.argmax(lls / lens) == d.gold))
        assert m["acc"] == np.mean(acc) and m["acc_norm"] == np.mean(accn), name


BOS_TASKS = ["arc_easy:rc_0shot", "piqa:rc_0shot", "boolq:rc_0shot", "naturalqs_open:bpb_5shot"]


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory):
    """The same tiny model with a tokenizer that prepends BOS to every encoding (as Llama's
    and OLMo's do)."""
    from tokenizers import Tokenizer, processors

    d = build_tiny_model(str(tmp_path_factory.mktemp("tiny_bos")), n_positions=256)
    path = Path(d) / "tokenizer.json"
    t = Tokenizer.from_file(str(path))
    bos = t.token_to_id("<|endoftext|>")
    t.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A",
        pair="<|endoftext|> $A $B",
        special_tokens=[("<|endoftext|>", bos)],
    )
    t.save(str(path))
    return d


@pytest.mark.slow
def test_matches_lm_eval_hflm_with_a_tokenizer_that_adds_bos(bos_model_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    model, tok = (
        AutoModelForCausalLM.from_pretrained(bos_model_dir),
        AutoTokenizer.from_pretrained(bos_model_dir),
    )
    assert (
        tok("The cat")["input_ids"][0]
        == tok.bos_token_id
        != tok("The cat", add_special_tokens=False)["input_ids"][0]
    )
    runner = ProbeRunner(
        ProbeConfig(tasks=BOS_TASKS, docs_per_task=6, batch_size=8, seed=3),
        model=model,
        tokenizer=tok,
    )
    rnd = runner.run(step=0)
    insts = [
        Instance(request_type="loglikelihood", doc={}, arguments=(q.context, q.continuation), idx=i)
        for i, q in enumerate(runner.requests)
    ]
    res = HFLM(pretrained=bos_model_dir, device="cpu", batch_size=8).loglikelihood(
        insts, disable_tqdm=True
    )
    diffs = [abs(a[0] - b.logprob) for a, b in zip(res, rnd.requests)]
    assert len(res) == len(rnd.requests) > 20 and max(diffs) < 1e-4, max(diffs)
    assert [a[1] for a in res] == [b.is_greedy for b in rnd.requests]
    # the BOS token changes the scores: the comparison above is not blind to it
    no_bos = HFLM(pretrained=bos_model_dir, device="cpu", batch_size=8, add_bos_token=False)
    res_no_bos = no_bos.loglikelihood(insts, disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(res, res_no_bos)) > 1e-3


def test_round_contents(ours):
    runner, rnd = ours
    assert list(rnd.tasks) == TASKS
    assert [(q.task, q.doc_id, q.choice) for q in rnd.requests] == [
        (q.task, q.doc_id, q.choice) for q in runner.requests
    ]  # input order
    for q in rnd.requests:
        assert q.n_tokens >= 1 and q.logprob < 0 and q.n_bytes >= 1
    assert set(rnd.gold_logprobs) == set(TASKS)
    assert all(len(v) == 8 for v in rnd.gold_logprobs.values())
    assert {k.split("/")[0] for k in rnd.capability_scores} == {
        "commonsense",
        "knowledge",
        "reading",
    }
    assert {"commonsense/bpb", "commonsense/acc_above_chance", "commonsense/headline"} <= set(
        rnd.capability_scores
    )
    assert (
        set(rnd.capability_stderr) <= set(rnd.capability_scores)
        and "commonsense/bpb" in rnd.capability_stderr
    )
    assert rnd.tokens_scored == runner.tokens_per_round > 0
    j = rnd.to_json()
    assert {"tasks", "requests", "seconds", "tokens_scored"} <= set(j)
    assert set(j["requests"][0]) == {
        "task",
        "doc_id",
        "choice",
        "logprob",
        "n_tokens",
        "n_bytes",
        "is_greedy",
    }
    # always answering the same: the share of the most common gold text of the scored docs
    for name, entries in runner.docs.items():
        golds = [d.continuations[d.gold] for d, _ in entries]
        share = max(golds.count(g) for g in golds) / len(golds)
        want = share if runner.tasks[name].kind == "mc" else 0.0
        assert rnd.tasks[name].constant_baseline == want, name
    assert rnd.tasks["boolq:rc_0shot"].constant_baseline >= 0.5  # " yes"/" no" on 8 docs
    assert rnd.tasks["arc_easy:rc_0shot"].constant_baseline <= 0.25  # per-document answer texts


def test_same_subset_every_round(ours):
    runner, rnd = ours
    again = runner.run(step=1)
    assert [q.doc_id for q in again.requests] == [q.doc_id for q in rnd.requests]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(again.requests, rnd.requests)) < 1e-5


def test_plain_torch_module_and_unpacked_path_agree(hf, ours):
    """A plain module (returns a logits tensor, callable tokenizer) takes the padded path."""
    model, tok = hf
    runner, rnd = ours

    class Plain(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m
            self.max_length = 256

        def forward(self, input_ids):
            return self.m(input_ids=input_ids).logits

    scorer = TorchScorer(Plain(model), lambda s: tok.encode(s), prefix_token_id=tok.bos_token_id)
    assert not scorer.supports_packing
    r2 = ProbeRunner(ProbeConfig(tasks=TASKS, docs_per_task=8, batch_size=5, seed=7), scorer=scorer)
    out = r2.run(step=0)
    assert [(q.task, q.doc_id, q.choice) for q in out.requests] == [
        (q.task, q.doc_id, q.choice) for q in rnd.requests
    ]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(out.requests, rnd.requests)) < 1e-4
    assert [a.is_greedy for a in out.requests] == [b.is_greedy for b in rnd.requests]


def test_self_check_falls_back_when_masks_are_ignored(hf):
    """A model that silently ignores custom masks / position ids must not get packed rows."""
    model, tok = hf

    class Ignoring(type(model)):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kw):
            return super().forward(
                input_ids=input_ids, **{k: v for k, v in kw.items() if k != "use_cache"}
            )

    bad = Ignoring(model.config)
    bad.load_state_dict(model.state_dict())
    bad.base_model.forward = lambda input_ids=None, **kw: model.base_model(
        input_ids=input_ids
    )  # ignores masks too
    s = HFScorer(bad, tok)
    s.prepare()
    assert not s.supports_packing
    assert min(s.check_report.values()) < 1e-3


def test_continuation_longer_than_context_skips_document(hf, tmp_path):
    model, tok = hf
    import json

    p = tmp_path / "long.jsonl"
    rows = [
        {
            "doc_id": 0,
            "idx": 0,
            "label": None,
            "request": {"context": "Q:", "continuation": " word" * 400},
        },
        {
            "doc_id": 1,
            "idx": 0,
            "label": None,
            "request": {"context": "Q:", "continuation": " short answer"},
        },
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = ProbeRunner(
        ProbeConfig(tasks=[], requests_files=[str(p)], docs_per_task=5), model=model, tokenizer=tok
    )
    assert r.n_skipped == {"long": 1}
    assert [q.doc_id for q in r.run(0).requests] == [1]
