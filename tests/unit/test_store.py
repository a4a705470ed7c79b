"""Run store: WAL mode, idempotent writes per (run, step, name), trajectory CSV export."""

import csv
import io
import math
import sqlite3

import pytest

from fineline_monitor.core.store import RunStore
from fineline_monitor.core.types import Alert, ProbeRound, RequestScore, TaskResult


def _round(step, acc):
    tr = TaskResult(
        task="hellaswag_rc",
        capability="commonsense",
        n_docs=10,
        metrics={"acc": acc, "bpb": 1.5},
        stderr={"acc": 0.1, "bpb": 0.02},
        random_baseline=0.25,
    )
    reqs = [
        RequestScore("hellaswag_rc", d, c, -3.0 - c, 5, 20, c == 0)
        for d in range(10)
        for c in range(4)
    ]
    return ProbeRound(
        step=step,
        tokens=step * 1000,
        tasks={"hellaswag_rc": tr},
        requests=reqs,
        seconds=1.0,
        tokens_scored=400,
        capability_scores={"commonsense": acc - 0.25},
    )


def test_wal_and_idempotent_rewrites(tmp_path):
    s = RunStore(tmp_path / "run.db", "r1")
    s.start_run("r1", {"a": 1}, {"params": 123})
    for _ in range(3):  # a resumed run re-logs the same steps
        for step in range(5):
            s.log_metrics(step, step * 10, {"train/loss": 5.0 - step, "train/lr": 0.1})
        s.log_probe(_round(4, 0.3))
        s.log_alert(Alert(rule="loss_spike", severity="warning", step=3, message="m"))
        s.log_phase(0, 0, "warmup", None)
    counts = s.row_counts()
    assert counts["metrics"] == 10 and counts["probe_results"] == 2 and counts["probe_docs"] == 40
    assert counts["alerts"] == 1 and counts["phases"] == 1
    assert s.query("PRAGMA journal_mode")[0][0] == "wal"
    assert [r[2] for r in s.series("train/loss")] == [5.0, 4.0, 3.0, 2.0, 1.0]
    # A later value for the same (run, step, name) replaces the old one.
    s.log_metrics(2, 20, {"train/loss": 9.0})
    assert s.series("train/loss")[2][2] == 9.0
    s.close()


def test_primary_keys_forbid_duplicates(tmp_path):
    s = RunStore(tmp_path / "run.db", "r")
    s.close()
    db = sqlite3.connect(tmp_path / "run.db")
    db.execute("INSERT INTO metrics VALUES ('r', 1, 'x', 1.0, 0)")
    try:
        db.execute("INSERT INTO metrics VALUES ('r', 1, 'x', 2.0, 0)")
        raise AssertionError("duplicate accepted")
    except sqlite3.IntegrityError:
        pass


def test_nan_stored_as_null_and_inf_kept(tmp_path):
    s = RunStore(tmp_path / "run.db", "r")
    s.start_run("r", {}, {})
    s.log_metrics(1, None, {"a": float("nan"), "b": float("inf")})
    vals = dict((n, v) for n, v in s.query("SELECT name, value FROM metrics"))
    assert vals["a"] is None and vals["b"] == float("inf")


def test_trajectory_csv_export(tmp_path):
    s = RunStore(tmp_path / "run.db", "r")
    s.start_run("r", {}, {"params": 3_000_000})
    s.log_probe(_round(10, 0.3))
    s.log_probe(_round(20, 0.4))
    buf = io.StringIO()
    n = s.export_trajectory_csv(buf)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert n == 4 == len(rows)
    assert list(rows[0]) == [
        "source",
        "model",
        "params",
        "step",
        "tokens",
        "task",
        "metric",
        "value",
        "stderr",
    ]
    accs = [(r["step"], r["value"]) for r in rows if r["metric"] == "acc"]
    assert accs == [("10", "0.3"), ("20", "0.4")]
    assert rows[0]["params"] == "3000000" and rows[0]["model"] == "r"


def test_readonly_store_reads_while_writer_open(tmp_path):
    w = RunStore(tmp_path / "run.db", "r")
    w.start_run("r", {}, {})
    w.log_metrics(1, 1, {"x": 1.0})
    r = RunStore(tmp_path / "run.db", readonly=True)
    assert r.runs() == ["r"] and r.series("x", "r") == [(1, 1, 1.0)]


def test_export_of_a_diverged_run_reads_back_for_analyze(tmp_path):
    """The trajectory CSV (docs/formats.md) is analyze's input *and* what the store exports. A NaN
    value (stored as NULL) is exported as `nan`, which the reader takes as a value; an
    empty value cell stays an error."""
    import subprocess
    import sys

    from fineline_monitor.core.trajectory import TrajectoryError, read_trajectory

    s = RunStore(tmp_path / "run.db", "r")
    s.start_run("r", {}, {"params": 3})
    for step, acc in ((10, 0.3), (20, 0.4), (30, float("nan"))):
        s.log_probe(_round(step, acc))
    s.close()
    out = tmp_path / "exp.csv"
    r = subprocess.run(
        [sys.executable, "-m", "fineline_monitor.cli", "export", str(tmp_path), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    acc = [c for c in read_trajectory(str(out)).curves if c.metric == "acc"][0]
    assert acc.values[:2].tolist() == [0.3, 0.4] and math.isnan(acc.values[2])
    r = subprocess.run(
        [sys.executable, "-m", "fineline_monitor.analyze", str(out), "--out", str(tmp_path / "an")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text(out.read_text().replace(",nan,", ",,", 1))
    with pytest.raises(TrajectoryError, match="column `value` must be a number"):
        read_trajectory(str(bad))
