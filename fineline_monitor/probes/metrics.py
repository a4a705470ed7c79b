"""Per-task metrics from request scores (plain numpy: testable with plain lists).

Definitions (lm-eval-harness 0.4.x where it has one):

- ``acc``: 1 if ``argmax_i logprob_i`` is the gold choice (first index wins ties, np.argmax).
- ``acc_norm``: the same with ``logprob_i / n_chars_i``, ``n_chars`` the length in characters
  of the choice text, i.e. the continuation without the one leading target-delimiter space
  (lm-eval divides by ``len(doc_to_choice(doc)[i])``, and requests carry ``" " + choice``).
- ``bpb``: bits per UTF-8 byte of the gold continuation (as given in the request, leading
  space included): ``-logprob_gold / (ln 2 * n_bytes)``, averaged over documents (so its
  stderr is the sample stderr of the per-document values).
- ``gold_logprob``: mean log-probability (nats) of the gold continuation.
- stderr: sample standard deviation / sqrt(n) of the per-document values (lm-eval's
  ``mean_stderr``; for 0/1 accuracies this is the binomial sqrt(p(1-p)/(n-1))). Omitted
  for n < 2.

Capability series (``ProbeRound.capability_scores``, keys ``<capability>/<series>``; names in
fineline_monitor/metric_names.py):

- ``<cap>/bpb``: gold-continuation bits per byte, the mean over the capability's tasks (the
  OLMo in-loop convention; lower is better). It moves long before accuracy takes off.
- ``<cap>/acc_above_chance``: the mean over its multiple-choice tasks of (primary accuracy -
  random baseline), so 0 is chance for every task (higher is better). bpb-only
  capabilities (a suite of code bpb tasks) have none.
- ``<cap>/headline``: the one number to read: bpb until the capability has taken off, then
  accuracy above chance; ``<cap>/took_off`` (1/0) says which. Taken off means accuracy above
  chance exceeds twice its stderr plus ``TAKEOFF_MARGIN`` in that round.

``ProbeRound.capability_stderr`` holds the stderr of the bpb and accuracy series: the
stderr of a mean of independent task means, sqrt(sum se_i^2) / n.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Dict, List, Sequence, Tuple

import numpy as np

from fineline_monitor.core.types import RequestScore, TaskResult

LN2 = math.log(2.0)


def n_chars_of(continuation: str) -> int:
    """Characters of the choice text: the continuation minus one leading delimiter space."""
    return (
        len(continuation) - 1
        if continuation.startswith(" ") and len(continuation) > 1
        else len(continuation)
    )


def _mean_stderr(xs: Sequence[float]) -> Tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    mean = float(a.mean()) if a.size else float("nan")
    se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size >= 2 else float("nan")
    return mean, se


def doc_outcome(scores: Sequence[RequestScore], gold: int) -> Dict[str, float]:
    """acc / acc_norm / gold bpb / gold logprob of one document (choices in index order)."""
    lls = np.array([s.logprob for s in scores], dtype=np.float64)
    out = {"gold_logprob": float(lls[gold])}
    g = scores[gold]
    out["bpb"] = -g.logprob / (LN2 * g.n_bytes) if g.n_bytes > 0 else float("nan")
    if len(scores) > 1:
        chars = np.array([float(s.n_chars) for s in scores])
        out["acc"] = 1.0 if int(np.argmax(lls)) == gold else 0.0
        out["acc_norm"] = 1.0 if int(np.argmax(lls / chars)) == gold else 0.0
    return out


def constant_baseline(gold_texts: Sequence[str]) -> float:
    """Accuracy of always answering the same: the share of the most common gold continuation
    text. Yes/no tasks score well above 1/choices this way (BoolQ 0.62, SciRIFF yes/no 0.72);
    tasks whose choices are per-document texts give ~1/len(docs), i.e. nothing."""
    if not gold_texts:
        return 0.0
    return max(Counter(gold_texts).values()) / len(gold_texts)


def task_result(
    name: str,
    capability: str,
    kind: str,
    primary: str,
    docs: List[Tuple[int, int, List[RequestScore]]],
    constant: float = 0.0,
) -> Tuple[TaskResult, Dict[int, float]]:
    """``docs``: (doc_id, gold, choice scores); ``constant``: `constant_baseline` of the same
    documents. Returns the TaskResult and doc_id -> gold logprob."""
    per: Dict[str, List[float]] = {}
    gold_lp: Dict[int, float] = {}
    baseline = []
    for doc_id, gold, scores in docs:
        o = doc_outcome(scores, gold)
        gold_lp[doc_id] = o["gold_logprob"]
        baseline.append(1.0 / len(scores))
        for k, v in o.items():
            per.setdefault(k, []).append(v)
    keys = ("acc", "acc_norm", "bpb", "gold_logprob") if kind == "mc" else ("bpb", "gold_logprob")
    metrics, stderr = {}, {}
    for k in keys:
        if k in per:
            m, se = _mean_stderr(per[k])
            metrics[k] = m
            if math.isfinite(se):
                stderr[k] = se
    rb = float(np.mean(baseline)) if (kind == "mc" and baseline) else 0.0
    return TaskResult(
        task=name,
        capability=capability,
        n_docs=len(docs),
        metrics=metrics,
        stderr=stderr,
        random_baseline=rb,
        primary_metric=primary,
        constant_baseline=constant if kind == "mc" else 0.0,
    ), gold_lp


TAKEOFF_MARGIN = (
    0.02  # accuracy above chance (absolute) a capability must clear to count as taken off
)


def _mean_and_se(vals: List[float], ses: List[float]) -> Tuple[float, float]:
    mean = float(np.mean(vals))
    known = [x for x in ses if math.isfinite(x)]
    se = (
        math.sqrt(sum(x * x for x in known)) / len(vals)
        if len(known) == len(vals)
        else float("nan")
    )
    return mean, se


def capability_series(results: Dict[str, TaskResult]) -> Tuple[Dict[str, float], Dict[str, float]]:
    """(values, stderrs) keyed `<cap>/<series>`; see the module docstring."""
    from fineline_monitor import metric_names as names

    acc: Dict[str, List[Tuple[float, float]]] = {}
    bpb: Dict[str, List[Tuple[float, float]]] = {}
    for r in results.values():
        if r.n_docs == 0:
            continue
        if r.primary_metric in ("acc", "acc_norm") and r.primary_metric in r.metrics:
            acc.setdefault(r.capability, []).append(
                (
                    r.metrics[r.primary_metric] - r.random_baseline,
                    r.stderr.get(r.primary_metric, math.nan),
                )
            )
        if "bpb" in r.metrics and math.isfinite(r.metrics["bpb"]):
            bpb.setdefault(r.capability, []).append(
                (r.metrics["bpb"], r.stderr.get("bpb", math.nan))
            )
    values: Dict[str, float] = {}
    stderr: Dict[str, float] = {}
    for cap in sorted(set(acc) | set(bpb)):
        for series, rows in ((names.CAP_BPB, bpb.get(cap)), (names.CAP_ACC, acc.get(cap))):
            if rows:
                m, se = _mean_and_se([v for v, _ in rows], [e for _, e in rows])
                values[f"{cap}/{series}"] = m
                if math.isfinite(se):
                    stderr[f"{cap}/{series}"] = se
        a = values.get(f"{cap}/{names.CAP_ACC}")
        took = (
            a is not None
            and a > 2 * stderr.get(f"{cap}/{names.CAP_ACC}", math.inf) + TAKEOFF_MARGIN
        )
        if not took and f"{cap}/{names.CAP_BPB}" not in values:
            took = a is not None
        values[f"{cap}/{names.CAP_TOOK_OFF}"] = 1.0 if took else 0.0
        values[f"{cap}/{names.CAP_HEADLINE}"] = values[
            f"{cap}/{names.CAP_ACC if took else names.CAP_BPB}"
        ]
    return values, stderr


def capability_scores(results: Dict[str, TaskResult]) -> Dict[str, float]:
    """The capability series of one round (values only)."""
    return capability_series(results)[0]
