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


def test_lr_rising_from_step_zero_is_warmup_from_the_start():
    """The first LR sample is provisional: no `stable -> warmup` flip at the second one."""
    t = PhaseTracker()
    lr = lambda s: 1e-3 * min(1.0, (s + 1) / 20)  # noqa: E731 - warmup from step 0, 20 steps
    phases = run(t, range(0, 60, 5), lr)
    ch = t.pop_changes()
    assert [(c["step"], c["phase"], c["previous"]) for c in ch] == [
        (0, "warmup", None),
        (ch[1]["step"], "stable", "warmup"),
    ]
    assert phases[1] == "warmup" and phases[-1] == "stable"
    # a constant LR from step 0 starts stable, with a single recorded event
    t2 = PhaseTracker()
    run(t2, range(0, 60, 5), lambda s: 1e-3)
    assert [(c["step"], c["phase"]) for c in t2.pop_changes()] == [(0, "stable")]
    # state survives a restart between the first and the second sample
    t3 = PhaseTracker()
    t3.observe(0, 0, lr(0))
    t4 = PhaseTracker()
    t4.load_state_dict(t3.state_dict())
    t4.observe(5, 5, lr(5))
    assert [(c["step"], c["phase"]) for c in t4.pop_changes()] == [(0, "warmup")]


def test_each_phase_reached_and_logged_with_previous():
    t = PhaseTracker()

    def lr(s):  # warmup, stable, decay, anneal, then rewarm (continual pretraining) and stable
        if s < 800:
            return lr_wsd(s)
        return 1e-3 * min(1.0, (s - 790) / 100)

    run(t, range(0, 1100, 10), lr)
    ch = t.pop_changes()
    seq = [c["phase"] for c in ch]
    assert seq[0] == "warmup" and ch[0]["previous"] is None
    for p in ("stable", "decay", "anneal", "rewarm"):
        assert p in seq
    assert all(c["previous"] == ch[i]["phase"] for i, c in enumerate(ch[1:]))


def test_probe_round_without_lr_does_not_settle_the_provisional_first_phase():
    """The monitor probes at step 0 right after collecting step 0: the probe's LR-less
    observation must not record `stable` before the second LR sample shows a warmup."""
    from fineline_monitor.core.alerts import AlertEngine
    from fineline_monitor.core.config import AlertConfig
    from fineline_monitor.core.types import ProbeRound

    eng = AlertEngine(AlertConfig(), run="r")
    changes = []
    for s in range(0, 60, 5):
        lr = 1e-3 * min(1.0, (s + 1) / 40)
        eng.observe_metrics(s, s * 100, lr, {"train/loss": 5.0, "train/lr": lr})
        if s % 20 == 0:
            eng.observe_probe(
                ProbeRound(
                    step=s, tokens=s * 100, tasks={}, requests=[], seconds=1.0, tokens_scored=0
                ),
                {},
            )
        changes += eng.pop_phase_changes()
    assert [(c["step"], c["phase"]) for c in changes][:1] == [(0, "warmup")]
    assert "stable" in [c["phase"] for c in changes[1:]]
