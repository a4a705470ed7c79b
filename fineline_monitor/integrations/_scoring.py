"""Bridge from framework token backends to the probe scorer, and the collective-safety
wrapper every distributed adapter puts around its scorer.

A *token backend* has `token_logprobs(input_ids [b, s], targets [b, s]) -> (logprob [b, s],
greedy [b, s])` over right-padded batches (megatron-core: labels passed, per-token loss
reduced over TP, no logit gather; DeepSpeed pipeline: eval_batch). `TokenBackendScorer`
is the probe package's `Scorer` over such a backend: tokenization, truncation,
batching and the reduction into request scores stay in `fineline_monitor.probes.scoring`.

`CollectiveSafeScorer` wraps any Scorer for a job where a probe forward is a collective
(ZeRO-3 parameter gathers, tensor-parallel all-reduces, pipeline sends):

* Equal forwards: before the first batch the ranks agree (all-reduce MAX over the whole
  job) on the number of batches; a rank with fewer runs dummy one-token batches whose
  results are dropped. Without this, the rank with fewer documents' rows would leave
  the round while its peers wait inside a ZeRO-3 all-gather for it.
* Agreement before every batch: an all-reduce MIN of an ok-flag over the whole job. A rank
  whose host-side work failed (encoding, collation, an injected fault, an exception in
  the previous batch's post-processing) still joins that one small collective with
  ok = 0; every rank then raises `ProbeAborted` at the same point, the monitor's
  round-level agreement disables probes on every rank, and training goes on. Nobody is
  left waiting inside a model collective for a rank that is no longer coming.
* What it cannot catch: a rank that raises *inside* the model's own collectives (half-way
  through a forward). Its peers are then blocked in that collective; the bound is the
  process group's timeout (`init_process_group(timeout=...)`, gloo raises when it
  expires), which makes the job fail instead of hanging. The examples and tests set it.
Both waits of the agreement itself are bounded by `DistContext.timeout_s`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from fineline_monitor.distributed import bounded_all_reduce, collective_device
from fineline_monitor.probes.scoring import IGNORE_INDEX, Row, Scorer, TokenBatch


class ProbeAborted(RuntimeError):
    """Raised on every rank when any rank failed during a probe round."""


def _reduce_over_job(value: float, op: str, dist: Any) -> float:
    """`value` reduced with `op` over the whole job, within the monitor's collective timeout."""
    hint = getattr(dist, "device_hint", None)
    t = torch.tensor([float(value)], dtype=torch.float64, device=collective_device(None, hint))
    return float(bounded_all_reduce(t, op, timeout_s=dist.timeout_s, what="probe agreement").item())


class CollectiveSafeScorer(Scorer):
    """Delegates to `inner`; equal batch counts and per-batch agreement across ranks."""

    def __init__(
        self,
        inner: Scorer,
        dist: Any,
        *,
        equal_batches: bool = True,
        agree_every_batch: bool = True,
        plain_rows: bool = False,
    ):
        # No super().__init__: every attribute the driver reads comes from `inner`.
        self.inner = inner
        if plain_rows and hasattr(inner, "_verified"):
            # ZeRO-3: HFScorer's one-time self-check (trees/packing/fast head vs the plain
            # forward) runs under torch.inference_mode, which ZeRO-3's parameter gathers do
            # not survive (the gathered buffers become inference tensors and training then
            # fails). Use the plain right-padded rows with full logits, exact by construction.
            inner.supports_packing = False
            inner.fast_head = False
            inner._verified = True
        self.dist = dist
        self.equal_batches = equal_batches
        self.agree_every_batch = agree_every_batch
        self.fail_at_batch: Optional[int] = None  # tests: this rank raises before batch k
        self.batches_run = 0  # forwards of the last round (dummies included)

    # the driver reads these from the scorer
    @property
    def tok(self):  # type: ignore[override]
        return self.inner.tok

    @property
    def max_length(self):  # type: ignore[override]
        return self.inner.max_length

    @property
    def device(self):  # type: ignore[override]
        return self.inner.device

    @property
    def mask_dtype(self):  # type: ignore[override]
        return self.inner.mask_dtype

    @property
    def supports_packing(self):  # type: ignore[override]
        return self.inner.supports_packing

    @property
    def pack_tokens(self):  # type: ignore[override]
        return getattr(self.inner, "pack_tokens", 256)

    def __getattr__(self, name: str) -> Any:  # anything else the runner may read (check_report...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def modules(self) -> List[torch.nn.Module]:
        return self.inner.modules()

    def prepare(self) -> None:
        with _no_inference_mode():
            self.inner.prepare()

    def score_tokens(self, batch: TokenBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.inner.score_tokens(batch)

    # -- collectives ------------------------------------------------------------------------
    @property
    def _distributed(self) -> bool:
        return self.dist is not None and self.dist.distributed

    def _agree(self, err: Optional[BaseException], where: str) -> None:
        """Every rank joins; if any rank failed, every rank raises here (the failing rank
        its own error, the others ProbeAborted)."""
        ok = err is None
        if self._distributed:
            ok = _reduce_over_job(1.0 if ok else 0.0, "MIN", self.dist) >= 0.5
        if err is not None:
            raise err
        if not ok:
            raise ProbeAborted(
                f"a rank failed during the probe round ({where}); every rank stops here"
            )

    def score_batches(
        self, batches: List[Any], progress: Optional[Callable[[int], None]] = None
    ) -> Dict[int, Tuple[float, int, bool]]:
        with _no_inference_mode():
            return self._score_batches(batches, progress)

    def _score_batches(
        self, batches: List[Any], progress: Optional[Callable[[int], None]]
    ) -> Dict[int, Tuple[float, int, bool]]:
        from fineline_monitor.probes.scoring import prepare_batches

        err: Optional[BaseException] = None
        try:
            self.inner.prepare()  # HF self-check forwards: the same count on every rank
        except Exception as e:  # noqa: BLE001 - agreed on, then re-raised
            err = e
        self._agree(err, "preparation")
        n = len(batches)
        if self.equal_batches and self._distributed:
            n = int(_reduce_over_job(float(n), "MAX", self.dist))
        merged: Dict[int, Tuple[float, int, bool]] = {}
        seen: set = set()
        self.batches_run = 0
        for bi in range(n):
            real = bi < len(batches)
            try:
                if self.fail_at_batch is not None and bi == self.fail_at_batch:
                    raise RuntimeError(f"injected probe failure before batch {bi}")
                pb = (
                    _without_repeated_rows(batches[bi], seen)
                    if real
                    else prepare_batches([_dummy_row()], 1)[0]
                )
            except Exception as e:  # noqa: BLE001
                err = e
            if self.agree_every_batch:
                self._agree(err, f"batch {bi}")  # before the model's collectives
            elif err is not None:
                raise err
            # One batch at a time through the inner scorer's own driver: a request's scored
            # positions all lie in one row, so per-batch results merge exactly.
            part = self.inner.score_batches([pb])
            self.batches_run += 1
            if real:
                merged.update(part)
                if progress is not None:
                    progress(len(part))
        return merged


def _without_repeated_rows(pb: Any, seen: set) -> Any:
    """The runner pads short ranks by repeating a row (same number of forwards everywhere).
    A repeated row inside one round would add its requests' log-probabilities twice, so
    its labels are masked here: it still runs (the forward count stays equal) but scores
    nothing."""
    import dataclasses

    import numpy as np

    scored = (pb.labels != IGNORE_INDEX).sum(dim=1).tolist()
    owners = list(pb.owners)
    keep_rows, keep_owners, k = [], [], 0
    for i, n in enumerate(scored):
        mine = owners[k : k + n]
        k += n
        if mine and set(mine) <= seen:
            continue
        seen.update(mine)
        keep_rows.append(i)
        keep_owners.extend(mine)
    if len(keep_rows) == len(scored):
        return pb
    labels = torch.full_like(pb.labels, IGNORE_INDEX)
    labels[keep_rows] = pb.labels[keep_rows]
    return dataclasses.replace(pb, labels=labels, owners=np.asarray(keep_owners, dtype=np.int64))


def _no_inference_mode():
    """no_grad instead of the runner's inference_mode. Why: ZeRO-3 all-gathers parameters
    into buffers during the forward; made under inference_mode they become inference
    tensors, and the next training forward fails ("Inference tensors cannot be saved for
    backward"). Megatron's and DeepSpeed's own evaluation loops use no_grad as well."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


def _dummy_row() -> Row:
    """A two-token row with one scored position: the cheapest forward every backend accepts."""
    r = Row(capacity=2)
    r.tokens, r.positions, r.segment, r.branch = [0, 0], [0, 1], [0, 0], [-1, 0]
    r.labels, r.owners = [IGNORE_INDEX, 0], [-1]
    return r


class TokenBackendScorer(Scorer):
    """The probe `Scorer` over a token backend (no packing: one request per padded row).

    `labels` positions equal to IGNORE_INDEX are sent to the backend as token 0 and
    dropped from its output; the backend returns per-position results for the whole
    [b, s] batch and this selects the scored ones, row-major, as the contract asks."""

    supports_packing = False

    def __init__(
        self,
        backend: Any,
        tokenizer: Any,
        max_length: int,
        *,
        modules: Optional[List[Any]] = None,
        device: Any = None,
        prefix_token_id: Optional[int] = None,
    ):
        super().__init__(
            tokenizer, max_length, device=device or "cpu", prefix_token_id=prefix_token_id
        )
        self.backend = backend
        self._modules = list(modules or [])

    def modules(self) -> List[torch.nn.Module]:
        return self._modules

    def score_tokens(self, batch: TokenBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        labels = batch.labels.cpu()
        sel = labels != IGNORE_INDEX
        targets = torch.where(sel, labels, torch.zeros_like(labels))
        lp, gr = self.backend.token_logprobs(batch.input_ids.cpu(), targets)
        return lp[sel], gr[sel]


def hf_scorer(
    model: Any,
    tokenizer: Any,
    probe_cfg: Any,
    dist: Any,
    *,
    equal_batches: bool,
    plain_rows: bool = False,
) -> Scorer:
    """The built-in scorer for `model` (HF causal LM or torch module), collective-safe."""
    from fineline_monitor.probes.scoring import build_scorer

    inner = build_scorer(model, tokenizer, getattr(probe_cfg, "max_length", 0))
    return CollectiveSafeScorer(inner, dist, equal_batches=equal_batches, plain_rows=plain_rows)


def backend_scorer(
    backend: Any,
    tokenizer: Any,
    probe_cfg: Any,
    dist: Any,
    *,
    max_length: int,
    modules: Optional[List[Any]] = None,
    equal_batches: bool = True,
) -> Scorer:
    ml = int(getattr(probe_cfg, "max_length", 0) or 0) or int(max_length)
    inner = TokenBackendScorer(backend, tokenizer, ml, modules=modules)
    return CollectiveSafeScorer(inner, dist, equal_batches=equal_batches)
