"""megatron-core on two CPU ranks (gloo, the two CUDA-only spots patched): TP=2 trains,
probes and records; its per-request log-probabilities equal a TP=1 run of the same
(merged) weights; a rank failing inside a probe round does not hang its TP peer."""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ds_helpers as H  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_tp2_trains_probes_records_and_matches_tp1(tmp_path):
    out = tmp_path / "tp2"
    p = H.torchrun(
        "examples/megatron_core_pretrain.py",
        [
            "--tp",
            "2",
            "--steps",
            "4",
            "--probe-every",
            "2",
            "--out",
            str(out),
            "--cpu-patches",
            "--save-weights",
        ],
        timeout=200,
    )
    assert p.returncode == 0, H.tail(p)
    assert "[megatron tp2 pp1] steps=4 disabled={}" in p.stdout, H.tail(p)
    con = sqlite3.connect(out / "run.db")
    assert [r[0] for r in con.execute("select step from probe_rounds order by step")] == [1, 2, 4]
    metrics = {r[0] for r in con.execute("select distinct name from metrics")}
    for m in (
        "train/loss",
        "optim/grad_norm",
        "probe/arc_easy:rc_0shot/acc",
        "stability/attn_logit_max",
    ):
        assert m in metrics, sorted(metrics)
    # Re-score the merged weights with TP=1 in one process.
    one = tmp_path / "tp1"
    one.mkdir()
    shutil.copytree(out / "tokenizer", one / "tokenizer")
    q = H.torchrun(
        "examples/megatron_core_pretrain.py",
        [
            "--tp",
            "1",
            "--out",
            str(one),
            "--cpu-patches",
            "--load-weights",
            str(out / "weights.pt"),
        ],
        nproc=1,
        timeout=120,
    )
    assert q.returncode == 0, H.tail(q)
    a, b = H.request_logprobs(H.load_round(out)), H.request_logprobs(H.load_round(one))
    assert set(a) == set(b) and len(a) > 20
    worst = max(abs(a[k] - b[k]) for k in a)
    assert worst < 1e-4, f"TP=2 vs TP=1 probe logprobs differ by {worst}"
    ga = {
        (r["task"], r["doc_id"], r["choice"]): r["is_greedy"] for r in H.load_round(out)["requests"]
    }
    gb = {
        (r["task"], r["doc_id"], r["choice"]): r["is_greedy"] for r in H.load_round(one)["requests"]
    }
    assert ga == gb

    # Probe-round stability indicators are the whole model's, not one TP rank's shard: the
    # vocab-parallel head's max logit and log-partition, and the attention maxima over all
    # heads, equal the TP=1 run's on the same weights (TP=2's last round is at step 4).
    def stability(path, step):
        rows = sqlite3.connect(path / "run.db").execute(
            "select name, value from metrics where step = ? and name like 'stability/%'", (step,)
        )
        return dict(rows)

    # `params` in the run metadata is the whole model's on both (TP duplicates counted once)
    def params(path):
        return json.loads(
            sqlite3.connect(path / "run.db").execute("select meta from runs").fetchone()[0]
        )["params"]

    assert params(out) == params(one) > 0

    s2, s1 = stability(out, 4), stability(one, 0)
    for name in (
        "stability/output_logit_max",
        "stability/output_logsumexp_mean",
        "stability/attn_logit_max",
    ):
        assert name in s2 and name in s1, (sorted(s2), sorted(s1))
        assert abs(s2[name] - s1[name]) <= 1e-4 * max(1.0, abs(s1[name])), (
            name,
            s2[name],
            s1[name],
        )


def test_tp_rank_failing_inside_probe_round_does_not_hang(tmp_path):
    out = tmp_path / "fail"
    p = H.torchrun(
        "examples/megatron_core_pretrain.py",
        [
            "--tp",
            "2",
            "--steps",
            "3",
            "--probe-every",
            "2",
            "--out",
            str(out),
            "--cpu-patches",
            "--fail-rank",
            "1",
        ],
        timeout=150,
    )
    assert p.returncode == 0, H.tail(p)
    assert "[megatron tp2 pp1] steps=3 disabled={'probes':" in p.stdout, H.tail(p)
    assert "injected probe failure before batch 1" in p.stderr, H.tail(p)
    con = sqlite3.connect(out / "run.db")
    assert con.execute("select count(*) from probe_rounds").fetchone()[0] == 0
