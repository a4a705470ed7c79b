"""Long-run memory: does the monitor's memory stay bounded over a million steps?

Simulates a long pretraining run at host speed: the real FineLineMonitor with a
1-parameter model (so the real indicators run: per-step on-device statistics, collected
every 10 steps), the real alert engine (loss-spike, grad and phase rules on every
collection), the real SQLite store, and a cheap stand-in probe round every 10k steps
(three tasks, realistic slowly-improving metrics) so the capability-curve expectations
and history code paths run too. The loss is a smooth decay plus deterministic noise.

Memory is measured two ways at fixed checkpoints:
- Python heap (tracemalloc, current traced bytes): where an unbounded history would grow;
- process RSS (/proc/self/statm): includes SQLite's page cache and allocator slack.
The store holds the full record on disk (its row count is printed), so what must stay
flat is the in-process state.

    .venv/bin/python benchmarks/long_run_memory.py               # 1,000,000 steps
    .venv/bin/python benchmarks/long_run_memory.py --steps 200000

Prints one line per checkpoint and the growth between 10% of the run and the end.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import sys
import tempfile
import time
import tracemalloc
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_json  # noqa: E402

TASKS = (
    ("hellaswag", "commonsense", 0.25),
    ("arc_easy", "knowledge", 0.25),
    ("gsm8k", "math", 0.0),
)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class CheapProbes:
    """Stand-in for ProbeRunner.run: a ProbeRound with 3 tasks, no model forward."""

    def __init__(self, total_steps: int):
        self.total = max(1, total_steps)
        self.rng = random.Random(0)

    def run(self, step, tokens, hooks=None):
        from fineline_monitor.core.types import ProbeRound, RequestScore, TaskResult

        frac = step / self.total
        tasks, reqs = {}, []
        for name, cap, chance in TASKS:
            acc = chance + (0.6 - chance) * (1 - math.exp(-4 * frac)) + self.rng.gauss(0, 0.01)
            bpb = 1.2 * math.exp(-2 * frac) + 0.4 + self.rng.gauss(0, 0.005)
            tasks[name] = TaskResult(
                task=name,
                capability=cap,
                n_docs=100,
                metrics={"acc": acc, "acc_norm": acc, "bpb": bpb, "gold_logprob": -bpb * 20},
                stderr={"acc": 0.04},
                random_baseline=chance,
            )
            reqs += [
                RequestScore(
                    task=name,
                    doc_id=d,
                    choice=0,
                    logprob=-bpb * 20 + self.rng.gauss(0, 0.1),
                    n_tokens=10,
                    n_bytes=40,
                    is_greedy=False,
                )
                for d in range(100)
            ]
        return ProbeRound(
            step=step,
            tokens=tokens,
            tasks=tasks,
            requests=reqs,
            seconds=0.5,
            tokens_scored=4000,
            capability_scores={cap: tasks[n].metrics["acc"] - ch for n, cap, ch in TASKS},
        )


def simulate(
    steps: int,
    out_dir: str,
    checkpoints: List[int],
    *,
    probe_every: int = 10_000,
    use_tracemalloc: bool = True,
    one_param_model: bool = True,
    log=None,
) -> Dict[int, Dict[str, float]]:
    """Run the monitor for `steps` steps; return memory figures at each checkpoint step.

    `one_param_model=False` runs without a model (no torch indicators; the loss, LR and
    tokens still go to the store and the alert engine every 10 steps): about 5x faster,
    what the CI test uses."""
    import torch

    from fineline_monitor import FineLineMonitor, MonitorConfig

    torch.set_num_threads(1)

    class Monitor(FineLineMonitor):
        def _build_probes(self, scorer):
            return CheapProbes(steps)

    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.AdamW([w], lr=1e-3)
    cfg = MonitorConfig(
        run_name="long",
        out_dir=out_dir,
        probe_every=probe_every,
        probe_at_start=False,
        probe_max_overhead=0.0,  # fixed cadence, so the round count is known
        indicators={"collect_every": 10},
        sinks={"enabled": ["store"]},
    )
    model = torch.nn.ParameterList([w]) if one_param_model else None
    mon = Monitor(
        model=model, optimizer=opt if one_param_model else None, config=cfg, scorer=object()
    )
    rng = random.Random(1)
    marks = sorted(set(checkpoints))
    figures: Dict[int, Dict[str, float]] = {}
    if use_tracemalloc:
        tracemalloc.start()
    t0 = time.perf_counter()
    grad = torch.zeros(1)
    for step in range(1, steps + 1):
        loss = 2.0 + 8.0 / math.sqrt(1 + step / 1000) + 0.02 * rng.random()
        g = 0.1 + 0.01 * rng.random()
        if one_param_model:
            grad.fill_(g)
            w.grad = grad
        lr = 1e-3 * min(1.0, step / 2000) * (0.1 if step > 0.9 * steps else 1.0)
        mon.step(step=step, loss=loss, tokens=step * 4096, lr=lr, grad_norm=g)
        if marks and step == marks[0]:
            marks.pop(0)
            gc.collect()
            fig = {"rss_mb": rss_bytes() / 2**20, "seconds": time.perf_counter() - t0}
            if use_tracemalloc:
                fig["py_heap_mb"] = tracemalloc.get_traced_memory()[0] / 2**20
            figures[step] = fig
            if log:
                log(
                    f"step {step:>9,d}  python heap {fig.get('py_heap_mb', float('nan')):8.2f} MiB  "
                    f"RSS {fig['rss_mb']:8.1f} MiB  {fig['seconds']:7.1f}s"
                )
    if use_tracemalloc:
        tracemalloc.stop()
    store = mon.store
    rows = store.row_counts() if store is not None else {}
    figures[-1] = {
        "store_metric_rows": rows.get("metrics", 0),
        "store_probe_rows": rows.get("probe_results", 0),
        "disabled": len(mon.disabled_parts),
    }
    mon.close()
    return figures


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--probe-every", type=int, default=10_000)
    ap.add_argument("--no-tracemalloc", action="store_true", help="RSS only (about 2x faster)")
    ap.add_argument(
        "--no-model", action="store_true", help="model=None: no torch indicators (about 5x faster)"
    )
    bench_json.add_json_argument(ap, "long-run-memory")
    args = ap.parse_args(argv)
    n = args.steps
    marks = sorted({n // 10, n // 4, n // 2, 3 * n // 4, n})
    with tempfile.TemporaryDirectory() as tmp:
        figs = simulate(
            n,
            tmp,
            marks,
            probe_every=args.probe_every,
            use_tracemalloc=not args.no_tracemalloc,
            one_param_model=not args.no_model,
            log=print,
        )
        db_mb = os.path.getsize(os.path.join(tmp, "run.db")) / 2**20
    a, b = figs[marks[0]], figs[n]
    print(
        f"store: {figs[-1]['store_metric_rows']:,} metric rows, {figs[-1]['store_probe_rows']:,} probe rows "
        f"({db_mb:.1f} MiB on disk); parts disabled: {figs[-1]['disabled']}"
    )
    if "py_heap_mb" in a:
        print(
            f"python heap growth from step {marks[0]:,} to {n:,}: {b['py_heap_mb'] - a['py_heap_mb']:+.3f} MiB"
        )
    print(
        f"RSS growth from step {marks[0]:,} to {n:,}: {b['rss_mb'] - a['rss_mb']:+.1f} MiB; "
        f"{n / b['seconds']:,.0f} steps/s"
    )
    bench_json.write(
        args.json,
        "long-run-memory",
        {
            "steps": n,
            "probe_every": args.probe_every,
            "tracemalloc": not args.no_tracemalloc,
            "model": not args.no_model,
            "checkpoints": [{"step": m, **figs[m]} for m in marks],
            "heap_growth_mb": (b["py_heap_mb"] - a["py_heap_mb"]) if "py_heap_mb" in a else None,
            "rss_growth_mb": b["rss_mb"] - a["rss_mb"],
            "growth_from_step": marks[0],
            "store_metric_rows": figs[-1]["store_metric_rows"],
            "store_probe_rows": figs[-1]["store_probe_rows"],
            "store_mb": db_mb,
            "steps_per_s": n / b["seconds"],
        },
        size="" if n == 1_000_000 else f"{n:,} steps (the script's default is 1,000,000)",
        argv=[__file__, *(sys.argv[1:] if argv is None else argv)],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
