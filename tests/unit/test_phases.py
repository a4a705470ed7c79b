"""Phase inference from the LR schedule and from declarations."""

import math

import pytest

from fineline_monitor.core.phases import PhaseTracker, parse_declared


def lr_wsd(step, warm=100, stable_end=600, total=800, peak=1e-3):
    if step < warm:
        return peak * step / warm
    if step < stable_end:
        return peak
    return peak * max(0.0, (total - step) / (total - stable_end))


def run(tracker, steps, lr_fn):
    seen = []
    for s in steps:
        seen.append(tracker.observe(s, s * 1000, lr_fn(s)))
    return seen


def test_warmup_stable_decay_anneal_from_observed_lr():
    t = PhaseTracker()
    phases = run(t, range(0, 800, 10), lr_wsd)
    assert phases[1] == "warmup"
    assert phases[30] == "stable"  # step 300
    assert phases[64] == "decay"  # step 640: lr 80% of peak
    assert phases[-1] == "anneal"  # step 790: lr ~5% of peak
    order = [c["phase"] for c in t.pop_changes()]
    assert order[:1] == ["warmup"] and "stable" in order and order[-2:] == ["decay", "anneal"]
    assert t.pop_changes() == []  # drained


def test_cosine_decays_without_plateau():
    t = PhaseTracker()
    cos = lambda s: 1e-3 * (s / 50 if s < 50 else 0.5 * (1 + math.cos(math.pi * (s - 50) / 950)))  # noqa: E731
    phases = run(t, range(0, 1000, 10), cos)
    assert phases[2] == "warmup"
    assert "stable" in phases and phases[40] == "decay" and phases[-1] == "anneal"


def test_rewarm_after_decay_then_stable_again():
    t = PhaseTracker()

    def lr(s):
        if s < 400:
            return lr_wsd(s, total=400, stable_end=300)
        if s < 500:
            return 1e-3 * (s - 400) / 100 + 1e-6  # continual pretraining: warm up again
        return 1e-3

    phases = run(t, range(0, 700, 10), lr)
    assert "rewarm" in phases[40:50]
    assert phases[-1] == "stable"
    assert t.segment >= 4


def test_declared_phases_override_lr():
    t = PhaseTracker(["warmup@0", "stable@100", "decay@500"])
    assert t.observe(50, None, 1.0) == "warmup"
    assert t.observe(150, None, 0.0001) == "stable"
    assert t.observe(600, None, 5.0) == "decay"


def test_declared_warmup_steps_and_no_lr():
    t = PhaseTracker(warmup_steps=200)
    assert t.observe(10, None, None) == "warmup"
    assert t.observe(250, None, None) == "stable"
    assert PhaseTracker().observe(5, None, None) == "stable"  # nothing known: stable


def test_parse_declared_rejects_bad_names():
    with pytest.raises(ValueError, match="PHASE@STEP"):
        parse_declared(["warmpu@0"])


def test_state_roundtrip_keeps_phase_and_segment():
    t = PhaseTracker()
    run(t, range(0, 650, 10), lr_wsd)
    t2 = PhaseTracker()
    t2.load_state_dict(t.state_dict())
    assert (t2.phase, t2.segment) == (t.phase, t.segment)
    assert t2.observe(790, None, lr_wsd(790)) == "anneal"
