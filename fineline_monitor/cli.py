"""The `fineline-monitor` command line.

Subcommands (their inputs and outputs: docs/formats.md): demo, probe, analyze, report; plus tasks (the
probe registry), export (store -> trajectory CSV) and config-reference (docs/configuration.md's
config table, generated from MonitorConfig). Each part registers its own subcommand
(`add_parser`) so this file stays a dispatcher.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# (module, attribute) of each part's `add_parser(subparsers)`; imported lazily so that
# `fineline-monitor analyze` never imports torch.
_PARTS = [
    ("fineline_monitor.probes.cli", "add_parser"),
    ("fineline_monitor.analyze", "add_parser"),
    ("fineline_monitor.report.cli", "add_parser"),
]


def _add_demo(sub) -> None:
    from fineline_monitor.demo import DemoArgs

    d = DemoArgs()
    p = sub.add_parser(
        "demo",
        help="train a tiny GPT on the CPU with the monitor attached",
        description="Pretrain two pilot models and a tiny GPT-2 on the CPU (corpus: the CPython "
        "standard library's docs and sources) with the monitor attached, judge the "
        "target against its own fit and the pilots, inject one fault, and write "
        "OUT/run.db, alerts.jsonl, report.html, metrics.prom, reference/ladder.csv "
        "(docs/demo.md).",
    )
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument(
        "--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})"
    )
    p.add_argument(
        "--inject",
        default=d.inject,
        metavar="KIND@STEP",
        help="fault to inject: data_mixture (English prose leaves the mixture), stall (LR x 1e-3 "
        "with no scheduled decay), lr_spike, data_corruption or grad_explosion, as KIND@STEP "
        "or KIND (at 60%% of the run); `none` for a healthy run (default: data_mixture at 60%%)",
    )
    p.add_argument(
        "--probe-every", type=int, default=d.probe_every, help=f"default {d.probe_every}"
    )
    p.add_argument(
        "--docs-per-task", type=int, default=d.docs_per_task, help=f"default {d.docs_per_task}"
    )
    p.add_argument(
        "--tasks", default=d.tasks, help="comma-separated probe tasks (default: the default suite)"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument(
        "--pilots",
        type=int,
        default=d.pilots,
        choices=range(0, d.pilots + 1),
        help=f"pilot models of the reference ladder (default {d.pilots}; 0: own-run fit only)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help=f"torch threads (default {d.threads}; 0: torch's default)",
    )
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from fineline_monitor.demo import DemoArgs, run_demo

    for name in ("steps", "probe_every", "docs_per_task", "batch_size", "seq_len"):
        if getattr(args, name) < (0 if name == "probe_every" else 1):
            print(
                f"fineline-monitor demo: --{name.replace('_', '-')} got {getattr(args, name)}; must be positive",
                file=sys.stderr,
            )
            return 2
    try:
        run_demo(
            DemoArgs(
                out=args.out,
                steps=args.steps,
                inject=args.inject,
                probe_every=args.probe_every,
                docs_per_task=args.docs_per_task,
                tasks=args.tasks,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                seed=args.seed,
                threads=args.threads,
                pilots=args.pilots,
            )
        )
    except (ValueError, FileExistsError) as e:
        print(f"fineline-monitor demo: {e}", file=sys.stderr)
        return 2
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a run store's probe results as a trajectory CSV")
    p.add_argument("store", help="OUT folder or run.db path")
    p.add_argument("--run", default=None, help="run name (default: every run in the store)")
    p.add_argument("--output", "-o", default="-", help="CSV path (default: stdout)")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from pathlib import Path

    from fineline_monitor.core.store import RunStore

    path = Path(args.store)
    if path.is_dir():
        path = path / "run.db"
    try:
        store = RunStore(path, readonly=True)
    except FileNotFoundError as e:
        print(f"fineline-monitor export: {e}", file=sys.stderr)
        return 2
    runs = [args.run] if args.run else store.runs()
    fh = sys.stdout if args.output == "-" else open(args.output, "w", newline="")
    try:
        n = store.export_trajectory_csv(fh, args.run or None, all_runs=not args.run)
    finally:
        if fh is not sys.stdout:
            fh.close()
    print(f"exported {n} rows from {len(runs)} run(s)", file=sys.stderr)
    return 0


def _add_config_reference(sub) -> None:
    p = sub.add_parser(
        "config-reference", help="print the MonitorConfig reference table (markdown)"
    )
    p.add_argument(
        "--check", metavar="CONFIG.yaml", help="instead, validate a YAML config and print it"
    )
    p.set_defaults(func=_run_config_reference)


def _run_config_reference(args) -> int:
    from fineline_monitor.core.config import ConfigError, MonitorConfig, reference_markdown

    if args.check:
        try:
            cfg = MonitorConfig.from_yaml(args.check)
        except ConfigError as e:
            print(f"fineline-monitor: {e}", file=sys.stderr)
            return 2
        print(cfg.to_yaml())
        return 0
    print(reference_markdown())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fineline-monitor", description="Live training monitor for LLM pretraining."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    for module, attr in _PARTS:
        getattr(importlib.import_module(module), attr)(sub)
    _add_export(sub)
    _add_config_reference(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
