"""Every benchmark script runs, end to end, on a tiny size, so that the benchmarks do not
rot between the runs that produce their published figures. Only that they run and print
their report is checked here: speed and quality figures stay out of tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXCERPT = str(REPO / "tests" / "data" / "trajectories-excerpt.csv.gz")

# script -> (arguments for a tiny run, a line fragment its report always prints)
SMOKE = {
    "alert_quality.py": (
        ["--data", EXCERPT, "--split", "all", "--faults-per-kind", "4"],
        "healthy",
    ),
    "analyze_speed.py": (
        ["--data", EXCERPT, "--reference-models", "pythia-70m,pythia-160m"],
        "reference ladder",
    ),
    "healthy_warnings.py": (["--data", EXCERPT, "--split", "all"], "warning"),
    "long_run_memory.py": (["--steps", "3000", "--probe-every", "1000"], "heap"),
    "overhead.py": (
        [
            "--blocks",
            "2",
            "--warmup",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--n-layer",
            "1",
            "--n-embd",
            "32",
            "--skip-whole",
        ],
        "inside monitor.step",
    ),
    "probe_speed.py": (
        [
            "--docs",
            "2",
            "--repeats",
            "1",
            "--batch-size",
            "4",
            "--tasks",
            "arc_easy:rc_0shot",
            "--layers",
            "1",
            "--embd",
            "32",
            "--positions",
            "128",
            "--vocab",
            "512",
        ],
        "tokens/s",
    ),
}


def test_every_benchmark_script_has_a_smoke_test():
    # a benchmark is a script (bench_json.py is the module they share)
    scripts = {p.name for p in (REPO / "benchmarks").glob("*.py") if "__main__" in p.read_text()}
    assert scripts == set(SMOKE), f"benchmarks without a smoke test: {sorted(scripts - set(SMOKE))}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs_on_a_tiny_size(script, tmp_path):
    args, expect = SMOKE[script]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
        FINELINE_CACHE_DIR=str(tmp_path / "cache"),
    )
    figures = tmp_path / "figures.json"  # never the published docs/data/bench-*.json
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args, "--json", str(figures)],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=580,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "SKIP" not in p.stdout, out[-2000:]
    assert expect.lower() in out.lower(), out[-2000:]
    doc = json.loads(figures.read_text())
    assert doc["figures"] and doc["command"].startswith(f"python benchmarks/{script}"), doc
