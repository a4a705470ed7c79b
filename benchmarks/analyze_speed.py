"""Offline replay speed: `fineline-monitor analyze` over a whole trajectory table.

    .venv/bin/python benchmarks/analyze_speed.py --data ../shared/reference-trajectories/dev.csv.gz

Runs the real command line twice in a fresh process each time, with the default `--jobs`
(one worker per usable core) and with `--jobs 1`, and reports the wall time of each
(target: <= 20 s for the dev table on a 2-core machine) and the alerts over the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_json  # noqa: E402
from alert_quality import DEFAULT_DATA  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


LADDER = "pythia-v1/0shot/pythia-70m,pythia-v1/0shot/pythia-160m,pythia-v1/0shot/pythia-410m"


def run_analyze(data: str, jobs: Optional[int], extra: Optional[List[str]] = None) -> tuple:
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            "-m",
            "fineline_monitor.cli",
            "analyze",
            data,
            "--out",
            out,
            *(extra or []),
        ]
        if jobs is not None:
            cmd += ["--jobs", str(jobs)]
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        )
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        summary = json.loads(Path(out, "summary.json").read_text())
    return seconds, summary


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--data", default=os.environ.get("FINELINE_DEV_TRAJECTORIES", str(DEFAULT_DATA))
    )
    ap.add_argument(
        "--reference-models",
        default=LADDER,
        help="runs of the same table that form a reference ladder for the third timing "
        "('' skips it; default: three Pythia sizes)",
    )
    bench_json.add_json_argument(ap, "analyze-speed")
    args = ap.parse_args(argv)
    if not Path(args.data).exists():
        print(
            f"SKIP: trajectory data not found at {args.data} (pass --data or set FINELINE_DEV_TRAJECTORIES)"
        )
        return 0
    t_default, summary = run_analyze(args.data, None)
    t_one, _ = run_analyze(args.data, 1)
    t_ladder, s_ladder = None, None
    if args.reference_models:
        t_ladder, s_ladder = run_analyze(
            args.data, None, ["--reference", args.data, "--reference-models", args.reference_models]
        )
        print(
            f"with the reference ladder {s_ladder['reference_runs']} (aligned on {s_ladder['reference_align']}): "
            f"{t_ladder:.1f} s; alerts {s_ladder['alerts']['by_severity']}"
        )
    by_sev = summary["alerts"]["by_severity"]
    jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"analyze {summary['rows']:,} rows, {summary['runs']} runs: {t_default:.1f} s (default --jobs, "
        f"{jobs} workers), {t_one:.1f} s (--jobs 1); alerts {by_sev}"
    )
    bench_json.write(
        args.json,
        "analyze-speed",
        {
            "rows": summary["rows"],
            "runs": summary["runs"],
            "jobs_default": jobs,
            "seconds_default_jobs": t_default,
            "seconds_jobs_1": t_one,
            "warnings": by_sev.get("warning", 0),
            "criticals": by_sev.get("critical", 0),
            "seconds_with_ladder": t_ladder,
            "ladder_runs": s_ladder["reference_runs"] if s_ladder else None,
        },
        argv=[__file__, *(sys.argv[1:] if argv is None else argv)],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
