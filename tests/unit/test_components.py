"""The monitor's one error guard and the component interface its parts are hosted through."""

import logging

import pytest

from fineline_monitor.components import Component, ErrorGuard


class Part:
    def __init__(self):
        self.calls = 0

    def work(self, x, scale=1):
        self.calls += 1
        return x * scale

    def boom(self):
        raise ValueError("part bug")


def test_a_failing_part_is_reported_once_disabled_and_answers_with_defaults(caplog):
    first = []
    guard = ErrorGuard(on_first_error=lambda part, e: first.append((part, str(e))))
    part, other = Component("probes", Part(), guard), Component("sink:x", Part(), guard)
    assert part.call("work", 2, scale=3) == 6
    with caplog.at_level(logging.ERROR, logger="fineline_monitor"):
        assert part.call("boom", default="fallback") == "fallback"
        assert part.call("work", 2, default=-1) == -1  # disabled: not called any more
        guard.report("probes", RuntimeError("again"))
    assert part.obj.calls == 1 and not part.running
    assert guard.disabled == {"probes": "ValueError: part bug"} and guard.error_counts == {
        "probes": 2
    }
    assert first == [("probes", "part bug")]
    assert sum("probes failed and is disabled" in r.message for r in caplog.records) == 1
    assert other.call("work", 5) == 5  # the other parts go on


def test_missing_parts_and_hooks_answer_with_the_default():
    guard = ErrorGuard()
    assert Component("indicators", None, guard).call("collect", 1, default={}) == {}
    part = Component("sink:plain", object(), guard)
    assert (
        part.call("log_probe", None, default="skipped") == "skipped" and part.running
    )  # a hook it lacks


def test_fatal_errors_and_strict_mode_raise():
    guard = ErrorGuard()
    with pytest.raises(KeyError):
        guard.run("alerts", lambda: {}["reference"], fatal=(KeyError,))
    assert guard.running("alerts")
    strict = ErrorGuard(strict=True)
    with pytest.raises(ValueError, match="part bug"):
        Component("probes", Part(), strict).call("boom")
    assert strict.running("probes")


def test_the_store_failing_while_reporting_is_swallowed():
    def store_down(part, e):
        raise OSError("disk full")

    guard = ErrorGuard(on_first_error=store_down)
    assert guard.run("indicators", Part().boom, default=0) == 0
    assert not guard.running("indicators")
