"""Hugging Face Trainer on two CPU ranks (DDP over gloo) with FineLineCallback: trains,
probes at the first step and every 2 optimizer steps, records loss/grad_norm/lr."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ds_helpers as H  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_hf_trainer_callback_two_ranks(tmp_path):
    out = tmp_path / "hf"
    p = H.torchrun(
        "examples/hf_trainer.py",
        ["--steps", "4", "--probe-every", "2", "--out", str(out)],
        timeout=200,
    )
    assert p.returncode == 0, H.tail(p)
    assert "[hf-trainer] steps=4 disabled={}" in p.stdout, H.tail(p)
    con = sqlite3.connect(out / "run.db")
    assert [r[0] for r in con.execute("select step from probe_rounds order by step")] == [1, 2, 4]
    names = {r[0] for r in con.execute("select distinct name from metrics")}
    assert {"train/loss", "optim/grad_norm", "train/lr", "train/tokens"} <= names, sorted(names)
    # tokens from state.num_input_tokens_seen: 4 seqs x 64 tokens x 2 accumulation x 2 ranks per step
    toks = dict(con.execute("select step, value from metrics where name='train/tokens'").fetchall())
    assert toks[4] == 4 * 4 * 64 * 2 * 2
    # each step's loss and grad norm are the ones the Trainer logged for that very step
    # (on_log comes after on_step_end; stepping from on_step_end gave the previous step's)
    logged = {
        r["step"]: r for r in json.loads((out / "trainer_log.json").read_text()) if "loss" in r
    }
    assert sorted(logged) == [1, 2, 3, 4]
    for name, key in (("train/loss", "loss"), ("optim/grad_norm", "grad_norm")):
        got = dict(con.execute("select step, value from metrics where name=?", (name,)).fetchall())
        assert {s: round(got[s], 4) for s in logged} == {
            s: round(logged[s][key], 4) for s in logged
        }, name
