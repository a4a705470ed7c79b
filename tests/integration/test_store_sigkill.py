"""A run killed with SIGKILL mid-run and resumed from its last checkpoint ends with the
same store as an uninterrupted run: no lost rows, no duplicated rows, same values."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fineline_monitor.core.store import RunStore

SCRIPT = Path(__file__).with_name("sigkill_train.py")
STEPS, CKPT = 120, 7


def _rows(db):
    s = RunStore(db, readonly=True)
    rows = s.query("SELECT step, name, value FROM metrics WHERE run='killme' ORDER BY step, name")
    # monitor/* are wall-clock measurements of the monitor itself (e.g. monitor/overhead):
    # they differ between any two runs, killed or not, so only the deterministic rows are compared
    rows = [r for r in rows if not r[1].startswith("monitor/")]
    dup = s.query(
        "SELECT COUNT(*) FROM (SELECT step, name, COUNT(*) c FROM metrics GROUP BY run, step, name "
        "HAVING c > 1)"
    )[0][0]
    s.close()
    return rows, dup


def _run(out, sleep, kill_after_line=None, timeout=120):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), str(STEPS), str(CKPT), str(sleep)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines = 0
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        lines += 1
        if kill_after_line is not None and lines >= kill_after_line:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
            return "killed", lines
    p.wait(timeout=max(1, deadline - time.time()))
    assert p.returncode == 0, p.stderr.read()
    return "done", lines


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_and_resume_loses_and_duplicates_nothing(tmp_path, seed):
    ref = tmp_path / "ref"
    _run(ref, 0.0)
    ref_rows, _ = _rows(ref / "run.db")
    # Without a model there are no indicators: loss, lr and tokens are recorded every step.
    assert {name for _, name, _ in ref_rows} >= {"train/loss", "train/lr", "train/tokens"}
    assert len({step for step, _, _ in ref_rows}) == STEPS

    rng = random.Random(seed)
    kill_at = rng.randint(CKPT + 1, STEPS - 10)
    victim = tmp_path / "victim"
    status, _ = _run(victim, 0.002, kill_after_line=kill_at)
    assert status == "killed"
    status, _ = _run(victim, 0.0)  # resume from the last checkpoint
    assert status == "done"
    rows, dup = _rows(victim / "run.db")
    assert dup == 0
    assert rows == ref_rows, f"killed at line {kill_at}: {len(rows)} rows vs {len(ref_rows)}"
