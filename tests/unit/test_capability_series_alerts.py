"""The alert engine judges the capability series by their direction: `capability/<cap>/bpb`
is lower-is-better, `capability/<cap>/acc_above_chance` higher-is-better with chance 0,
each with the round's capability stderr as its noise; headline and took_off are not judged."""

import math

import numpy as np

from fineline_monitor.core.alerts import AlertEngine
from fineline_monitor.core.config import AlertConfig
from fineline_monitor.core.types import ProbeRound


def _rounds(rng, n, jump_at, jump_bpb=0.0, jump_acc=0.0):
    for r in range(n):
        step = 100 * (r + 1)
        bpb = (
            3.0
            + 2.0 * math.exp(-r / 8)
            + rng.normal(0, 0.005)
            + (jump_bpb if r >= jump_at else 0.0)
        )
        acc = (
            0.3 * (1 - math.exp(-r / 8))
            + rng.normal(0, 0.004)
            - (jump_acc if r >= jump_at else 0.0)
        )
        scores = {
            "reading/bpb": bpb,
            "reading/acc_above_chance": acc,
            "reading/headline": acc,
            "reading/took_off": 1.0,
        }
        yield ProbeRound(
            step=step,
            tokens=step * 1000,
            tasks={},
            requests=[],
            seconds=1.0,
            tokens_scored=1,
            capability_scores=scores,
            capability_stderr={"reading/bpb": 0.005, "reading/acc_above_chance": 0.004},
        )


def _fired(jump_bpb=0.0, jump_acc=0.0):
    eng = AlertEngine(AlertConfig(phases=["stable@0"]), run="r")
    return [
        a
        for rnd in _rounds(np.random.default_rng(0), 40, 30, jump_bpb, jump_acc)
        for a in eng.observe_probe(rnd, {})
    ]


def test_bits_per_byte_rising_is_a_regression_of_its_capability():
    alerts = _fired(jump_bpb=0.3)
    assert alerts, "a jump up in bits per byte (worse) raised nothing"
    a = alerts[0]
    assert (a.capability, a.metric, a.task) == ("reading", "bpb", None) and a.step >= 3100
    assert a.rule == "capability_regression" and a.observed > a.band[1]


def test_bits_per_byte_falling_is_not_a_regression():
    assert not [a for a in _fired(jump_bpb=-0.3) if a.rule == "capability_regression"]


def test_accuracy_above_chance_falling_is_a_regression():
    alerts = _fired(jump_acc=0.1)
    assert alerts and (alerts[0].capability, alerts[0].metric) == ("reading", "acc_above_chance")
    assert alerts[0].observed < alerts[0].band[0]


def test_healthy_series_are_silent_and_headline_is_not_judged():
    eng = AlertEngine(AlertConfig(phases=["stable@0"]), run="r")
    alerts = [
        a
        for rnd in _rounds(np.random.default_rng(1), 40, 10**9)
        for a in eng.observe_probe(rnd, {})
    ]
    assert alerts == []
    judged = {c.key for c in eng.curves}
    assert judged == {"capability/reading/bpb", "capability/reading/acc_above_chance"}
