"""`fineline-monitor report DIR`: render DIR/report.html from DIR/run.db."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="render the run's HTML report from its store",
        description="Render DIR/report.html (self-contained: no network needed to view it) "
        "from DIR/run.db: capability curves with expected bands and phases, "
        "indicators next to the loss, alerts with their explanations.",
    )
    p.add_argument("dir", type=Path, help="the run's output folder (holds run.db)")
    p.add_argument("--run", default=None, help="which run of the store (default: the latest)")
    p.add_argument(
        "--output", type=Path, default=None, help="where to write (default DIR/report.html)"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from fineline_monitor.report.render import render_report

    db = Path(args.dir) / "run.db"
    if not db.exists():
        print(
            f"fineline-monitor report: {db}: no run store here (expected the folder a run wrote, "
            f"with run.db)",
            file=sys.stderr,
        )
        return 2
    try:
        path = render_report(Path(args.dir), run=args.run, output=args.output)
    except ValueError as e:
        print(f"fineline-monitor report: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
