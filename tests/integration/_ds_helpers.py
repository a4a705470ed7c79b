"""Helpers of the two-rank integration tests: launch torchrun with a hard timeout, and
re-score a saved model's probe documents in this (single) process."""

from __future__ import annotations

import json
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


def torchrun(script: str, args: List[str], *, nproc: int = 2, timeout: float = 150.0,
             env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run `script` under torchrun (gloo, CPU); the subprocess timeout is the hard bound."""
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    e.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(REPO / script)] + args
    return subprocess.run(cmd, cwd=str(REPO), env=e, capture_output=True, text=True, timeout=timeout)


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
    cfg = MonitorConfig(probes={"tasks": C.PROBE_TASKS, "docs_per_task": docs_per_task, "batch_size": 8})
    return ProbeRunner(cfg.probes, model=model, tokenizer=tok).run(step=0).to_json()


def load_round(out: Path) -> dict:
    return json.loads((out / "probe_round.json").read_text())
