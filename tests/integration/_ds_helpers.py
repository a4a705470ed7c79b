"""Helpers of the two-rank integration tests: launch torchrun with a hard timeout, and
re-score a saved model's probe documents in this (single) process."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    script: str,
    args: List[str],
    *,
    nproc: int = 2,
    timeout: float = 150.0,
    env: Optional[Dict[str, str]] = None,
) -> subprocess.CompletedProcess:
    """Run `script` under torchrun (gloo, CPU); the subprocess timeout is the hard bound."""
    e = dict(os.environ)
    e.update(
        {
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": str(REPO),
            "CUDA_VISIBLE_DEVICES": "",
        }
    )
    e.update(env or {})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(REPO / script),
    ] + args
    return subprocess.run(
        cmd, cwd=str(REPO), env=e, capture_output=True, text=True, timeout=timeout
    )


def tail(p: subprocess.CompletedProcess, n: int = 4000) -> str:
    return (p.stdout + "\n" + p.stderr)[-n:]


def request_logprobs(round_json: dict) -> Dict[Tuple[str, int, int], float]:
    return {(r["task"], r["doc_id"], r["choice"]): r["logprob"] for r in round_json["requests"]}


def rescore_hf(out: Path, docs_per_task: int) -> dict:
    """Single process, no torch.distributed: the saved weights through the plain probe path."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    sys.path.insert(0, str(REPO / "examples"))
    import _common as C

    from fineline_monitor import MonitorConfig
    from fineline_monitor.probes.runner import ProbeRunner

    tok = PreTrainedTokenizerFast.from_pretrained(str(out / "tokenizer"))
    model = GPT2LMHeadModel(GPT2Config.from_pretrained(str(out)))
    model.load_state_dict(torch.load(out / "weights.pt"))
    cfg = MonitorConfig(
        probes={"tasks": C.PROBE_TASKS, "docs_per_task": docs_per_task, "batch_size": 8}
    )
    return ProbeRunner(cfg.probes, model=model, tokenizer=tok).run(step=0).to_json()


def load_round(out: Path) -> dict:
    return json.loads((out / "probe_round.json").read_text())


def run_scaler_worker(
    out: Path, precision: str, steps: int, *, env: Optional[Dict[str, str]] = None
) -> dict:
    """tests/integration/ds_scaler_worker.py under torchrun (one process); returns what the
    engine reported (engine.json) and what the monitor stored, per optimizer step."""
    from fineline_monitor import metric_names as names
    from fineline_monitor.core.store import RunStore

    p = torchrun(
        "tests/integration/ds_scaler_worker.py",
        [str(out), precision, str(steps)],
        nproc=1,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0 and (out / "engine.json").exists(), tail(p)
    engine = json.loads((out / "engine.json").read_text())
    s = RunStore(out / "run.db", run="ds", readonly=True)
    try:
        stored = {
            n: {st: v for st, _, v in s.series(n)}
            for n in (names.LOSS, names.GRAD_NORM, names.LOSS_SCALE, names.SKIPPED_STEPS)
        }
    finally:
        s.close()
    return {"engine": engine, "stored": stored}


def check_one_row_per_optimizer_step(got: dict) -> None:
    """The monitor stepped once per optimizer step with the mean of its micro-batch losses
    and the engine's own gradient norm."""
    from fineline_monitor import metric_names as names

    steps = got["engine"]["steps"]
    stored = got["stored"]
    assert sorted(stored[names.LOSS]) == [
        r["global_step"] for r in steps if r["global_step"] in stored[names.LOSS]
    ]
    for r in steps:
        gs = r["global_step"]
        mean = sum(r["micro_losses"]) / len(r["micro_losses"])
        assert abs(stored[names.LOSS][gs] - mean) < 1e-5 * max(1.0, abs(mean)), (
            gs,
            stored[names.LOSS][gs],
            mean,
        )
        if (
            r["grad_norm"] is not None
            and math.isfinite(r["grad_norm"])
            and gs in stored[names.GRAD_NORM]
        ):
            assert abs(stored[names.GRAD_NORM][gs] - r["grad_norm"]) < 1e-5 * max(
                1.0, r["grad_norm"]
            ), gs
