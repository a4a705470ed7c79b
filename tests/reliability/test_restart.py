"""Restarts: a real training run killed with SIGKILL at a random step and resumed from its
last checkpoint (model + optimizer + monitor.state_dict()) ends with exactly the store of an
uninterrupted run (no row lost, none duplicated, the same losses), and an alert that was
paged before the kill is not paged again when the resumed run replays its step.

The pager is a real HTTP receiver on 127.0.0.1 counting POSTs (the webhook sink's
`generic` payload carries the alert); the kill waits until the page has arrived, so the
test checks re-paging, not a delivery race.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fineline_monitor.core.store import RunStore

SCRIPT = Path(__file__).with_name("restart_train.py")
STEPS, CKPT, ALERT_STEP = 30, 6, 14  # checkpoints after steps 5, 11, 17, ...; the alert at 14
AREA = "restarts (SIGKILL + resume)"
# Wall-clock metrics differ between any two runs; everything else must match exactly.
TIMING = ("per_s", "seconds", "time", "monitor/overhead")  # wall-clock figures differ run to run

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


class Pager:
    """A webhook receiver on loopback: counts pages per (step, rule)."""

    def __init__(self):
        self.pages = []
        pages = self.pages

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                pages.append((body["alert"]["step"], body["alert"]["rule"], body["dedup_key"]))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _run(out: Path, pager: Pager, *, kill_after_step=None, sleep=0.0, timeout=150):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", FINELINE_WEBHOOK_URL=pager.url)
    p = subprocess.Popen([sys.executable, str(SCRIPT), str(out), str(STEPS), str(CKPT), str(ALERT_STEP), str(sleep)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            if kill_after_step is not None and line.startswith(f"step {kill_after_step} "):
                # Wait for the page of the alert to arrive before killing (at most 20 s).
                t0 = time.time()
                while not pager.pages and time.time() - t0 < 20:
                    time.sleep(0.05)
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=30)
                return "killed"
        p.wait(timeout=max(1, deadline - time.time()))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert p.returncode == 0, p.stderr.read()[-4000:]
    return "done"


def _snapshot(db: Path):
    s = RunStore(db, readonly=True)
    try:
        metrics = s.query("SELECT step, name, value FROM metrics WHERE run='restart' ORDER BY step, name")
        metrics = [r for r in metrics if not any(t in r[1] for t in TIMING)]
        alerts = s.query("SELECT step, rule, key, severity FROM alerts WHERE run='restart' ORDER BY step, rule")
        dups = 0
        for table, key in (("metrics", "step, name"), ("alerts", "step, rule, key"), ("events", "step, kind, key")):
            dups += s.query(f"SELECT COUNT(*) FROM (SELECT COUNT(*) c FROM {table} GROUP BY run, {key} "
                            f"HAVING c > 1)")[0][0]
        return metrics, alerts, dups
    finally:
        s.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    pager = Pager()
    try:
        _run(out, pager)
    finally:
        pager.close()
    metrics, alerts, dups = _snapshot(out / "run.db")
    lines = (out / "alerts.jsonl").read_text().splitlines()
    return metrics, alerts, list(pager.pages), lines


@pytest.mark.parametrize("seed", [0])
def test_sigkill_resume_keeps_rows_and_alert_state(tmp_path, reference, seed, fault_table):
    ref_metrics, ref_alerts, ref_pages, ref_lines = reference
    assert any(rule == "nonfinite" and step == ALERT_STEP for step, rule, _, _ in ref_alerts), ref_alerts
    assert len(ref_pages) >= 1 and {(s, r) for s, r, _ in ref_pages} == {(s, r) for s, r, _, _ in ref_alerts}

    # Kill after the alert was paged but before the next checkpoint, so the resumed run
    # replays the alert's step from the checkpoint taken before it.
    next_ckpt = (ALERT_STEP // CKPT + 1) * CKPT - 1
    kill_at = random.Random(seed).randint(ALERT_STEP, next_ckpt - 1)
    pager = Pager()
    try:
        assert _run(tmp_path, pager, kill_after_step=kill_at, sleep=0.02) == "killed"
        pages_before_kill = list(pager.pages)
        assert _run(tmp_path, pager) == "done"
        pages = list(pager.pages)
    finally:
        pager.close()
    metrics, alerts, dups = _snapshot(tmp_path / "run.db")
    lost = len(set((s, n) for s, n, _ in ref_metrics) - set((s, n) for s, n, _ in metrics))
    extra = len(set((s, n) for s, n, _ in metrics) - set((s, n) for s, n, _ in ref_metrics))
    repaged = len(pages) - len(ref_pages)
    assert pages_before_kill, "the alert was not paged before the kill"
    assert dups == 0 and lost == 0 and extra == 0, (lost, dups, extra)
    # Same values: the resumed run recomputed the replayed steps bit for bit.
    assert metrics == ref_metrics
    assert alerts == ref_alerts
    assert (tmp_path / "alerts.jsonl").read_text().splitlines() == ref_lines
    assert sorted(pages) == sorted(ref_pages), f"re-paged after resume (killed after step {kill_at}): {pages}"
    assert repaged == 0, repaged
    fault_table.record(AREA, "SIGKILL at a seeded step after an alert was paged, resume from the last checkpoint",
                       "store identical to an uninterrupted run (rows, values, alerts); no re-page",
                       injected=1, survived=1)
