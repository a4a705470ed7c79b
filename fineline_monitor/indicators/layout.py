"""Find the parts of a model the probe hooks need: the block stack, attention, output head.

Names are short and readable so they fit in a metric name: the block list's own name
and the block index (`h.3` for GPT-2, `layers.3` for Llama and megatron-core).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from fineline_monitor.indicators.attention import attention_kind


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / DeepSpeed / Megatron wrappers (`.module`) so names are the user's."""
    seen = 0
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module) and seen < 8:
        model = model.module
        seen += 1
    return model


def find_blocks(model: torch.nn.Module) -> List[Tuple[str, str, torch.nn.Module]]:
    """The transformer block stack as (short name, qualified name, module).

    The stack is the ModuleList of same-type children holding the most parameters
    (GPT-2 `transformer.h`, Llama `model.layers`, megatron `decoder.layers`,
    `nn.TransformerEncoder.layers`). Empty if the model has none.
    """
    best: Optional[Tuple[int, str, torch.nn.ModuleList]] = None
    for qual, m in model.named_modules():
        if not isinstance(m, torch.nn.ModuleList) or len(m) == 0:
            continue
        if len({type(c) for c in m}) != 1:
            continue
        n = sum(p.numel() for p in m.parameters())
        if n == 0:
            continue
        if best is None or n > best[0]:
            best = (n, qual, m)
    if best is None:
        return []
    _, qual, ml = best
    short = qual.rsplit(".", 1)[-1] if qual else "layers"
    return [(f"{short}.{i}", f"{qual}.{i}" if qual else str(i), blk) for i, blk in enumerate(ml)]


def find_attention(
    model: torch.nn.Module, blocks: List[Tuple[str, str, torch.nn.Module]]
) -> List[Tuple[str, str, torch.nn.Module]]:
    """Attention modules as (layer name, kind, module); layer name = enclosing block's name.

    A block with several attention modules (e.g. cross-attention) gets `.1`, `.2` suffixes
    after the first; attention outside any block is named by its qualified name.
    """
    prefixes = [(qual + ".", short) for short, qual, _ in blocks]
    out: List[Tuple[str, str, torch.nn.Module]] = []
    seen_ids = set()
    per_block: Dict[str, int] = {}
    for qual, m in model.named_modules():
        kind = attention_kind(m)
        if kind is None or id(m) in seen_ids:
            continue
        seen_ids.add(id(m))  # a module shared under two names is hooked once
        name = qual
        for pre, short in prefixes:
            if qual.startswith(pre):
                name = short
                break
        n = per_block.get(name, 0)
        per_block[name] = n + 1
        out.append((name if n == 0 else f"{name}.{n}", kind, m))
    return out


def find_output_head(model: torch.nn.Module) -> Tuple[Optional[torch.nn.Module], str]:
    """The module producing vocabulary logits and how to read its output.

    HF: `get_output_embeddings()` (lm_head). megatron-core GPTModel: `output_layer`
    (returns `(logits, bias)`; logits are [s, b, v/tp] under tensor parallelism).
    Otherwise the model itself, reading `.logits` or a 3-D tensor output.
    """
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # noqa: BLE001 - some models raise NotImplementedError
            head = None
        if isinstance(head, torch.nn.Module):
            return head, "tensor"
    head = getattr(model, "output_layer", None)
    if isinstance(head, torch.nn.Module):
        return head, "tuple0"
    return model, "model"


def param_group_names(optimizer) -> List[str]:
    """param_group['name'] when present, else the group index; duplicates get a suffix."""
    names: List[str] = []
    for i, g in enumerate(getattr(optimizer, "param_groups", []) or []):
        n = str(g.get("name", i)) if isinstance(g, dict) else str(i)
        base, k = n, 1
        while n in names:
            k += 1
            n = f"{base}_{k}"
        names.append(n)
    return names
