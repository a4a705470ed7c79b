"""Long runs: the monitor's in-process memory stays flat while the store keeps the full record.

A shortened CI version of benchmarks/long_run_memory.py (which runs the full million steps
with a 1-parameter model and prints the figures): 100k steps with model=None (loss, LR and
tokens go to the store and the real alert engine every 10 steps) and a cheap stand-in probe
round every 10k steps. The Python heap (tracemalloc) may not grow by more than 48 KiB
between step 20k and step 100k: one unbounded per-collection history of a single metric
(8,000 more float64 values) would already add ~62 KiB, a Python list of floats ~250 KiB.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fineline_monitor.core.store import RunStore

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "long_run_memory.py"
STEPS, EARLY = 100_000, 20_000
BOUND_KIB = 48

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]


def _bench():
    spec = importlib.util.spec_from_file_location("long_run_memory", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_memory_is_bounded_and_the_store_is_complete(tmp_path, fault_table):
    figs = _bench().simulate(
        STEPS, str(tmp_path), [EARLY, STEPS], probe_every=10_000, one_param_model=False
    )
    growth_kib = (figs[STEPS]["py_heap_mb"] - figs[EARLY]["py_heap_mb"]) * 1024
    store = RunStore(tmp_path / "run.db", run="long", readonly=True)
    loss_rows = len(store.series("train/loss"))
    rounds = len(store.probe_rounds())
    store.close()
    expected_rows = STEPS // 10
    lost = expected_rows - loss_rows + (STEPS // 10_000 - rounds)
    assert figs[-1]["disabled"] == 0, "a part of the monitor failed during the long run"
    assert loss_rows == expected_rows and rounds == STEPS // 10_000 and lost == 0, (
        loss_rows,
        rounds,
    )
    assert growth_kib < BOUND_KIB, (
        f"the monitor's heap grew {growth_kib:.1f} KiB over {STEPS - EARLY:,} steps"
    )
    # the growth figure varies from run to run; the generated table states the bound
    fault_table.record(
        "long runs",
        f"{STEPS:,} simulated steps (collect every 10, alert engine on, probe every 10k)",
        f"Python heap growth from step {EARLY:,} to {STEPS:,} under {BOUND_KIB} KiB; store holds "
        f"all {loss_rows:,} loss rows and {rounds} probe rounds",
    )
