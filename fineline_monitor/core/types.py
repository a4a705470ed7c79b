"""Plain data types shared by every part of the monitor.

No torch here: these objects cross from the torch side (scorers, indicators) into the
pure-Python side (history, rules, store, sinks) and must be testable with plain lists.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

SEVERITIES = ("info", "warning", "critical")

# The six capability families of "The Fine Line" (arXiv 2404.01204).
CAPABILITIES = (
    "commonsense",
    "knowledge",
    "reading",
    "math",
    "code",
    "examination",
)


@dataclass
class RequestScore:
    """One scored (document, choice) request: the row of the probe result JSON."""

    task: str
    doc_id: int
    choice: int
    logprob: float  # sum of log-probabilities of the continuation tokens (natural log)
    n_tokens: int
    n_bytes: int  # UTF-8 bytes of the continuation
    is_greedy: bool
    n_chars: int = 0  # characters of the continuation (acc_norm divides by this)
    truncated: bool = False  # context was left-truncated to fit the model

    def to_json(self) -> Dict[str, Any]:
        return {
            "task": self.task,
            "doc_id": self.doc_id,
            "choice": self.choice,
            "logprob": self.logprob,
            "n_tokens": self.n_tokens,
            "n_bytes": self.n_bytes,
            "is_greedy": self.is_greedy,
        }


@dataclass
class TaskResult:
    """Per-task metrics of one probe round."""

    task: str
    capability: str
    n_docs: int
    metrics: Dict[str, float]  # e.g. acc, acc_norm, bpb, gold_logprob
    stderr: Dict[str, float] = field(default_factory=dict)
    random_baseline: float = 0.0  # chance accuracy, for capability scores
    primary_metric: str = "acc"  # which metric the rules watch first
    # accuracy of always giving the same answer (the most common gold continuation text on
    # these documents: " yes" on BoolQ scores 0.62); take-off is measured from it when it is
    # above random_baseline. 0 = unknown.
    constant_baseline: float = 0.0


@dataclass
class ProbeRound:
    """Everything one probe round produced, in input order."""

    step: int
    tokens: Optional[int]
    tasks: Dict[str, TaskResult]
    requests: List[RequestScore]
    seconds: float
    tokens_scored: int
    n_truncated: int = 0
    # `<capability>/<series>` -> value (probes/metrics.py: bpb, acc_above_chance, headline, took_off)
    capability_scores: Dict[str, float] = field(default_factory=dict)
    capability_stderr: Dict[str, float] = field(default_factory=dict)  # same keys, where known
    # gold log-probability per document, keyed by task then doc_id; rounds compare doc by doc
    gold_logprobs: Dict[str, Dict[int, float]] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        """The probe result JSON (docs/formats.md)."""
        return {
            "tasks": {
                name: {
                    "capability": r.capability,
                    "n_docs": r.n_docs,
                    "metrics": dict(r.metrics),
                    "stderr": dict(r.stderr),
                }
                for name, r in self.tasks.items()
            },
            "capabilities": dict(self.capability_scores),
            "capabilities_stderr": dict(self.capability_stderr),
            "requests": [q.to_json() for q in self.requests],
            "seconds": self.seconds,
            "tokens_scored": self.tokens_scored,
            "n_truncated": self.n_truncated,
        }


@dataclass
class Alert:
    """One alert; `to_json` is the alerts JSONL row (docs/formats.md)."""

    rule: str
    severity: str
    step: int
    message: str
    tokens: Optional[int] = None
    run: Optional[str] = None
    source: Optional[str] = None
    model: Optional[str] = None
    capability: Optional[str] = None
    task: Optional[str] = None
    metric: Optional[str] = None
    observed: Optional[float] = None
    expected: Optional[float] = None
    band: Optional[List[float]] = None  # [low, high]
    phase: Optional[str] = None

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"alert severity {self.severity!r} is not one of {SEVERITIES}")

    @property
    def dedup_key(self) -> str:
        """Identity of the condition, not of the round: the same key is not paged twice."""
        parts = [
            self.run or "",
            self.source or "",
            self.model or "",
            self.rule,
            self.capability or "",
            self.task or "",
            self.metric or "",
        ]
        return "|".join(parts)

    def to_json(self) -> Dict[str, Any]:
        return {
            "run": self.run,
            "source": self.source,
            "model": self.model,
            "step": self.step,
            "tokens": self.tokens,
            "severity": self.severity,
            "rule": self.rule,
            "capability": self.capability,
            "task": self.task,
            "metric": self.metric,
            "observed": _finite_or_none(self.observed),
            "expected": _finite_or_none(self.expected),
            "band": None if self.band is None else [_finite_or_none(b) for b in self.band],
            "phase": self.phase,
            "message": self.message,
        }

    def to_jsonl(self) -> str:
        return json.dumps(self.to_json(), sort_keys=False)

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Alert":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def _finite_or_none(x: Optional[float]) -> Optional[float]:
    """JSON has no NaN/inf; a non-finite observation is reported as a string-free null
    plus the message, never as invalid JSON."""
    if x is None:
        return None
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return None
    return xf if math.isfinite(xf) else None


def as_dict(obj: Any) -> Dict[str, Any]:
    return asdict(obj)
