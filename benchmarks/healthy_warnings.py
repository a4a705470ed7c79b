"""Which warnings fire on healthy runs, and are they noise or sustained shifts?

    .venv/bin/python benchmarks/healthy_warnings.py --split heldout

Replays every run of the split (as `benchmarks/alert_quality.py` does for its healthy
figures) and prints each warning with the curve's level before it (median of the 5 rounds
before the two the alert needs: hysteresis 2), the value at the alert, and the share of the next 5 rounds that stay on
the bad side of that level. A share of 1.0 is what an injected sustained drop looks like;
a transient outlier recovers (share near 0). The summary line counts warnings with a share
>= 0.8: sustained shifts in real runs, which a detector catching more of the benchmark's
injected drops would have to page on too.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_json  # noqa: E402
from alert_quality import DEFAULT_DATA, resolve_split, split_of  # noqa: E402

from fineline_monitor.analyze import replay_run  # noqa: E402
from fineline_monitor.core.config import AlertConfig  # noqa: E402
from fineline_monitor.core.expectations import LOSS, metric_kind  # noqa: E402
from fineline_monitor.core.trajectory import read_trajectory  # noqa: E402

BEFORE, AFTER, SUSTAINED = 5, 5, 0.8


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--data", default=os.environ.get("FINELINE_DEV_TRAJECTORIES", str(DEFAULT_DATA))
    )
    ap.add_argument("--split", choices=("auto", "heldout", "tune", "all"), default="auto")
    bench_json.add_json_argument(ap, "healthy-warnings")
    args = ap.parse_args(argv)
    if not Path(args.data).exists():
        print(
            f"SKIP: trajectory data not found at {args.data} (pass --data or set FINELINE_DEV_TRAJECTORIES)"
        )
        return 0
    runs = read_trajectory(args.data).runs()
    split = resolve_split(args.split, runs)
    n = sustained = on_bpb = 0
    for (_src, model), curves in runs.items():
        if split != "all" and split_of(model) != split:
            continue
        alerts, _ = replay_run(curves, AlertConfig())
        by_key = {(c.task, c.metric): c for c in curves}
        for a in alerts:
            c = by_key.get((a.task, a.metric))
            if a.severity != "warning" or c is None:
                continue
            i = int(np.searchsorted(c.steps, a.step))
            y = c.values.astype(float)
            good = -1.0 if metric_kind(c.metric) == LOSS else 1.0
            # the level before the shift: an alert needs 2 rounds out of band, so round i-1
            # is already part of it
            lo = max(0, i - 1 - BEFORE)
            level = float(np.median(y[lo : i - 1])) if i - 1 > lo else float("nan")
            nxt = y[i + 1 : i + 1 + AFTER]
            share = float(np.mean(good * (nxt - level) < 0)) if nxt.size else float("nan")
            n += 1
            if share >= SUSTAINED:
                sustained += 1
                on_bpb += a.metric == "bpb"
            print(
                f"{model[:34]:34s} {a.rule:20s} {a.task[:30]:30s} {a.metric:8s} step {a.step:7d} "
                f"round {i:3d}/{len(c)}: level {level:.4g} -> {y[i]:.4g}; next {nxt.size} rounds on the bad side "
                f"{share:.2f}"
            )
    print(
        f"split={split}: {n} warnings on healthy runs; {sustained} followed by >= {SUSTAINED:.0%} of the next "
        f"{AFTER} rounds on the bad side of the level before them (sustained shifts), {on_bpb} of those on bpb"
    )
    bench_json.write(
        args.json,
        "healthy-warnings",
        {
            "split": split,
            "warnings": n,
            "sustained": sustained,
            "sustained_on_bpb": on_bpb,
            "after_rounds": AFTER,
            "sustained_share": SUSTAINED,
        },
        argv=[__file__, *(sys.argv[1:] if argv is None else argv)],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
