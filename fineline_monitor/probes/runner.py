"""ProbeRunner: one probe round = score the fixed document subsets, reduce to metrics.

Built once at attach time: tasks are resolved and loaded (bad names fail here, with a
"did you mean"), each task's fixed seeded subset is chosen and tokenized, and the packed
rows are planned, so a round only runs forward passes.

A round, on every rank of the data-parallel group:
  1. save every RNG stream (python, numpy, torch CPU, torch CUDA) and the train/eval mode
     of every submodule; switch to eval; torch.inference_mode (no autograd state, no
     gradient touched, no optimizer involved);
  2. score this rank's share of the rows (rows dealt round-robin, longest first; ranks
     with fewer rows repeat their last row so every rank runs the same number of forward
     batches, as ZeRO-3 and pipeline schedules require);
  3. restore modes and RNG streams exactly;
  4. gather the request scores over the data-parallel group, drop padding duplicates by
     (task, doc_id, choice), and compute metrics identically on every rank.
A failure on one rank is gathered too, so every rank raises together rather than some
waiting forever in a collective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from fineline_monitor.core.types import ProbeRound, RequestScore, TaskResult
from fineline_monitor.distributed import DistContext
from fineline_monitor.probes import metrics as M
from fineline_monitor.probes.scoring import (
    EncodedRequest,
    Row,
    Scorer,
    ScoringError,
    build_scorer,
    prepare_batches,
    preserved_state,
)
from fineline_monitor.probes.tasks import (
    Doc,
    Task,
    TaskError,
    load_requests_file,
    load_task,
    resolve_names,
)

log = logging.getLogger("fineline_monitor.probes")


class _Req:
    __slots__ = ("task", "doc_id", "choice", "context", "continuation", "n_bytes", "n_chars")

    def __init__(self, task: str, doc_id: int, choice: int, context: str, continuation: str):
        self.task, self.doc_id, self.choice = task, doc_id, choice
        self.context, self.continuation = context, continuation
        self.n_bytes = len(continuation.encode("utf-8"))
        self.n_chars = M.n_chars_of(continuation)


class ProbeRunner:
    """Scores probe tasks on a model; see the module docstring for what a round does.

    ``cfg`` is a ProbeConfig. Pass ``model`` + ``tokenizer`` (a Hugging Face causal LM, or a
    plain torch module returning logits) or a pre-built ``scorer``. ``selection="first"``
    with ``limit`` takes the first documents in file order (the CLI's ``--limit``);
    ``limit=None`` there means every document.
    """

    def __init__(
        self,
        cfg: Any,
        model: Any = None,
        tokenizer: Any = None,
        scorer: Optional[Scorer] = None,
        dist: Optional[DistContext] = None,
        *,
        selection: str = "seeded",
        limit: Optional[int] = None,
        device: Any = None,
    ):
        self.cfg = cfg
        self.dist = dist or DistContext()
        self.batch_size = int(cfg.batch_size)
        self.timeout_s = float(getattr(cfg, "timeout_s", 0) or 0)
        # the task names and files first: a misspelt name is the likeliest mistake, and
        # its error (with "did you mean") should not wait behind the scorer's
        self.tasks: Dict[str, Task] = {}
        names = resolve_names(cfg.tasks) if cfg.tasks else []
        for n in names:
            self.tasks[n] = load_task(n)
        for path in getattr(cfg, "requests_files", []) or []:
            for name, t in load_requests_file(path).items():
                if name in self.tasks:
                    raise TaskError(
                        f"{path}: task {name!r} is already defined (registry or another file)"
                    )
                self.tasks[name] = t
        if not self.tasks:
            raise TaskError(
                "no probe tasks: set probes.tasks (e.g. ['default']) or probes.requests_files"
            )
        self.scorer = (
            scorer
            if scorer is not None
            else build_scorer(model, tokenizer, getattr(cfg, "max_length", 0) or 0, device=device)
        )
        n_docs = limit if selection == "first" else int(cfg.docs_per_task)
        self.n_skipped: Dict[str, int] = {}
        self._select_and_encode(n_docs, selection, int(getattr(cfg, "seed", 0)))
        self.rows: List[Row] = self.scorer.plan(self._encoded)
        self.n_truncated = sum(1 for e in self._encoded if e.truncated)
        self.tokens_per_round = sum(len(r) for r in self.rows)  # real tokens through the model
        self._batches = None

    # ---- construction -------------------------------------------------------------------
    def _select_and_encode(self, n_docs: Optional[int], selection: str, seed: int) -> None:
        """Fixed subsets: walk each task's seeded order, keep the first ``n_docs`` documents
        whose every continuation fits the model (tokenized once, here)."""
        self.requests: List[_Req] = []
        self._encoded: List[EncodedRequest] = []
        self.docs: Dict[str, List[Tuple[Doc, List[int]]]] = {}  # task -> [(doc, request indices)]
        for name, task in self.tasks.items():
            order = task.subset(n_docs, seed, mode=selection)
            want = len(order) if n_docs is None else min(n_docs, len(order))
            chosen: List[Tuple[Doc, List[EncodedRequest]]] = []
            pos, skipped = 0, 0
            while len(chosen) < want and pos < len(order):
                chunk = order[pos : pos + max(8, int((want - len(chosen)) * 1.25) + 4)]
                pos += len(chunk)
                items = [
                    ((name, d.doc_id), c, x)
                    for d in chunk
                    for c, x in zip(d.contexts, d.continuations)
                ]
                enc = _encode_tolerant(self.scorer, items)
                k = 0
                for d in chunk:
                    e = enc[k : k + d.n_choices]
                    k += d.n_choices
                    if len(chosen) >= want:
                        break
                    if any(x is None for x in e):
                        skipped += 1
                        continue
                    chosen.append((d, e))  # type: ignore[arg-type]
            if skipped:
                log.warning(
                    "probe task %s: skipped %d documents whose continuation does not fit the model's "
                    "context (%d tokens)",
                    name,
                    skipped,
                    self.scorer.max_length,
                )
            self.n_skipped[name] = skipped
            chosen.sort(key=lambda de: de[0].doc_id)  # stable, readable order
            entries = []
            for d, encs in chosen:
                idxs = []
                for choice, e in enumerate(encs):
                    e.index = len(self.requests)
                    idxs.append(e.index)
                    self.requests.append(
                        _Req(name, d.doc_id, choice, d.contexts[choice], d.continuations[choice])
                    )
                    self._encoded.append(e)
                entries.append((d, idxs))
            self.docs[name] = entries

    # ---- a round --------------------------------------------------------------------------
    def run(
        self,
        step: int,
        tokens: Optional[int] = None,
        hooks: Any = None,
        progress: Optional[Callable[[int], None]] = None,
    ) -> ProbeRound:
        t0 = time.perf_counter()
        self._ensure_batches()
        error: Optional[str] = None
        local: Dict[int, Tuple[float, int, bool]] = {}
        try:
            with preserved_state(self.scorer.modules()), torch.inference_mode():
                with hooks if hooks is not None else contextlib.nullcontext():
                    local = self.scorer.score_batches(self._batches, progress=progress)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank together
            if not self.dist.distributed:
                raise
            error = f"rank {self.dist.rank}: {type(e).__name__}: {e}"
            log.exception("probe round failed on this rank")
        elapsed = time.perf_counter() - t0
        gathered = self.dist.all_gather_dp((error, local, elapsed))
        errors = [g[0] for g in gathered if g[0]]
        if errors:
            raise RuntimeError("probe round failed: " + "; ".join(errors))
        merged: Dict[int, Tuple[float, int, bool]] = {}
        for _, part, _ in gathered:
            for k, v in part.items():
                if k >= 0:  # negative owners: this rank's padding rows
                    merged.setdefault(k, v)
        slowest = max(g[2] for g in gathered)
        if self.timeout_s and slowest > self.timeout_s:
            raise TimeoutError(
                f"probe round took {slowest:.0f}s on the slowest rank, over probes.timeout_s="
                f"{self.timeout_s:.0f}s"
            )
        missing = len(self.requests) - len(merged)
        if missing:
            raise RuntimeError(f"probe round lost {missing} of {len(self.requests)} requests")
        return self._assemble(step, tokens, merged, time.perf_counter() - t0)

    def _ensure_batches(self) -> None:
        if self._batches is None:  # built once, reused every round
            self._batches = prepare_batches(self._my_rows(), self.batch_size)

    def n_local_requests(self) -> int:
        """Requests this rank scores in a round (padding duplicates counted once): the
        progress bar's total."""
        self._ensure_batches()
        return len({int(o) for b in self._batches for o in b.owners if o >= 0})

    def _my_rows(self) -> List[Row]:
        n, r = self.dist.dp_size, self.dist.dp_rank
        if n <= 1:
            return list(self.rows)
        rows = sorted(self.rows, key=lambda x: -len(x))
        mine = rows[r::n]
        per_rank = math.ceil(len(rows) / n)
        while len(mine) < per_rank:  # padding: same number of forwards on every rank
            # The padding row is a real forward (ZeRO-3 and TP forwards are collectives) but
            # its scores must not add to the requests it copies: its owners are negated
            # (-1 - i) and dropped when the round is merged.
            src = mine[-1] if mine else rows[-1]
            mine.append(
                dataclasses.replace(src, owners=[-1 - abs(o) if o >= 0 else o for o in src.owners])
            )
        return mine

    def _assemble(
        self,
        step: int,
        tokens: Optional[int],
        merged: Dict[int, Tuple[float, int, bool]],
        seconds: float,
    ) -> ProbeRound:
        scores: List[RequestScore] = []
        for i, q in enumerate(self.requests):
            lp, n, g = merged[i]
            scores.append(
                RequestScore(
                    task=q.task,
                    doc_id=q.doc_id,
                    choice=q.choice,
                    logprob=lp,
                    n_tokens=n,
                    n_bytes=q.n_bytes,
                    is_greedy=g,
                    n_chars=q.n_chars,
                    truncated=self._encoded[i].truncated,
                )
            )
        results: Dict[str, TaskResult] = {}
        gold: Dict[str, Dict[int, float]] = {}
        for name, entries in self.docs.items():
            t = self.tasks[name]
            docs = [(d.doc_id, d.gold, [scores[i] for i in idxs]) for d, idxs in entries]
            constant = M.constant_baseline([d.continuations[d.gold] for d, _ in entries])
            results[name], gold[name] = M.task_result(
                name, t.capability, t.kind, t.primary_metric, docs, constant
            )
        cap_values, cap_stderr = M.capability_series(results)
        return ProbeRound(
            step=int(step),
            tokens=tokens,
            tasks=results,
            requests=scores,
            seconds=seconds,
            tokens_scored=self.tokens_per_round,
            n_truncated=self.n_truncated,
            capability_scores=cap_values,
            capability_stderr=cap_stderr,
            gold_logprobs=gold,
        )


def _encode_tolerant(
    scorer: Scorer, items: Sequence[Tuple[Any, str, str]]
) -> List[Optional[EncodedRequest]]:
    """Encode a chunk; a request that cannot be scored (continuation longer than the
    model's context) comes back as None so its document is skipped, not the whole task."""
    try:
        return list(scorer.encode(items))
    except ScoringError:
        out: List[Optional[EncodedRequest]] = []
        for it in items:
            try:
                out.append(scorer.encode([it])[0])
            except ScoringError:
                out.append(None)
        return out
