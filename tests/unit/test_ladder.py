"""The reference ladder: reading, alignment and the prediction across sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fineline_monitor.core.ladder import (
    Ladder,
    LadderError,
    coordinate,
    read_reference_runs,
    runs_from_curves,
    smooth_on_grid,
)
from fineline_monitor.core.trajectory import Curve, iter_rows, write_trajectory_csv

SIZES = (20e6, 60e6, 180e6, 540e6)


def synthetic_curve(
    params: float,
    *,
    total_tokens: float = 2e9,
    n: int = 40,
    task: str = "hellaswag",
    metric: str = "acc",
    noise: float = 0.0,
    seed: int = 0,
    model: str = "",
) -> Curve:
    """Accuracy that rises with log tokens and sits higher for bigger models (log-linear in N)."""
    steps = np.arange(1, n + 1) * 100
    tokens = steps / steps[-1] * total_tokens
    frac = np.log(tokens / total_tokens)
    level = 0.02 * math.log(params / 1e6)
    y = 0.25 + level + 0.25 / (1 + np.exp(-(frac + 2.0) * 1.5))
    y = y + np.random.default_rng(seed).normal(0, noise, n) if noise else y
    return Curve(
        "lab/ladder",
        model or f"m-{int(params / 1e6)}M",
        task,
        metric,
        steps.astype(np.int64),
        tokens.astype(float),
        y,
        np.full(n, np.nan),
        params=params,
    )


def test_the_prediction_across_sizes_recovers_a_run_left_out():
    runs = runs_from_curves(synthetic_curve(p) for p in SIZES[:3])
    target = synthetic_curve(SIZES[3])
    lad = Ladder(runs, align="tokens")
    pred = lad.predict(
        "hellaswag", "acc", steps=target.steps, tokens=target.tokens, params=SIZES[3]
    )
    assert np.isfinite(pred).all()
    # the level rises by 0.02 per e-fold of parameters: a line in log N extrapolates it exactly
    assert np.max(np.abs(pred - target.values)) < 0.01
    # the references' mean would sit 0.02*log(3)*2 lower: the fit across sizes is what is used
    mean = np.mean(
        [lad.predict("hellaswag", "acc", steps=target.steps, tokens=target.tokens, params=None)],
        axis=0,
    )
    assert np.median(target.values - mean) > 0.03


def test_no_prediction_outside_the_references_span():
    runs = runs_from_curves([synthetic_curve(SIZES[0], total_tokens=1e9)])
    lad = Ladder(runs, align="tokens")
    pred = lad.predict("hellaswag", "acc", steps=[10, 100], tokens=[1e12, 5e8], params=None)
    assert math.isnan(pred[0]) and math.isfinite(pred[1])
    assert np.isnan(lad.predict("arc_easy", "acc", steps=[1], tokens=[5e8])).all()


def test_auto_alignment_takes_the_schedule_fraction_for_runs_of_other_lengths():
    # the same curve shape on each run's own schedule: only `fraction` lines them up
    runs = runs_from_curves(
        [synthetic_curve(p, total_tokens=t) for p, t in zip(SIZES[:3], (1e9, 3e9, 9e9))]
    )
    lad = Ladder(runs, align="auto", target_total_tokens=27e9)
    assert lad.align == "fraction"
    assert "aligned on fraction" in lad.describe()
    no_total = Ladder(runs, align="auto")
    assert no_total.align != "fraction"


def test_alignments_that_need_what_is_missing_say_so():
    runs = runs_from_curves([synthetic_curve(SIZES[0])])
    with pytest.raises(LadderError, match="planned training tokens"):
        Ladder(runs, align="fraction")
    c = synthetic_curve(SIZES[0])
    c.params = None
    with pytest.raises(LadderError, match="parameter count"):
        Ladder(runs_from_curves([c]), align="compute")
    with pytest.raises(LadderError, match="must be one of"):
        Ladder(runs, align="wallclock")
    with pytest.raises(LadderError, match="no run"):
        Ladder([], align="tokens")


def test_coordinates():
    x = coordinate("fraction", [1, 2], [5e8, 1e9], 1e8, 1e9)
    assert x[1] == pytest.approx(0.0) and x[0] == pytest.approx(math.log(0.5))
    assert coordinate("compute", [1], [1e9], 1e8, None)[0] == pytest.approx(math.log(6e17))
    assert math.isnan(coordinate("steps", [0], [0.0], None, None)[0])


def test_smoothing_removes_noise_and_keeps_the_trend():
    x = np.linspace(0, 5, 300)
    y = 0.1 * x + np.random.default_rng(1).normal(0, 0.05, x.size)
    grid, ys = smooth_on_grid(x, y)
    assert grid.size == 200
    assert np.max(np.abs(ys - 0.1 * grid)) < 0.03


def test_reading_reference_runs_from_a_csv_and_a_run_db(tmp_path):
    path = tmp_path / "ladder.csv"
    write_trajectory_csv(path, iter_rows([synthetic_curve(p) for p in SIZES[:3]]))
    runs = read_reference_runs([str(path)], select=["m-20M", "lab/ladder/m-60M"])
    assert [r.name for r in runs] == ["lab/ladder/m-20M", "lab/ladder/m-60M"]
    assert runs[0].params == SIZES[0]
    with pytest.raises(LadderError, match="`m-7M` is not in .*runs there: lab/ladder/m-180M"):
        read_reference_runs([str(path)], select=["m-7M"])
    with pytest.raises(LadderError, match="no such file"):
        read_reference_runs([str(tmp_path / "missing.csv")])

    from fineline_monitor.core.store import RunStore
    from fineline_monitor.core.types import ProbeRound, TaskResult

    db = tmp_path / "run.db"
    store = RunStore(db, run="pilot")
    store.start_run("pilot", {}, {"params": 1e6})
    for step, v in ((10, 0.3), (20, 0.35), (30, 0.4)):
        res = TaskResult(
            task="hellaswag",
            capability="commonsense",
            n_docs=8,
            metrics={"acc": v},
            stderr={"acc": 0.01},
        )
        store.log_probe(
            ProbeRound(
                step=step,
                tokens=step * 1000,
                tasks={"hellaswag": res},
                requests=[],
                seconds=1.0,
                tokens_scored=1,
            )
        )
    store.close()
    (run,) = read_reference_runs([str(db)])
    assert run.curves[("hellaswag", "acc")].values.tolist() == [0.3, 0.35, 0.4]
