"""Background delivery for sinks that talk to the network (W&B, push-gateway, webhooks).

Why: a training step must never wait for a slow or dead endpoint. The caller only does
`queue.put_nowait`; one daemon thread per sink delivers items in order, retries failed
deliveries with exponential backoff, and gives up on an item after `max_retries` (counted,
logged once per kind of error). When the queue is full the new item is dropped and
counted: losing a metric point is better than stalling a 1000-GPU job. `close()` drains
what it can within a bounded timeout and then walks away (the thread is a daemon).

Nothing here raises into the caller: `submit` returns False on a drop, `flush`/`close`
return False when they ran out of time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Optional

from fineline_monitor.sinks.base import Sink

log = logging.getLogger("fineline_monitor.sinks")

_WORKERS: "weakref.WeakSet[BackgroundWorker]" = weakref.WeakSet()
_STOP = object()


def workers() -> List["BackgroundWorker"]:
    """Live workers of this process (the Prometheus exporter reports their drop counts)."""
    return sorted(list(_WORKERS), key=lambda w: w.name)


class BackgroundWorker:
    """A bounded queue drained by one daemon thread calling `deliver(item)`.

    `deliver` may raise: the item is retried after `backoff_s * 2**attempt` seconds (capped
    at `max_backoff_s`) up to `max_retries` times. `redact` scrubs error text before it is
    logged or kept in `last_error` (webhook URLs carry secrets).
    """

    def __init__(
        self,
        name: str,
        deliver: Callable[[Any], None],
        *,
        queue_size: int = 10000,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        redact: Optional[Callable[[str], str]] = None,
        no_retry: tuple = (),
        start: bool = True,
    ):
        self.name = name
        self._no_retry = tuple(no_retry)  # exception types that retrying cannot fix (e.g. HTTP 400)
        self._deliver = deliver
        self._q: "queue.Queue[Any]" = queue.Queue(maxsize=max(1, int(queue_size)))
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self._redact = redact or (lambda s: s)
        self._closing = threading.Event()  # cuts backoff sleeps short once close() starts
        self._idle = threading.Condition()
        self._in_flight = 0
        self._lock = threading.Lock()
        self.submitted = 0
        self.delivered = 0
        self.dropped = 0  # queue full, or still queued when close() gave up
        self.failed = 0  # gave up after max_retries
        self.retries = 0
        self.last_error: Optional[str] = None
        self._logged_errors: set = set()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"fineline-{name}", daemon=True)
        _WORKERS.add(self)
        if start:
            self._thread.start()

    # ---- caller side (training thread): never blocks, never raises ------------------------
    def submit(self, item: Any) -> bool:
        if self._closed:
            with self._lock:
                self.dropped += 1
            return False
        try:
            with self._idle:
                self._q.put_nowait(item)
                self._in_flight += 1
        except queue.Full:
            with self._lock:
                self.dropped += 1
                first = self.dropped == 1
            if first:
                log.warning(
                    "fineline sink %s: queue full (%d items); dropping new items and counting them",
                    self.name,
                    self._q.maxsize,
                )
            return False
        with self._lock:
            self.submitted += 1
        return True

    def queue_full(self) -> bool:
        """Whether a `submit` now would be dropped: every slot holds an item not yet started."""
        return self._q.full()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything submitted so far was delivered or given up on."""
        if not self._thread.is_alive():
            return self._in_flight == 0
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._idle:
            while self._in_flight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout_s: float = 10.0) -> bool:
        """Stop accepting items, deliver what is queued within `timeout_s`, stop the thread.

        Retries are cut short while closing (one attempt each), so a dead endpoint costs
        at most the timeout. Items left behind are counted as dropped.
        """
        if self._closed:
            return not self._thread.is_alive()
        self._closed = True
        self._closing.set()
        deadline = time.monotonic() + max(0.0, timeout_s)
        try:
            self._q.put(_STOP, timeout=max(0.0, timeout_s))
        except queue.Full:
            pass
        if self._thread.is_alive():
            self._thread.join(max(0.0, deadline - time.monotonic()))
        alive = self._thread.is_alive()
        if alive:
            left = self._q.qsize()
            with self._lock:
                self.dropped += left
            log.warning(
                "fineline sink %s: close() timed out after %.1fs with %d items undelivered",
                self.name,
                timeout_s,
                left,
            )
        return not alive

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            return {
                "name": self.name,
                "submitted": self.submitted,
                "delivered": self.delivered,
                "dropped": self.dropped,
                "failed": self.failed,
                "retries": self.retries,
                "queued": self._q.qsize(),
                "last_error": self.last_error,
            }

    # ---- the worker thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            try:
                self._deliver_with_retries(item)
            finally:
                with self._idle:
                    self._in_flight -= 1
                    self._idle.notify_all()

    def _deliver_with_retries(self, item: Any) -> None:
        attempt = 0
        while True:
            try:
                self._deliver(item)
                with self._lock:
                    self.delivered += 1
                return
            except BaseException as e:  # noqa: BLE001 - nothing may escape this thread
                msg = self._redact(f"{type(e).__name__}: {e}")
                with self._lock:
                    self.last_error = msg
                if (
                    attempt >= self.max_retries
                    or self._closing.is_set()
                    or isinstance(e, self._no_retry)
                ):
                    with self._lock:
                        self.failed += 1
                    self._log_once(msg)
                    return
                delay = min(self.max_backoff_s, self.backoff_s * (2**attempt))
                attempt += 1
                with self._lock:
                    self.retries += 1
                self._closing.wait(delay)

    def _log_once(self, msg: str) -> None:
        # One log line per distinct error kind, not one per failed metric point.
        kind = msg.split(":", 1)[0]
        if kind in self._logged_errors:
            return
        self._logged_errors.add(kind)
        log.warning(
            "fineline sink %s: delivery failed after %d retries; training continues: %s",
            self.name,
            self.max_retries,
            msg,
        )


class BackgroundSink(Sink):
    """Runs every call of an inner sink on a background worker, in call order.

    Arguments are copied at submit time (the caller may reuse its metrics dict). The inner
    sink's methods run on the worker thread only, so it needs no locking of its own.
    """

    def __init__(
        self,
        inner: Sink,
        *,
        queue_size: int = 10000,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        close_timeout_s: float = 10.0,
        redact: Optional[Callable[[str], str]] = None,
    ):
        self.inner = inner
        self.name = getattr(inner, "name", type(inner).__name__)
        self.close_timeout_s = close_timeout_s
        self.worker = BackgroundWorker(
            self.name,
            self._call,
            queue_size=queue_size,
            max_retries=max_retries,
            backoff_s=backoff_s,
            redact=redact,
        )

    def _call(self, item: Any) -> None:
        method, args = item
        getattr(self.inner, method)(*args)

    def _submit(self, method: str, *args: Any) -> None:
        self.worker.submit((method, tuple(dict(a) if isinstance(a, dict) else a for a in args)))

    def start_run(self, run: str, config: Dict[str, Any], meta: Dict[str, Any]) -> None:
        self._submit("start_run", run, config, meta)

    def log_metrics(self, step: int, tokens: Optional[int], metrics: Dict[str, float]) -> None:
        self._submit("log_metrics", step, tokens, metrics)

    def log_probe(self, round: Any) -> None:
        self._submit("log_probe", round)

    def log_alert(self, alert: Any) -> None:
        self._submit("log_alert", alert)

    def log_phase(
        self, step: int, tokens: Optional[int], phase: str, previous: Optional[str]
    ) -> None:
        self._submit("log_phase", step, tokens, phase, previous)

    def log_expectations(self, step: int, rows: list) -> None:
        self._submit("log_expectations", step, [dict(r) for r in rows])

    def flush(self) -> None:
        self._submit("flush")
        self.worker.flush(self.close_timeout_s)

    def close(self) -> None:
        self._submit("close")
        self.worker.close(self.close_timeout_s)

    @property
    def stats(self) -> Dict[str, Any]:
        return self.worker.stats()
