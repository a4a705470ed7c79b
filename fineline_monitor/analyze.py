"""`fineline-monitor analyze TRAJ.csv [--reference REF.csv] --out DIR`: offline replay.

A table of checkpoint evaluations (the trajectory CSV of docs/formats.md, or lm-eval-harness
output folders) is replayed run by run, step by step, through the same AlertEngine the
live monitor uses: a run's evaluation steps are one block of rounds for
`AlertEngine.observe_table`, the path a live probe round takes as a block of one round, so
the phases, expectations and rules are the live ones. Every curve `(task, metric)` of a
step is judged before it is learnt.

Rows whose `task` is `train`, `optim` or `stability` are per-step indicators
(`train/loss`, `train/lr`, `optim/grad_norm`, ...): they go through `observe_metrics`
first, so a table with an LR column gets inferred phases. Without one, phases are
`stable` unless declared with `--phases warmup@0,stable@2000,decay@90000`.

Writes DIR/alerts.jsonl (the alert rows of docs/formats.md, with the `source` and `model` of
the curve; run-wide alerts leave task/metric null) and DIR/summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from fineline_monitor import metric_names as names
from fineline_monitor.core.alerts import AlertEngine, CurveTable
from fineline_monitor.core.config import AlertConfig, ConfigError, MonitorConfig
from fineline_monitor.core.expectations import (
    ACC,
    ReferenceCurves,
    capability_for,
    chance_for,
    metric_kind,
)
from fineline_monitor.core.ladder import Ladder, LadderError, ladder_from_config
from fineline_monitor.core.trajectory import Curve, TrajectoryError, read_trajectory
from fineline_monitor.core.types import Alert

STEP_NAMESPACES = ("train", "optim", "stability")


def replay_run(
    curves: List[Curve],
    cfg: AlertConfig,
    *,
    reference: Optional[ReferenceCurves] = None,
    ladder: Optional[Ladder] = None,
    run_name: Optional[str] = None,
) -> Tuple[List[Alert], Dict[str, Any]]:
    """Replay one run's curves through a fresh AlertEngine; returns (alerts, run summary).
    `ladder`: reference runs judged against (the run's parameter count, for the fit across
    sizes, is `alerts.reference.params` or else the table's `params` column)."""
    if not curves:
        return [], {}
    source, model = curves[0].source, curves[0].model
    run_params = cfg.reference.params or next((c.params for c in curves if c.params), None)
    eng = AlertEngine(
        cfg,
        run=run_name or f"{source}/{model}",
        source=source,
        model=model,
        reference=reference,
        params=cfg.detector,
        emit_expectations=False,
        ladder=ladder,
        run_params=run_params,
    )
    probe, step_curves = [], []
    too_short, untracked = [], []
    for c in curves:
        if c.task in STEP_NAMESPACES:
            step_curves.append(c)
        elif len(c) < 2:
            too_short.append(f"{c.task}/{c.metric}")
            probe.append(c)
        else:
            if metric_kind(c.metric) is None:
                untracked.append(f"{c.task}/{c.metric}")
            probe.append(c)
    keys = [names.probe_key(c.task, c.metric) for c in probe]
    tasks = [c.task for c in probe]
    metrics = [c.metric for c in probe]
    caps = [capability_for(c.task) for c in probe]
    chance = [chance_for(c.task) if metric_kind(c.metric) == ACC else None for c in probe]
    # all points of the run, grouped by step
    ci = (
        np.concatenate([np.full(len(c), i) for i, c in enumerate(probe)])
        if probe
        else np.zeros(0, int)
    )
    st = np.concatenate([c.steps for c in probe]) if probe else np.zeros(0, np.int64)
    tk = np.concatenate([c.tokens for c in probe]) if probe else np.zeros(0)
    va = np.concatenate([c.values for c in probe]) if probe else np.zeros(0)
    se = np.concatenate([c.stderr for c in probe]) if probe else np.zeros(0)
    var = se * se
    order = np.argsort(st, kind="stable")
    ci, st, tk, va, var = ci[order], st[order], tk[order], va[order], var[order]
    bounds = np.flatnonzero(np.diff(st)) + 1
    starts = np.concatenate([[0], bounds]) if st.size else np.zeros(0, int)
    ends = np.concatenate([bounds, [st.size]]) if st.size else np.zeros(0, int)
    step_rows: Dict[int, Dict[str, float]] = {}
    step_tokens: Dict[int, float] = {}
    for c in step_curves:
        for s, t, v in zip(c.steps.tolist(), c.tokens.tolist(), c.values.tolist()):
            step_rows.setdefault(s, {})[f"{c.task}/{c.metric}"] = v
            if not math.isnan(t):
                step_tokens[s] = t
    probe_steps = st[starts].tolist() if st.size else []
    all_steps = sorted(set(probe_steps) | set(step_rows))
    pos = {s: k for k, s in enumerate(probe_steps)}
    alerts: List[Alert] = []
    # Pass 1, in step order: per-step indicator rows (their LR drives the phase tracker)
    # and the phase/segment in force at each evaluation round, as observe_probe sees them.
    r_tokens: List[Optional[float]] = []
    r_phase: List[str] = []
    r_seg: List[int] = []
    for s in all_steps:
        if s in step_rows:
            m = step_rows[s]
            t = step_tokens.get(s)
            alerts += eng.observe_metrics(s, None if t is None else int(t), m.get("train/lr"), m)
        k = pos.get(s)
        if k is None:
            continue
        t = tk[starts[k] : ends[k]]
        t_ok = t[np.isfinite(t)]
        tokens = float(t_ok[0]) if t_ok.size else step_tokens.get(s)
        eng.phases.observe(s, tokens, None)
        r_tokens.append(tokens)
        r_phase.append(eng.phases.phase)
        r_seg.append(eng.phases.segment)
    rounds = len(probe_steps)
    # Pass 2: every curve and round at once, through the path live rounds take
    rnd = np.repeat(np.arange(rounds), ends - starts) if rounds else np.zeros(0, np.int64)
    alerts += eng.observe_table(
        CurveTable(
            steps=probe_steps,
            tokens=r_tokens,
            phases=r_phase,
            segments=r_seg,
            keys=keys,
            tasks=tasks,
            metrics=metrics,
            capabilities=caps,
            chance=chance,
            pt_curve=ci,
            pt_round=rnd,
            pt_value=va,
            pt_var=var,
        )
    )
    alerts.sort(key=lambda a: a.step)
    summary = {
        "source": source,
        "model": model,
        "rounds": rounds,
        "curves": len(probe),
        "points": int(st.size),
        "too_short": too_short,
        "untracked_metrics": len(untracked),
        "phase_changes": eng.phases.history,
        "alerts": _count(alerts),
    }
    if ladder is not None:
        summary["notes"] = list(eng.context.notes)
    return alerts, summary


def _count(alerts: List[Alert]) -> Dict[str, Any]:
    by_sev: Dict[str, int] = {}
    by_rule: Dict[str, int] = {}
    for a in alerts:
        by_sev[a.severity] = by_sev.get(a.severity, 0) + 1
        by_rule[a.rule] = by_rule.get(a.rule, 0) + 1
    return {"total": len(alerts), "by_severity": by_sev, "by_rule": by_rule}


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):  # the cores this process may use, not the machine's
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _table_params(traj: Any) -> Optional[float]:
    return next((c.params for c in traj.curves if c.params), None)


def _replay_job(job: Tuple[List[Curve], AlertConfig, Optional[Ladder]]):
    curves, cfg, ladder = job
    if ladder is not None:
        ladder = ladder.for_run(
            f"{curves[0].source}/{curves[0].model}", _run_total_tokens(curves, cfg)
        )
    return replay_run(curves, cfg, ladder=ladder)


def _run_total_tokens(curves: List[Curve], cfg: AlertConfig) -> Optional[float]:
    """A run's planned tokens for schedule-fraction alignment: `alerts.reference.total_tokens`,
    else the last tokens the table has for it (right for a finished run)."""
    if cfg.reference.total_tokens:
        return float(cfg.reference.total_tokens)
    last = [float(np.nanmax(c.tokens)) for c in curves if np.isfinite(c.tokens).any()]
    return max(last) if last else None


def _replay_all(
    runs: Dict[Any, List[Curve]], cfg: AlertConfig, ladder: Optional[Ladder], jobs: int
) -> List[Tuple[List[Alert], Dict[str, Any]]]:
    """Replay every run, in input order. Runs are independent (one engine each), so with
    jobs > 1 they go to worker processes; the result is the same as the serial loop."""
    work = [(curves, cfg, ladder) for curves in runs.values()]
    jobs = max(1, min(jobs, len(work)))
    if jobs > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        try:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
            # biggest runs first keeps the workers evenly loaded; the order is restored after
            big_first = sorted(range(len(work)), key=lambda i: -sum(len(c) for c in work[i][0]))
            with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                done = list(pool.map(_replay_job, [work[i] for i in big_first], chunksize=1))
            results: List[Any] = [None] * len(work)
            for i, r in zip(big_first, done):
                results[i] = r
            return results
        except (OSError, cf.process.BrokenProcessPool) as e:  # no processes here: do it serially
            print(
                f"fineline-monitor analyze: worker processes unavailable ({e}); replaying serially",
                file=sys.stderr,
            )
    return [_replay_job(w) for w in work]


def analyze(
    path: str,
    out: str,
    *,
    reference: Union[None, str, Sequence[str]] = None,
    reference_model: str = "",
    reference_models: Sequence[str] = (),
    cfg: Optional[AlertConfig] = None,
    jobs: int = 1,
) -> Dict[str, Any]:
    """Replay a whole table; write DIR/alerts.jsonl and DIR/summary.json; return the summary.
    `reference`: reference files (a ladder; default: the config's `alerts.reference`),
    `reference_models`: which of their runs. A run of the table that is also in the ladder is
    judged without itself. `jobs`: worker processes for the per-run replays."""
    t0 = time.perf_counter()
    cfg = cfg or AlertConfig()
    traj = read_trajectory(path)
    files = [reference] if isinstance(reference, str) else list(reference or [])
    models = list(reference_models) or ([reference_model] if reference_model else [])
    ladder, notes = ladder_from_config(
        cfg,
        run_params=cfg.reference.params or _table_params(traj),
        files=files,
        runs=models,
        total_tokens_known=True,
        tables={str(path): traj},
    )
    for n in notes:
        print(f"fineline-monitor analyze: note: {n}", file=sys.stderr)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = traj.runs()
    all_alerts: List[Alert] = []
    run_summaries = []
    for alerts, summ in _replay_all(runs, cfg, ladder, jobs):
        all_alerts += alerts
        run_summaries.append(summ)
        for n in summ.get("notes", []):
            if n not in notes:
                notes.append(n)
                print(f"fineline-monitor analyze: note: {n}", file=sys.stderr)
    with open(out_dir / "alerts.jsonl", "w") as fh:
        for a in all_alerts:
            row = a.to_json()
            if a.task is None:
                # the alert row's contract (docs/formats.md): a run-wide alert (loss, gradients,
                # stability) leaves task/metric null in analyze output; which indicator fired is in `rule` and `message`
                row["metric"] = None
            fh.write(json.dumps(row) + "\n")
    summary = {
        "input": str(path),
        "reference": files or None,
        "reference_runs": ladder.names if ladder else None,
        "reference_align": ladder.align if ladder else None,
        "reference_notes": notes,
        "rows": traj.n_rows,
        "runs": len(runs),
        "curves": len(traj.curves),
        "rounds": int(sum(s["rounds"] for s in run_summaries)),
        "alerts": _count(all_alerts),
        "criticals": [
            {
                "source": a.source,
                "model": a.model,
                "step": a.step,
                "rule": a.rule,
                "task": a.task,
                "metric": a.metric,
            }
            for a in all_alerts
            if a.severity == "critical"
        ][:100],
        "settings": {
            "band_sigma": cfg.band_sigma,
            "hysteresis": cfg.hysteresis,
            "cooldown_rounds": cfg.cooldown_rounds,
            "phases": list(cfg.phases),
            "warmup_steps": cfg.warmup_steps,
        },
        "per_run": run_summaries,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `analyze` on the `fineline-monitor` CLI."""
    p = subparsers.add_parser(
        "analyze",
        help="replay a trajectory table through phases, expectations and rules",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_args(p)
    p.set_defaults(func=run_cli)
    return p


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "trajectory",
        help="trajectory CSV (.csv/.csv.gz), or an lm-eval-harness output folder / results_*.json",
    )
    p.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="FILE",
        help="reference runs (a ladder of smaller runs of the same recipe, or an earlier run): a "
        "trajectory CSV, an lm-eval output folder or a run.db; repeat for several files",
    )
    p.add_argument(
        "--reference-models",
        default="",
        metavar="A,B,C",
        help="which runs of the reference files (`model` or `source/model`, comma-separated); "
        "default: all of them",
    )
    p.add_argument(
        "--reference-model", default="", help=argparse.SUPPRESS
    )  # the older single-run spelling
    p.add_argument("--out", required=True, help="output folder for alerts.jsonl and summary.json")
    p.add_argument(
        "--config", default=None, help="MonitorConfig YAML; its `alerts` section is used"
    )
    p.add_argument(
        "--phases", default="", help="declared phases for every run, e.g. warmup@0,stable@2000"
    )
    p.add_argument("--warmup-steps", type=int, default=None, help="declared warmup length in steps")
    p.add_argument(
        "--band-sigma", type=float, default=None, help="band width in standard deviations"
    )
    p.add_argument(
        "--hysteresis", type=int, default=None, help="consecutive out-of-band rounds before firing"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="worker processes for the per-run replays (default 0: one per CPU core; 1: serial)",
    )


def run_cli(args: argparse.Namespace) -> int:
    try:
        base = MonitorConfig.from_yaml(args.config).alerts if args.config else AlertConfig()
        over: Dict[str, Any] = {}
        if args.phases:
            over["phases"] = [s.strip() for s in args.phases.split(",") if s.strip()]
        if args.warmup_steps is not None:
            over["warmup_steps"] = args.warmup_steps
        if args.band_sigma is not None:
            over["band_sigma"] = args.band_sigma
        if args.hysteresis is not None:
            over["hysteresis"] = args.hysteresis
        cfg = MonitorConfig(alerts={**base.__dict__, **over}).alerts if over else base
        if args.jobs < 0:
            raise ValueError(f"--jobs must be >= 0 (0: one per CPU core), got {args.jobs}")
        jobs = args.jobs or _cpu_count()
        models = [
            m.strip()
            for m in f"{args.reference_models},{args.reference_model}".split(",")
            if m.strip()
        ]
        summary = analyze(
            args.trajectory,
            args.out,
            reference=args.reference,
            reference_models=models,
            cfg=cfg,
            jobs=jobs,
        )
    except (TrajectoryError, ConfigError, LadderError, ValueError) as e:
        print(f"fineline-monitor analyze: error: {e}", file=sys.stderr)
        return 2
    a = summary["alerts"]
    print(
        f"analyzed {summary['rows']} rows, {summary['runs']} runs, {summary['curves']} curves, "
        f"{summary['rounds']} rounds in {summary['seconds']:.1f} s: {a['total']} alerts "
        f"{a['by_severity']} -> {args.out}/alerts.jsonl, {args.out}/summary.json"
    )
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="fineline-monitor analyze",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_args(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
