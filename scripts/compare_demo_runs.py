"""Compare two demo outputs: is the metrics exposition and the run store the same, apart from timings?

    fineline-monitor demo --out /tmp/before --steps 120 --threads 1 --seed 0   # on the old commit
    fineline-monitor demo --out /tmp/after  --steps 120 --threads 1 --seed 0   # on the new one
    python scripts/compare_demo_runs.py /tmp/before /tmp/after

What is compared:

* `metrics.prom`, line by line: every `# HELP` and `# TYPE` line, every sample's name,
  labels and value, in order. The values of the timing series (TIMING_FAMILIES: wall-clock
  timestamps, probe seconds, throughputs, the monitor's overhead ratio) are replaced by
  `<timing>`; their lines must still be there.
* `run.db`: every table, every row (ordered by all columns), every column. Timing columns
  (`runs.created`, `probe_rounds.seconds`) and the values of timing metrics
  (TIMING_METRICS) become `<timing>`; in `runs.meta` the process id becomes `<pid>`; the
  output folder (the config's `out_dir`, and the folder's path wherever else it appears)
  becomes `<OUT>`.
* `alerts.jsonl`, line by line (the same rows as the store's alerts table, as delivered).

`--steps 120 --threads 1 --seed 0` makes the demo deterministic on one machine (one torch
thread: no reduction-order differences; the demo turns the probe-overhead budget off, so
probe rounds run at fixed steps). Exit status 0 when identical, 1 with a diff otherwise.
Standard library only, so it runs against any checkout's outputs.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sqlite3
import sys
from pathlib import Path
from typing import List

# Exposition families whose sample values are wall-clock times or depend on them.
TIMING_FAMILIES = {
    "fineline_run_start_timestamp_seconds",
    "fineline_last_step_timestamp_seconds",
    "fineline_last_probe_timestamp_seconds",
    "fineline_probe_round_seconds",
    "fineline_probe_tokens_per_second",
    "fineline_monitor_overhead_ratio",
    "fineline_train_tokens_per_second",
}
# Monitor metric names (run.db `metrics.name`) whose values are timings.
TIMING_METRICS = {
    "monitor/probe_seconds",
    "monitor/probe_tokens_per_s",
    "monitor/overhead",
    "train/tokens_per_s",
}
# (table, column) pairs holding timings.
TIMING_COLUMNS = {("runs", "created"), ("probe_rounds", "seconds")}

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(\s+\S+)?$")


def exposition_lines(path: Path) -> List[str]:
    out = []
    for line in path.read_text().splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            name, labels, _value, _ts = m.groups()
            if name in TIMING_FAMILIES:
                line = f"{name}{labels or ''} <timing>"
        out.append(line)
    return out


def store_lines(path: Path, out_dir: Path) -> List[str]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [
            r[0]
            for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")
        ]
        lines: List[str] = []
        for table in tables:
            cols = [r[1] for r in con.execute(f"PRAGMA table_info({table})")]
            lines.append(f"== {table} ({', '.join(cols)})")
            rows = []
            order = ", ".join(str(i + 1) for i in range(len(cols)))
            for row in con.execute(f"SELECT * FROM {table} ORDER BY {order}"):
                cells = []
                for col, v in zip(cols, row):
                    if (table, col) in TIMING_COLUMNS:
                        v = "<timing>"
                    elif (
                        table == "metrics"
                        and col == "value"
                        and row[cols.index("name")] in TIMING_METRICS
                    ):
                        v = "<timing>"
                    elif table == "runs" and col == "meta" and isinstance(v, str):
                        meta = json.loads(v)
                        meta["pid"] = "<pid>"
                        v = json.dumps(meta, sort_keys=True)
                    elif table == "runs" and col == "config" and isinstance(v, str):
                        config = json.loads(v)
                        config["out_dir"] = (
                            "<OUT>"  # where the run wrote, even if the folder moved since
                        )
                        v = json.dumps(config, sort_keys=True)
                    cells.append(repr(v).replace(str(out_dir), "<OUT>"))
                rows.append(" | ".join(cells))
            lines.extend(rows)
        return lines
    finally:
        con.close()


def alert_lines(path: Path) -> List[str]:
    return path.read_text().splitlines() if path.exists() else ["<no alerts.jsonl>"]


def compare(before: Path, after: Path, context: int = 2) -> int:
    failed = 0
    for what, a, b in (
        (
            "metrics.prom",
            exposition_lines(before / "metrics.prom"),
            exposition_lines(after / "metrics.prom"),
        ),
        ("run.db", store_lines(before / "run.db", before), store_lines(after / "run.db", after)),
        ("alerts.jsonl", alert_lines(before / "alerts.jsonl"), alert_lines(after / "alerts.jsonl")),
    ):
        if a == b:
            print(f"{what}: identical apart from timings ({len(a)} lines compared)")
            continue
        failed = 1
        diff = list(
            difflib.unified_diff(
                a, b, f"{before.name}/{what}", f"{after.name}/{what}", n=context, lineterm=""
            )
        )
        print(f"{what}: DIFFERENT ({sum(1 for d in diff if d[:1] in '+-') - 2} changed lines)")
        print("\n".join(diff[:200]))
        if len(diff) > 200:
            print(f"... {len(diff) - 200} more diff lines")
    return failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path, help="demo output folder of the old commit")
    p.add_argument("after", type=Path, help="demo output folder of the new commit")
    args = p.parse_args(argv)
    return compare(args.before.resolve(), args.after.resolve())


if __name__ == "__main__":
    sys.exit(main())
