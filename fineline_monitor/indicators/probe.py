"""Probe-round indicators: forward hooks on the probe forward passes (no extra forwards).

`ProbeContext` is what `StepIndicators.probe_context()` returns and what the probe
runner enters (`with ctx:`) around its forward passes. While entered it records, on the
device:
- the maximum attention logit per layer (see attention.py),
- output-logit statistics: the largest logit and the mean log-partition
  logsumexp(z) over scored positions (Wortsman et al.: a drifting log-partition is the
  output-logit divergence that z-loss targets),
- activation RMS per block: sqrt(mean(h^2)) of each block's output hidden state.
It may be entered several times (once per batch); statistics accumulate over the round.
When the model's forward receives a 2-D `attention_mask` [B, T] (Hugging Face), padded
positions are left out of the output-logit and activation statistics.

Optimizer statistics (and the optional Hessian trace) are computed when the context is
created, which the monitor does on every rank just before the round, while `.grad`
still holds the last step's gradient.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch

from fineline_monitor import metric_names as names
from fineline_monitor.indicators.attention import AttentionHooks

log = logging.getLogger("fineline_monitor")


def _first_tensor(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, dict):
        for key in ("logits", "hidden_states", "last_hidden_state"):
            if isinstance(out.get(key), torch.Tensor):
                return out[key]
    return None


class ProbeContext:
    """Hooks for one probe round; read it with `StepIndicators.probe_round_metrics(ctx)`."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        blocks: List[Tuple[str, str, torch.nn.Module]],
        attention: List[Tuple[str, str, torch.nn.Module]],
        head: Optional[torch.nn.Module],
        head_kind: str,
        hooks_enabled: bool,
        device_stats: Optional[Dict[str, Any]] = None,
    ):
        self.model = model
        self.blocks = blocks
        self.head, self.head_kind = head, head_kind
        self.hooks_enabled = hooks_enabled
        self.attn = AttentionHooks(attention)
        self.device_stats = device_stats or {}  # optimizer stats and hessian trace (device tensors)
        self._depth = 0
        self._handles: List[Any] = []
        self._mask: Optional[torch.Tensor] = None  # current forward's 2-D attention mask
        # accumulators (device tensors), keyed by layer name
        self.act_sumsq: Dict[str, torch.Tensor] = {}
        self.act_count: Dict[str, Any] = {}
        self.logit_max: Optional[torch.Tensor] = None
        self.lse_sum: Optional[torch.Tensor] = None
        self.lse_count: Any = 0
        self.forwards = 0
        # Set by an integration whose output layer is vocab-parallel (megatron-core TP>1):
        # each rank then holds a slice of the vocabulary, and per-token max and log-partition
        # must be reduced over this process group (all its ranks run the same forward).
        self.vocab_group: Any = None

    # ---- context manager -----------------------------------------------------------------
    def __enter__(self) -> "ProbeContext":
        self._depth += 1
        if self._depth == 1 and self.hooks_enabled:
            try:
                self._install()
            except Exception:
                self._remove()
                self._depth -= 1
                raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._remove()

    def _install(self) -> None:
        self._handles.append(
            self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True)
        )
        self._handles.append(self.model.register_forward_hook(self._model_post_hook))
        for name, _, blk in self.blocks:
            self._handles.append(blk.register_forward_hook(self._block_hook(name)))
        if self.head is not None:
            self._handles.append(self.head.register_forward_hook(self._head_hook))
        self.attn.install()

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.attn.remove()
        self._mask = None

    # ---- hooks ------------------------------------------------------------------------------
    def _model_pre_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) >= 2 and isinstance(args[1], torch.Tensor):
            mask = args[1]  # HF positional (input_ids, attention_mask)
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self.forwards += 1

    def _model_post_hook(self, module: Any, args: Any, out: Any) -> None:
        self._mask = None

    def _token_mask(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """[B, T] bool mask of real tokens matching x's leading dims, else None."""
        m = self._mask
        if m is None or x.dim() < 3:
            return None
        if tuple(x.shape[:2]) == tuple(m.shape):
            return m.bool()
        return None

    def _block_hook(self, name: str):
        def hook(module: Any, args: Any, out: Any) -> None:
            h = _first_tensor(out)
            if h is None or not h.is_floating_point():
                return
            with torch.no_grad():
                tm = self._token_mask(h)
                if tm is not None:
                    sq = torch.linalg.vector_norm(h, dim=-1, dtype=torch.float32).square()
                    sumsq = (sq * tm).sum()
                    count = tm.sum() * h.shape[-1]
                else:
                    sumsq = torch.linalg.vector_norm(h, dtype=torch.float32).square()
                    count = h.numel()
                prev = self.act_sumsq.get(name)
                self.act_sumsq[name] = sumsq if prev is None else prev + sumsq
                self.act_count[name] = self.act_count.get(name, 0) + count

        return hook

    def _head_hook(self, module: Any, args: Any, out: Any) -> None:
        z = (
            out[0]
            if self.head_kind == "tuple0" and isinstance(out, (tuple, list))
            else _first_tensor(out)
        )
        if z is None or not z.is_floating_point():
            return
        with torch.no_grad():
            zf = z.float()
            if self.vocab_group is not None:
                tok_max, lse = _vocab_parallel_max_lse(zf, self.vocab_group)
            else:
                tok_max, lse = (
                    zf.amax(dim=-1),
                    torch.logsumexp(zf, dim=-1),
                )  # [B, T] (or [T, B] megatron)
            tm = self._token_mask(z)
            if tm is not None:
                zmax = tok_max.masked_fill(~tm, float("-inf")).amax()
                lsum, cnt = (lse * tm).sum(), tm.sum()
            else:
                zmax = tok_max.amax()
                lsum, cnt = lse.sum(), lse.numel()
            self.logit_max = zmax if self.logit_max is None else torch.maximum(self.logit_max, zmax)
            self.lse_sum = lsum if self.lse_sum is None else self.lse_sum + lsum
            self.lse_count = self.lse_count + cnt

    # ---- results ------------------------------------------------------------------------
    def device_metrics(self) -> Dict[str, Any]:
        """Metric name -> 0-d device tensor or float, before the single host copy."""
        out: Dict[str, Any] = {}
        if self.attn.recorder.max:
            layer_max = dict(self.attn.recorder.max)
            for layer, v in layer_max.items():
                out[names.per_item(names.ATTN_LOGIT_MAX, layer)] = v
            vals = list(layer_max.values())
            dev = vals[0].device
            out[names.ATTN_LOGIT_MAX] = torch.stack([v.to(dev) for v in vals]).amax()
        if self.logit_max is not None:
            out[names.OUTPUT_LOGIT_MAX] = self.logit_max
            out[names.OUTPUT_LOGSUMEXP_MEAN] = self.lse_sum / self.lse_count
        for name, s in self.act_sumsq.items():
            out[names.per_item(names.ACT_RMS, name)] = torch.sqrt(s / self.act_count[name])
        return out


def _vocab_parallel_max_lse(z: torch.Tensor, group: Any):
    """Per-token max logit and log-partition of logits split over the vocabulary across
    `group` (each rank holds [..., V / world]): max over ranks, then
    lse = max + log(sum over ranks of sum exp(z - max)). Two small collectives per forward."""
    import torch.distributed as dist

    m = z.amax(dim=-1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    s = torch.exp(z - m.unsqueeze(-1)).sum(dim=-1)
    dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
    return m, m + torch.log(s)
