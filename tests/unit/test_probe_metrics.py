"""Metrics math on hand-built request scores (numpy only, no model)."""

import math

import numpy as np
import pytest

from fineline_monitor.core.types import RequestScore
from fineline_monitor.probes import metrics as M


def rs(lp, cont, choice=0):
    return RequestScore(
        task="t",
        doc_id=0,
        choice=choice,
        logprob=lp,
        n_tokens=1,
        n_bytes=len(cont.encode()),
        is_greedy=False,
        n_chars=M.n_chars_of(cont),
    )


def test_n_chars_drops_one_delimiter_space():
    assert M.n_chars_of(" cat") == 3
    assert M.n_chars_of("cat") == 3
    assert M.n_chars_of("  cat") == 4
    assert M.n_chars_of(" ") == 1


def test_acc_vs_acc_norm_disagree_as_lm_eval():
    # choice 0 has the higher total, choice 1 the higher per-character logprob
    docs = [rs(-1.0, " ab"), rs(-2.0, " abcdefghij")]
    o = M.doc_outcome(docs, gold=0)
    assert o["acc"] == 1.0 and o["acc_norm"] == 0.0
    assert M.doc_outcome(docs, gold=1)["acc_norm"] == 1.0
    assert o["bpb"] == pytest.approx(1.0 / (math.log(2) * 3))  # 3 UTF-8 bytes, space included
    assert o["gold_logprob"] == -1.0


def test_ties_pick_first_like_numpy_argmax():
    o = M.doc_outcome([rs(-1.0, " a"), rs(-1.0, " b")], gold=1)
    assert o["acc"] == 0.0


def test_task_result_means_and_stderr():
    outcomes = [1, 0, 1, 1]
    docs = []
    for i, right in enumerate(outcomes):
        gold_lp, other = (-1.0, -2.0) if right else (-2.0, -1.0)
        docs.append((i, 0, [rs(gold_lp, " x"), rs(other, " y", 1)]))
    r, gold = M.task_result("t", "reading", "mc", "acc", docs)
    assert r.metrics["acc"] == 0.75
    p, n = 0.75, 4
    assert r.stderr["acc"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))  # lm-eval mean_stderr
    bpbs = np.array([(-lp) / (math.log(2) * 2) for lp in (-1.0, -2.0, -1.0, -1.0)])
    assert r.metrics["bpb"] == pytest.approx(bpbs.mean())
    assert r.stderr["bpb"] == pytest.approx(bpbs.std(ddof=1) / 2)
    assert r.random_baseline == 0.5 and r.n_docs == 4
    assert gold == {0: -1.0, 1: -2.0, 2: -1.0, 3: -1.0}


def test_constant_baseline_is_the_share_of_the_most_common_gold_text():
    assert M.constant_baseline([" yes", " yes", " no", " yes"]) == 0.75
    assert M.constant_baseline([" a cat", " a dog", " a cow"]) == pytest.approx(1 / 3)
    assert M.constant_baseline([]) == 0.0
    docs = [(0, 0, [rs(-1.0, " yes"), rs(-2.0, " no", 1)])]
    assert M.task_result("t", "reading", "mc", "acc", docs, 0.62)[0].constant_baseline == 0.62
    assert (
        M.task_result("g", "math", "bpb", "bpb", [(0, 0, [rs(-1.0, " 4")])], 0.9)[
            0
        ].constant_baseline
        == 0.0
    )


def test_bpb_task_and_single_doc_has_no_stderr():
    r, _ = M.task_result("g", "math", "bpb", "bpb", [(7, 0, [rs(-10.0, " 42 apples")])])
    assert set(r.metrics) == {"bpb", "gold_logprob"}
    assert r.metrics["bpb"] == pytest.approx(10.0 / (math.log(2) * 10))
    assert r.stderr == {}


def test_capability_series_bpb_accuracy_above_chance_and_headline():
    from fineline_monitor.core.types import TaskResult

    res = {
        "a": TaskResult(
            "a",
            "commonsense",
            10,
            {"acc": 0.5, "acc_norm": 0.6, "bpb": 3.0},
            {"acc_norm": 0.1, "bpb": 0.3},
            random_baseline=0.25,
            primary_metric="acc_norm",
        ),
        "b": TaskResult(
            "b",
            "commonsense",
            10,
            {"acc": 0.7, "bpb": 2.0},
            {"acc": 0.1, "bpb": 0.4},
            random_baseline=0.5,
            primary_metric="acc",
        ),
        "d": TaskResult("d", "code", 10, {"bpb": 1.5}, {"bpb": 0.1}, primary_metric="bpb"),
        "e": TaskResult("e", "code", 10, {"bpb": 2.5}, {"bpb": 0.2}, primary_metric="bpb"),
        "f": TaskResult(
            "f",
            "math",
            10,
            {"acc": 0.27, "bpb": 4.0},
            {"acc": 0.1, "bpb": 0.1},
            random_baseline=0.25,
            primary_metric="acc",
        ),
    }
    s, se = M.capability_series(res)
    # bits per byte: the mean over the capability's tasks; its stderr that of a mean of means
    assert s["commonsense/bpb"] == pytest.approx(2.5) and se["commonsense/bpb"] == pytest.approx(
        0.25
    )
    assert s["code/bpb"] == pytest.approx(2.0) and se["code/bpb"] == pytest.approx(
        math.sqrt(0.05) / 2
    )
    # accuracy above chance: primary metric minus the random baseline, mean over MC tasks
    assert s["commonsense/acc_above_chance"] == pytest.approx(((0.6 - 0.25) + (0.7 - 0.5)) / 2)
    assert "code/acc_above_chance" not in s
    # took off (0.275 > 2 * 0.0707 + 0.02): the headline is accuracy; math (0.02 above
    # chance, stderr 0.1) has not: its headline is bits per byte
    assert (
        s["commonsense/took_off"] == 1.0
        and s["commonsense/headline"] == s["commonsense/acc_above_chance"]
    )
    assert s["math/took_off"] == 0.0 and s["math/headline"] == pytest.approx(4.0)
    assert s["code/took_off"] == 0.0 and s["code/headline"] == s["code/bpb"]
    assert M.capability_scores(res) == s
