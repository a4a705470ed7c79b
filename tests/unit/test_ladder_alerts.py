"""Alerts from a ladder of reference runs: a stall the own-run fit cannot see, a healthy
member that stays silent, live and analyze alike, and each reference that cannot be used
said once (the run then judged by its own fit)."""

from __future__ import annotations

import json
import math

import numpy as np

from fineline_monitor.analyze import analyze, replay_run
from fineline_monitor.core.config import AlertConfig, ReferenceConfig
from fineline_monitor.core.ladder import Ladder, runs_from_curves
from fineline_monitor.core.trajectory import Curve, iter_rows, write_trajectory_csv

TASKS = {"hellaswag": 0.25, "piqa": 0.5, "arc_easy": 0.25, "winogrande": 0.5}
LADDER = (20e6, 60e6, 180e6)
TARGET = 540e6
ROUNDS = 40
STALL_TASK, STALL_FROM = "hellaswag", 24


def run_curves(
    params: float, *, seed: int, stall: bool = False, source: str = "lab", noise: float = 0.001
):
    """Accuracy of one run of the recipe: higher for bigger models, rising with log tokens."""
    rng = np.random.default_rng(seed)
    steps = np.arange(1, ROUNDS + 1) * 100
    tokens = steps * 1e7
    out = []
    for i, (task, chance) in enumerate(TASKS.items()):
        smooth = (
            chance
            + 0.05
            + 0.03 * math.log(params / 20e6)
            + 0.3 / (1 + np.exp(-1.5 * (np.log(tokens) - 23.5 - 0.1 * i)))
        )
        y = smooth + rng.normal(0, noise, ROUNDS)
        if stall and task == STALL_TASK:
            y[STALL_FROM:] = smooth[STALL_FROM - 1] + rng.normal(0, noise, ROUNDS - STALL_FROM)
        out.append(
            Curve(
                source,
                f"m-{int(params / 1e6)}M",
                task,
                "acc",
                steps.astype(np.int64),
                tokens.astype(float),
                y,
                np.full(ROUNDS, np.nan),
                params=params,
            )
        )
    return out


def ladder_runs():
    return runs_from_curves(c for k, p in enumerate(LADDER) for c in run_curves(p, seed=10 + k))


def first_alert_round(alerts, task):
    steps = [a.step for a in alerts if a.task == task]
    return min(steps) // 100 - 1 if steps else None


def test_a_stall_the_own_run_fit_misses_is_caught_from_the_ladder():
    target = run_curves(TARGET, seed=1, stall=True)
    own, _ = replay_run(target, AlertConfig())
    lad = Ladder(ladder_runs(), align="tokens")
    with_ladder, _ = replay_run(target, AlertConfig(), ladder=lad)
    assert first_alert_round(own, STALL_TASK) is None, [a.message for a in own]
    at = first_alert_round(with_ladder, STALL_TASK)
    assert at is not None and STALL_FROM <= at <= STALL_FROM + 2, [
        (a.step, a.message) for a in with_ladder
    ]
    a = next(a for a in with_ladder if a.task == STALL_TASK)
    assert a.rule == "capability_stall"
    assert "expected from ladder m-20M, m-60M, m-180M (aligned on tokens)" in a.message
    assert f"observed {a.observed:.4g}" in a.message and a.observed < a.band[0] < a.expected
    assert {x.task for x in with_ladder} == {STALL_TASK}  # the healthy tasks stay silent


def test_a_healthy_member_of_the_ladder_stays_silent():
    runs = ladder_runs()
    for k, p in enumerate(LADDER):  # each ladder member judged by the other two
        member = run_curves(p, seed=10 + k)
        others = Ladder([r for r in runs if r.params != p], align="tokens")
        alerts, _ = replay_run(member, AlertConfig(), ladder=others)
        assert alerts == [], [a.message for a in alerts]
    healthy_target, _ = replay_run(
        run_curves(TARGET, seed=2), AlertConfig(), ladder=Ladder(runs, align="tokens")
    )
    assert healthy_target == []


def test_live_rounds_and_analyze_give_the_same_alerts_with_a_ladder(tmp_path):
    from fineline_monitor.core.alerts import AlertEngine
    from fineline_monitor.core.expectations import capability_for, chance_for

    ref = tmp_path / "ladder.csv"
    write_trajectory_csv(
        ref, iter_rows([c for k, p in enumerate(LADDER) for c in run_curves(p, seed=10 + k)])
    )
    target = run_curves(TARGET, seed=1, stall=True, source="target")
    table = tmp_path / "target.csv"
    write_trajectory_csv(table, iter_rows(target))
    summary = analyze(str(table), str(tmp_path / "out"), reference=[str(ref)], jobs=1)
    batch = [json.loads(x) for x in (tmp_path / "out" / "alerts.jsonl").read_text().splitlines()]
    assert summary["reference_runs"] == ["lab/m-180M", "lab/m-20M", "lab/m-60M"] and batch

    cfg = AlertConfig(reference=ReferenceConfig(files=[str(ref)], align="auto", params=TARGET))
    eng = AlertEngine(cfg, run="target/m-540M", run_params=TARGET)
    assert eng.ladder is not None and eng.ladder.align == summary["reference_align"]
    live = []
    for i, s in enumerate(target[0].steps.tolist()):
        live += eng.observe_curves(
            s,
            float(target[0].tokens[i]),
            [f"probe/{c.task}/acc" for c in target],
            [c.task for c in target],
            ["acc"] * len(target),
            [capability_for(c.task) for c in target],
            [float(c.values[i]) for c in target],
            [np.nan] * len(target),
            [chance_for(c.task) for c in target],
        )
    assert [(a["step"], a["task"], a["rule"], a["severity"]) for a in batch] == [
        (a.step, a.task, a.rule, a.severity) for a in live
    ]
    assert all(abs(a["expected"] - b.expected) < 1e-9 for a, b in zip(batch, live))


def test_each_reference_that_cannot_be_used_is_said_once_and_the_own_fit_judges(tmp_path, capsys):
    target = run_curves(TARGET, seed=1)
    table = tmp_path / "target.csv"
    write_trajectory_csv(table, iter_rows(target))

    # no task and metric in common
    other = [
        Curve(
            "lab",
            "m-20M",
            "gsm8k",
            "exact_match",
            c.steps,
            c.tokens,
            c.values,
            c.stderr,
            params=20e6,
        )
        for c in run_curves(20e6, seed=3)[:1]
    ]
    ref = tmp_path / "unrelated.csv"
    write_trajectory_csv(ref, iter_rows(other))
    s = analyze(str(table), str(tmp_path / "o1"), reference=[str(ref)], jobs=1)
    err = capsys.readouterr().err
    assert (
        err.count("shares no task and metric with this run") == 1 and "own-run detector only" in err
    )
    assert "hellaswag/acc" in err and "gsm8k/exact_match" in err and s["alerts"]["total"] == 0

    # a ladder of one size where a fit across sizes is wanted
    same = [
        Curve(c.source, m, c.task, c.metric, c.steps, c.tokens, c.values, c.stderr, params=60e6)
        for m in ("m-a", "m-b")
        for c in run_curves(60e6, seed=4)
    ]
    ref2 = tmp_path / "one-size.csv"
    write_trajectory_csv(ref2, iter_rows(same))
    s = analyze(str(table), str(tmp_path / "o2"), reference=[str(ref2)], jobs=1)
    err = capsys.readouterr().err
    assert (
        err.count("at least two sizes") == 1
        and "it has 1 (m-a (60M parameters), m-b (60M parameters))" in err
    )
    assert s["reference_runs"] is None and s["reference_notes"]

    # an alignment without what it needs: compute without parameter counts
    nosize = [
        Curve(
            c.source, c.model, c.task, c.metric, c.steps, c.tokens, c.values, c.stderr, params=None
        )
        for c in run_curves(20e6, seed=5)
    ]
    ref3 = tmp_path / "no-params.csv"
    write_trajectory_csv(ref3, iter_rows(nosize))
    cfg = AlertConfig(reference=ReferenceConfig(align="compute"))
    s = analyze(str(table), str(tmp_path / "o3"), reference=[str(ref3)], cfg=cfg, jobs=1)
    err = capsys.readouterr().err
    assert (
        "cannot align the reference runs with alignment `compute`" in err
        and "parameter count" in err
    )
    assert s["reference_runs"] is None


def test_a_run_of_the_table_is_judged_without_itself(tmp_path):
    rows = [c for k, p in enumerate(LADDER) for c in run_curves(p, seed=10 + k)]
    table = tmp_path / "all.csv"
    write_trajectory_csv(table, iter_rows(rows))
    lad = Ladder(runs_from_curves(rows), align="tokens")
    assert lad.for_run("lab/m-60M", None).names == ["lab/m-180M", "lab/m-20M"]
    s = analyze(str(table), str(tmp_path / "o"), reference=[str(table)], jobs=1)
    assert s["alerts"]["total"] == 0
