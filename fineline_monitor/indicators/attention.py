"""Maximum attention logit per layer, recorded during the probe forward passes.

Wortsman et al. (2023): attention logits q.k/sqrt(d) that grow past ~1e3 predict loss
spikes and divergence (attention entropy collapse) long before the loss shows it. We
record, per attention layer, the largest pre-softmax logit over the positions the layer
actually attends to (its causal / padding mask), with no extra forward pass: each
hook sees the query and key the layer itself computes (after RoPE) and forms one
extra QK^T product from them, chunked over the batch so memory stays bounded. That
product costs as much as the attention scores themselves, and only at probe rounds.

Three attention families are detected automatically (`find_attention_modules`):

- Hugging Face transformers (4.48+ / 5.x): every attention module dispatches through
  `ALL_ATTENTION_FUNCTIONS` (sdpa, flash, flex...) or its modeling module's
  `eager_attention_forward`, called as `fn(module, query, key, value, mask, scaling=...)`
  with query/key already rotated. While a probe context is entered we wrap those
  entries; the wrapper records for the modules it was asked to watch and passes
  everything through unchanged, so other models in the process are unaffected.
  (GPT-2's `reorder_and_upcast_attn` eager path bypasses the interface; not covered.)
- `torch.nn.MultiheadAttention`: a forward pre-hook recomputes q and k from
  `in_proj_weight` (or `q_proj_weight`/`k_proj_weight`) and the inputs.
- megatron-core `DotProductAttention` / `TEDotProductAttention` (sbhd layout): a forward
  pre-hook sees `query [sq, b, np, hn]` and `key [sk, b, ng, hn]` after RoPE. Under
  tensor parallelism each rank sees its own heads: the value is a per-rank maximum
  and the caller reduces it with MAX over the TP group.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

log = logging.getLogger("fineline_monitor")

# Elements of one float32 score chunk [b, H, Tq, Tk]; 2**25 floats = 128 MiB.
_CHUNK_ELEMS = 1 << 25


def max_attention_logit(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    *,
    causal: bool,
    allowed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Largest `scale * q.k` over attended positions, as a 0-d float32 tensor on q's device.

    q: [B, H, Tq, D]; k: [B, Hk, Tk, D] with H a multiple of Hk (grouped-query attention:
    query head h uses key head h // (H // Hk), as in HF `repeat_kv` and megatron's
    `repeat_interleave`). `causal` restricts query i (at absolute position Tk - Tq + i)
    to keys at positions <= its own. `allowed`: optional bool mask broadcastable to
    [B, H, Tq, Tk], True where attention is allowed. Returns -inf if nothing is attended.
    """
    B, H, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    if H != Hk:
        if H % Hk:
            raise ValueError(f"query heads ({H}) must be a multiple of key heads ({Hk})")
        k = k.repeat_interleave(H // Hk, dim=1)
    mask = None
    if causal:
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril_(diagonal=Tk - Tq)
    if allowed is not None:
        allowed = allowed.to(device=q.device, dtype=torch.bool)
        while allowed.dim() < 4:
            allowed = allowed.unsqueeze(0)
    out = torch.full((), float("-inf"), dtype=torch.float32, device=q.device)
    step = max(1, _CHUNK_ELEMS // max(1, H * Tq * Tk))
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        s = torch.matmul(q[b0:b1].float(), k[b0:b1].float().transpose(-1, -2))
        s.mul_(scale)
        m = mask
        if allowed is not None:
            a = allowed[b0:b1] if allowed.shape[0] == B else allowed
            m = a if m is None else (a & m)
        if m is not None:
            s = s.masked_fill(~m, float("-inf"))
        out = torch.maximum(out, s.amax())
    return out


def allowed_from_additive_or_bool(mask: Any, *, true_means_masked: bool) -> Optional[torch.Tensor]:
    """Turn an attention mask into a bool 'attention allowed' tensor (None if no mask).

    Bool masks: HF uses True = attend, torch MHA and megatron use True = masked out
    (`true_means_masked`). Float masks are additive: a position is allowed unless its
    bias is -inf or the dtype's most negative value (what HF and torch put there).
    """
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dtype == torch.bool:
        return ~mask if true_means_masked else mask
    if mask.is_floating_point():
        return mask > torch.finfo(mask.dtype).min / 2
    # integer masks (rare): nonzero = attend in HF's 2D convention
    return (mask == 0) if true_means_masked else (mask != 0)


class _Recorder:
    """Running maximum per layer name, kept on the device (no host sync in the hooks)."""

    def __init__(self) -> None:
        self.max: Dict[str, torch.Tensor] = {}
        self.calls: Dict[str, int] = {}

    def record(self, layer: str, value: torch.Tensor) -> None:
        prev = self.max.get(layer)
        self.max[layer] = value if prev is None else torch.maximum(prev, value.to(prev.device))
        self.calls[layer] = self.calls.get(layer, 0) + 1


# ---- Hugging Face: wrap the attention interface while a context is entered -----------------

_HF_LOCK = threading.Lock()
_HF_WATCH: Dict[int, Tuple[str, _Recorder]] = {}  # id(module) -> (layer name, recorder)
_HF_PATCH_REFS = 0
_HF_RESTORE: List[Callable[[], None]] = []


def _hf_wrap(orig: Callable) -> Callable:
    if getattr(orig, "_fineline_wrapped", False):
        return orig

    def wrapper(module, query, key, value, attention_mask, *args, **kwargs):
        entry = _HF_WATCH.get(id(module))
        if entry is not None:
            layer, rec = entry
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = query.shape[-1] ** -0.5
            causal = bool(getattr(module, "is_causal", True))
            allowed = allowed_from_additive_or_bool(attention_mask, true_means_masked=False)
            if allowed is not None:
                # HF 4D masks are [B, 1, Tq, Tk(+...)]; keep the key length of this call.
                allowed = allowed[..., : key.shape[-2]]
            with torch.no_grad():
                rec.record(
                    layer,
                    max_attention_logit(
                        query.detach(), key.detach(), float(scaling), causal=causal, allowed=allowed
                    ),
                )
        return orig(module, query, key, value, attention_mask, *args, **kwargs)

    wrapper._fineline_wrapped = True  # type: ignore[attr-defined]
    wrapper.__wrapped__ = orig  # type: ignore[attr-defined]
    return wrapper


def _is_hf_attention(m: torch.nn.Module) -> bool:
    mod = sys.modules.get(type(m).__module__)
    return (
        mod is not None
        and type(m).__module__.startswith("transformers.")
        and hasattr(mod, "eager_attention_forward")
        and hasattr(mod, "ALL_ATTENTION_FUNCTIONS")
        and "Attention" in type(m).__name__
        and hasattr(m, "config")
    )


def _hf_install(modules: List[torch.nn.Module]) -> None:
    """Wrap ALL_ATTENTION_FUNCTIONS entries and each modeling module's eager function."""
    global _HF_PATCH_REFS
    if _HF_PATCH_REFS == 0:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as iface

        local = getattr(iface, "_local_mapping", None)
        for key in list(iface.keys()):
            had_local = local is not None and key in local
            prev = iface[key]
            iface[key] = _hf_wrap(prev)

            def undo(key=key, had_local=had_local, prev=prev):
                if had_local or local is None:
                    iface[key] = prev
                else:
                    local.pop(key, None)

            _HF_RESTORE.append(undo)
    _HF_PATCH_REFS += 1
    # Eager attention is the module-level default of `get_interface`, looked up at call
    # time, so patching the modeling module's global is seen by every call.
    for m in modules:
        mod = sys.modules[type(m).__module__]
        fn = mod.eager_attention_forward
        if not getattr(fn, "_fineline_wrapped", False):
            mod.eager_attention_forward = _hf_wrap(fn)

            def undo_eager(mod=mod, fn=fn):
                mod.eager_attention_forward = fn

            _HF_RESTORE.append(undo_eager)


def _hf_uninstall() -> None:
    global _HF_PATCH_REFS
    _HF_PATCH_REFS -= 1
    if _HF_PATCH_REFS <= 0:
        _HF_PATCH_REFS = 0
        while _HF_RESTORE:
            _HF_RESTORE.pop()()


# ---- torch.nn.MultiheadAttention ---------------------------------------------------------


def _mha_pre_hook(layer: str, rec: _Recorder) -> Callable:
    sig = inspect.signature(torch.nn.MultiheadAttention.forward)

    def hook(m: torch.nn.MultiheadAttention, args: tuple, kwargs: dict):
        ba = sig.bind(m, *args, **kwargs)
        ba.apply_defaults()
        a = ba.arguments
        query, key = a["query"], a["key"]
        with torch.no_grad():
            unbatched = query.dim() == 2
            if unbatched:
                query, key = query.unsqueeze(1), key.unsqueeze(1)  # [T, 1, E]
            elif m.batch_first:
                query, key = query.transpose(0, 1), key.transpose(0, 1)
            E, H = m.embed_dim, m.num_heads
            if m._qkv_same_embed_dim:
                wq, wk = m.in_proj_weight[:E], m.in_proj_weight[E : 2 * E]
            else:
                wq, wk = m.q_proj_weight, m.k_proj_weight
            bq = bk = None
            if m.in_proj_bias is not None:
                bq, bk = m.in_proj_bias[:E], m.in_proj_bias[E : 2 * E]
            q = torch.nn.functional.linear(query, wq, bq)  # [Tq, B, E]
            k = torch.nn.functional.linear(key, wk, bk)
            Tq, B, _ = q.shape
            Tk = k.shape[0]
            hd = E // H
            q = q.reshape(Tq, B, H, hd).permute(1, 2, 0, 3)
            k = k.reshape(Tk, B, H, hd).permute(1, 2, 0, 3)
            attn_mask, kpm = a.get("attn_mask"), a.get("key_padding_mask")
            allowed = allowed_from_additive_or_bool(attn_mask, true_means_masked=True)
            if allowed is not None and allowed.dim() == 3:  # [B*H, Tq, Tk]
                allowed = allowed.reshape(B, H, Tq, Tk)
            kp = allowed_from_additive_or_bool(kpm, true_means_masked=True)
            if kp is not None:
                kp = kp.reshape(B, 1, 1, Tk)
                allowed = kp if allowed is None else (allowed & kp)
            causal = bool(a.get("is_causal")) and attn_mask is None
            rec.record(layer, max_attention_logit(q, k, hd**-0.5, causal=causal, allowed=allowed))

    return hook


# ---- megatron-core -------------------------------------------------------------------------


def _is_megatron_attention(m: torch.nn.Module) -> bool:
    name = type(m).__name__
    return type(m).__module__.startswith("megatron.") and name in (
        "DotProductAttention",
        "TEDotProductAttention",
    )


def megatron_logit_scale(m: torch.nn.Module) -> float:
    """The factor turning q.k into the pre-softmax logit in megatron-core.

    DotProductAttention divides `softmax_scale` by `layer_number` when
    `apply_query_key_layer_scaling` is on, and its softmax multiplies that coefficient
    back, so the logit the softmax sees is q.k * softmax_scale * layer_number.
    """
    cfg = getattr(m, "config", None)
    hn = None
    if cfg is not None and getattr(cfg, "kv_channels", None):
        hn = cfg.kv_channels
    scale = getattr(m, "softmax_scale", None)
    if scale is None:
        scale = 1.0 / math.sqrt(hn) if hn else None
    if scale is None:
        raise ValueError(f"cannot find the softmax scale of {type(m).__name__}")
    if (
        type(m).__name__ == "DotProductAttention"
        and cfg is not None
        and getattr(cfg, "apply_query_key_layer_scaling", False)
    ):
        scale = scale * max(1, int(getattr(m, "layer_number", 1)))
    return float(scale)


def _megatron_pre_hook(layer: str, rec: _Recorder) -> Callable:
    warned = []

    def hook(m: torch.nn.Module, args: tuple, kwargs: dict):
        names = ("query", "key", "value", "attention_mask", "attn_mask_type")
        a = dict(zip(names, args))
        a.update({k: v for k, v in kwargs.items() if k in names or k == "packed_seq_params"})
        query, key = a.get("query"), a.get("key")
        fmt = getattr(m, "qkv_format", "sbhd")
        if (
            kwargs.get("packed_seq_params") is not None
            or fmt not in ("sbhd", "bshd")
            or query is None
        ):
            if not warned:
                warned.append(1)
                log.warning(
                    "fineline_monitor: attention logits not recorded for %s (layout %s / packed "
                    "sequences are not supported)",
                    type(m).__name__,
                    fmt,
                )
            return
        with torch.no_grad():
            if fmt == "sbhd":
                q, k = query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3)
            else:
                q, k = query.permute(0, 2, 1, 3), key.permute(0, 2, 1, 3)
            mask_type = a.get("attn_mask_type") or getattr(m, "attn_mask_type", None)
            mt = getattr(mask_type, "name", str(mask_type or ""))
            causal = "causal" in mt
            allowed = None
            if mt != "no_mask":
                allowed = allowed_from_additive_or_bool(
                    a.get("attention_mask"), true_means_masked=True
                )
            rec.record(
                layer,
                max_attention_logit(q, k, megatron_logit_scale(m), causal=causal, allowed=allowed),
            )

    return hook


# ---- discovery -----------------------------------------------------------------------------


def attention_kind(m: torch.nn.Module) -> Optional[str]:
    """'hf', 'mha', 'megatron' or None."""
    if isinstance(m, torch.nn.MultiheadAttention):
        return "mha"
    if _is_megatron_attention(m):
        return "megatron"
    if _is_hf_attention(m):
        return "hf"
    return None


class AttentionHooks:
    """Install/remove the attention-logit hooks of one model; results in `recorder.max`."""

    def __init__(self, attention: List[Tuple[str, str, torch.nn.Module]]):
        self.attention = attention  # (layer name, kind, module)
        self.recorder = _Recorder()
        self._handles: List[Any] = []
        self._hf_installed = False

    def install(self) -> None:
        hf = []
        for layer, kind, m in self.attention:
            if kind == "mha":
                self._handles.append(
                    m.register_forward_pre_hook(
                        _mha_pre_hook(layer, self.recorder), with_kwargs=True
                    )
                )
            elif kind == "megatron":
                self._handles.append(
                    m.register_forward_pre_hook(
                        _megatron_pre_hook(layer, self.recorder), with_kwargs=True
                    )
                )
            elif kind == "hf":
                hf.append((layer, m))
        if hf:
            with _HF_LOCK:
                _hf_install([m for _, m in hf])
                for layer, m in hf:
                    _HF_WATCH[id(m)] = (layer, self.recorder)
            self._hf_installed = True

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._hf_installed:
            with _HF_LOCK:
                for _layer, kind, m in self.attention:
                    if kind == "hf":
                        _HF_WATCH.pop(id(m), None)
                _hf_uninstall()
            self._hf_installed = False
