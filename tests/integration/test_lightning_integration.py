"""Lightning on two CPU ranks (DDP over gloo) with the fineline callback: one monitor step
per optimizer step under gradient accumulation, probes recorded."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ds_helpers as H  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_lightning_callback_two_ranks(tmp_path):
    out = tmp_path / "pl"
    p = H.torchrun(
        "examples/lightning_pretrain.py",
        ["--steps", "4", "--probe-every", "2", "--out", str(out)],
        timeout=200,
    )
    assert p.returncode == 0, H.tail(p)
    assert "[lightning] steps=4 disabled={}" in p.stdout, H.tail(p)
    con = sqlite3.connect(out / "run.db")
    assert [r[0] for r in con.execute("select step from probe_rounds order by step")] == [1, 2, 4]
    steps = [
        r[0] for r in con.execute("select step from metrics where name='train/loss' order by step")
    ]
    assert steps == [1, 2, 3, 4]  # once per optimizer step, not per accumulated batch
