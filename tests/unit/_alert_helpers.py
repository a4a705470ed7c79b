"""Shared helpers for the alert-engine tests (synthetic curves and the excerpt of real curves
that the repository ships in tests/data)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fineline_monitor.core.config import AlertConfig
from fineline_monitor.core.types import ProbeRound, TaskResult

REPO = Path(__file__).resolve().parents[2]
# Cut from ../shared/reference-trajectories by scripts/make_trajectory_excerpt.py (see
# tests/data/README.md): 10 public runs, so a plain clone runs every test on real curves.
DEV = REPO / "tests" / "data" / "trajectories-excerpt.csv.gz"
DEV_RUNS, DEV_ROWS = 10, 14527


def dev_path() -> Path:
    return DEV


def sigmoid_acc(tokens: float, lo=0.25, mid=20.0, k=1.5) -> float:
    return lo + (0.85 - lo) / (1 + math.exp(-k * (math.log(tokens) - mid)))


def make_round(
    step: int, tokens: int, accs: dict, caps: dict, n_docs=400, bpb=None, gold=None
) -> ProbeRound:
    tasks = {}
    for name, a in accs.items():
        m = {"acc": a}
        if bpb and name in bpb:
            m["bpb"] = bpb[name]
        tasks[name] = TaskResult(
            task=name, capability=caps[name], n_docs=n_docs, metrics=m, random_baseline=0.25
        )
    return ProbeRound(
        step=step,
        tokens=tokens,
        tasks=tasks,
        requests=[],
        seconds=1.0,
        tokens_scored=1,
        gold_logprobs=gold or {},
    )


def cfg(**kw) -> AlertConfig:
    return AlertConfig(**kw)


def healthy_run(
    rng,
    n_rounds=40,
    tasks=("hellaswag", "piqa", "winogrande"),
    every=500,
    tok_per_step=2**20,
    noise=0.006,
):
    """Synthetic healthy probe rounds: sigmoid-of-log-tokens accuracy plus noise."""
    for r in range(1, n_rounds + 1):
        step = r * every
        tokens = step * tok_per_step
        accs = {
            t: float(np.clip(sigmoid_acc(tokens, mid=21.0 + 0.3 * i) + rng.normal(0, noise), 0, 1))
            for i, t in enumerate(tasks)
        }
        yield step, tokens, accs
