"""DeepSpeed on two CPU ranks (gloo): ZeRO stages 0-3 train, probe and record, and the
probe numbers equal a single-process re-score of the same weights; a rank that raises
inside a probe round does not hang the other one."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ds_helpers as H  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOCS = 8


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_trains_probes_records_and_matches_single_process(tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    p = H.torchrun(
        "examples/deepspeed_pretrain.py",
        [
            "--zero-stage",
            str(stage),
            "--steps",
            "4",
            "--probe-every",
            "2",
            "--out",
            str(out),
            "--docs-per-task",
            str(DOCS),
            "--save-weights",
        ],
        timeout=170,
    )
    assert p.returncode == 0, H.tail(p)
    assert f"[deepspeed zero{stage}] steps=4 disabled={{}}" in p.stdout, H.tail(p)
    con = sqlite3.connect(out / "run.db")
    # first step (probe_at_start anchors the curves) + steps 2 and 4
    rounds = [r[0] for r in con.execute("select step from probe_rounds order by step")]
    assert rounds == [1, 2, 4]
    metrics = {r[0] for r in con.execute("select distinct name from metrics")}
    assert "train/loss" in metrics and "optim/grad_norm" in metrics, sorted(metrics)[:40]
    assert any(m.startswith("probe/") for m in metrics), sorted(metrics)[:40]
    got = H.request_logprobs(H.load_round(out))
    ref = H.request_logprobs(H.rescore_hf(out, DOCS))
    assert set(got) == set(ref) and len(ref) > 20
    worst = max(abs(got[k] - ref[k]) for k in ref)
    assert worst < 1e-4, f"ZeRO-{stage} probe logprobs differ from single-process by {worst}"
    # `params` in the run metadata is the whole model's (ZeRO-3 partitions count in full)
    from transformers import GPT2Config, GPT2LMHeadModel

    meta = json.loads(con.execute("select meta from runs").fetchone()[0])
    assert meta["params"] == sum(
        p.numel() for p in GPT2LMHeadModel(GPT2Config.from_pretrained(out)).parameters()
    )


def test_rank_failing_inside_probe_round_does_not_hang(tmp_path):
    """Rank 1 raises before its 2nd probe batch (ZeRO-3: every batch is a collective).
    Both ranks agree before each batch, abort the round together, disable probes on every
    rank, and training finishes; the subprocess timeout is the hard bound."""
    out = tmp_path / "fail"
    p = H.torchrun(
        "examples/deepspeed_pretrain.py",
        [
            "--zero-stage",
            "3",
            "--steps",
            "3",
            "--probe-every",
            "2",
            "--out",
            str(out),
            "--docs-per-task",
            str(DOCS),
            "--fail-rank",
            "1",
        ],
        timeout=150,
    )
    assert p.returncode == 0, H.tail(p)
    assert "[deepspeed zero3] steps=3 disabled={'probes':" in p.stdout, H.tail(p)
    assert "injected probe failure before batch 1" in p.stderr, H.tail(p)
    con = sqlite3.connect(out / "run.db")
    metrics = {r[0] for r in con.execute("select distinct name from metrics")}
    assert not any(m.startswith("probe/") for m in metrics)
    assert con.execute("select count(*) from probe_rounds").fetchone()[0] == 0
    assert "train/loss" in metrics  # training and the per-step indicators went on
