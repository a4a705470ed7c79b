"""BackgroundWorker / BackgroundSink: never block, count drops, retry with backoff, bounded close."""

from __future__ import annotations

import threading
import time

from fineline_monitor.sinks.background import BackgroundSink, BackgroundWorker
from fineline_monitor.sinks.base import Sink


def test_submit_never_blocks_and_counts_drops():
    gate = threading.Event()
    w = BackgroundWorker("t-drop", lambda item: gate.wait(5), queue_size=3)
    t0 = time.perf_counter()
    results = [w.submit(i) for i in range(50)]
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, f"submit blocked for {elapsed:.2f}s"
    # one item in flight + 3 queued are accepted at most; the rest are dropped and counted
    assert sum(results) <= 4 and w.stats()["dropped"] == 50 - sum(results)
    gate.set()
    assert w.flush(5)
    assert w.close(5)
    assert w.stats()["delivered"] == sum(results)


def test_retries_with_backoff_then_succeeds():
    calls = []

    def flaky(item):
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("endpoint down")

    w = BackgroundWorker("t-retry", flaky, max_retries=5, backoff_s=0.05)
    w.submit("x")
    assert w.flush(5)
    st = w.stats()
    assert st["delivered"] == 1 and st["retries"] == 2 and st["failed"] == 0
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert gaps[0] >= 0.04 and gaps[1] >= 0.09  # exponential: 0.05 then 0.1
    w.close(1)


def test_gives_up_after_max_retries_and_redacts():
    def down(item):
        raise ConnectionError("cannot reach https://hooks.example/SECRET-TOKEN")

    w = BackgroundWorker(
        "t-fail",
        down,
        max_retries=2,
        backoff_s=0.01,
        redact=lambda s: s.replace("SECRET-TOKEN", "<redacted>"),
    )
    w.submit(1)
    w.submit(2)
    assert w.flush(5)
    st = w.stats()
    assert st["failed"] == 2 and st["delivered"] == 0 and st["retries"] == 4
    assert "SECRET-TOKEN" not in st["last_error"] and "<redacted>" in st["last_error"]
    w.close(1)


def test_close_is_bounded_when_the_endpoint_hangs():
    w = BackgroundWorker("t-hang", lambda item: time.sleep(30), queue_size=100)
    for i in range(10):
        w.submit(i)
    t0 = time.perf_counter()
    done = w.close(0.5)
    assert not done and time.perf_counter() - t0 < 2.0
    assert w.stats()["dropped"] >= 9
    assert not w.submit(99)  # closed: refused and counted, no exception


class Recorder(Sink):
    name = "rec"

    def __init__(self):
        self.calls = []
        self.thread = None

    def log_metrics(self, step, tokens, metrics):
        self.thread = threading.current_thread().name
        self.calls.append(("m", step, dict(metrics)))

    def close(self):
        self.calls.append(("close",))


def test_background_sink_preserves_order_and_copies_arguments():
    rec = Recorder()
    s = BackgroundSink(rec, queue_size=100)
    metrics = {"train/loss": 1.0}
    for step in range(5):
        metrics["train/loss"] = float(step)
        s.log_metrics(step, None, metrics)  # the caller reuses its dict
    s.flush()
    assert [c[1] for c in rec.calls] == [0, 1, 2, 3, 4]
    assert [c[2]["train/loss"] for c in rec.calls] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert rec.thread.startswith("fineline-") and rec.thread != threading.current_thread().name
    s.close()
    assert rec.calls[-1] == ("close",)
