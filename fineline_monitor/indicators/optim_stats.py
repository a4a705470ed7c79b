"""Norms and optimizer-state statistics, computed on the device (no host sync).

Everything here returns device tensors; the caller moves them to the host in one copy.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch


def _on(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """t on `dev`; no call at all when it is already there (keeps the path free of copies)."""
    return t if t.device == dev else t.to(dev, non_blocking=True)


def stacked_norm(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """Global L2 norm of a list of tensors as a 0-d float32 tensor (None if the list is empty).

    One fused multi-tensor kernel per (device, dtype) (`torch._foreach_norm`) and a norm
    of the stacked per-tensor norms, the same reduction `clip_grad_norm_` does. A
    non-finite element anywhere makes the result non-finite, which is how non-finite
    gradients are counted.
    """
    if not tensors:
        return None
    norms = torch._foreach_norm(list(tensors), 2, dtype=torch.float32)
    dev = norms[0].device
    if any(n.device != dev for n in norms):
        norms = [_on(n, dev) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms))


def group_norms(per_tensor: List[torch.Tensor], groups: List[List[int]]) -> torch.Tensor:
    """[G] float32 tensor of the L2 norms of each index group of per-tensor norms."""
    dev = per_tensor[0].device
    out = []
    for idx in groups:
        if idx:
            out.append(
                torch.linalg.vector_norm(torch.stack([_on(per_tensor[i], dev) for i in idx]))
            )
        else:
            out.append(torch.zeros((), dtype=torch.float32, device=dev))
    return torch.stack(out)


def adam_group_stats(optimizer: Any, group_names: List[str]) -> Dict[str, Any]:
    """Per-group gradient RMS, Adam eps and second-moment statistics, as device tensors.

    Gradient RMS = ||g||_2 / sqrt(n) over the group's parameters that have a gradient
    (the contract is that the monitor runs after optimizer.step() and before zero_grad,
    so `.grad` holds the step's gradient). If no parameter of a group has a gradient
    (zero_grad(set_to_none=True) already ran, or ZeRO keeps gradients elsewhere), the RMS
    falls back to sqrt(mean(v_hat)) from Adam's bias-corrected second moment, the
    optimizer's own running estimate of E[g^2]. Wortsman et al. compare this RMS to eps:
    once it nears eps the update m/(sqrt(v)+eps) shrinks and learning stalls.

    Returns {"eps": {group: float}, "grad_rms": {group: tensor}, "exp_avg_sq_mean":
    {group: tensor}, "v_below_eps_frac": {group: tensor}, "grad_rms_source": {group: str}}.
    """
    out: Dict[str, Any] = {
        "eps": {},
        "grad_rms": {},
        "exp_avg_sq_mean": {},
        "v_below_eps_frac": {},
        "grad_rms_source": {},
    }
    state = getattr(optimizer, "state", {}) or {}
    for name, g in zip(group_names, optimizer.param_groups):
        params = [p for p in g["params"] if isinstance(p, torch.Tensor)]
        eps = g.get("eps")
        if isinstance(eps, (int, float)) and eps > 0:
            out["eps"][name] = float(eps)
        grads = [p.grad for p in params if p.grad is not None and not p.grad.is_sparse]
        if grads:
            n = sum(gr.numel() for gr in grads)
            out["grad_rms"][name] = stacked_norm(grads) / math.sqrt(max(1, n))
            out["grad_rms_source"][name] = "grad"
        vs, bcs = [], []
        betas = g.get("betas")
        for p in params:
            st = state.get(p) if isinstance(state, dict) else None
            if not st or "exp_avg_sq" not in st:
                continue
            v = st["exp_avg_sq"]
            if not isinstance(v, torch.Tensor) or v.shape != p.shape:
                continue
            vs.append(v)
            step = st.get("step")
            bcs.append((step, betas[1] if betas else None))
        if not vs:
            continue
        n = sum(v.numel() for v in vs)
        dev = vs[0].device
        # exp_avg_sq >= 0, so its L1 norm is its sum: one fused kernel.
        sums = torch._foreach_norm(vs, 1, dtype=torch.float32)
        total = torch.stack([_on(s, dev) for s in sums]).sum()
        out["exp_avg_sq_mean"][name] = total / n
        # Bias correction 1 - beta2^t, kept on the device when `step` is a tensor
        # (torch Adam keeps it as a tensor; capturable/fused on the GPU).
        corr_sum = torch.zeros((), dtype=torch.float32, device=dev)
        below = torch.zeros((), dtype=torch.float32, device=dev)
        for v, s, (step, beta2) in zip(vs, sums, bcs):
            bc = _bias_correction(step, beta2, dev)
            corr_sum = corr_sum + _on(s, dev) / bc
            if name in out["eps"]:
                thr = (out["eps"][name] ** 2) * bc  # sqrt(v / bc) < eps  <=>  v < eps^2 * bc
                below = below + _on((v < thr).sum(dtype=torch.float32), dev)
        if name in out["eps"]:
            out["v_below_eps_frac"][name] = below / n
        if name not in out["grad_rms"]:
            out["grad_rms"][name] = torch.sqrt(corr_sum / n)
            out["grad_rms_source"][name] = "exp_avg_sq"
    return out


def _bias_correction(step: Any, beta2: Optional[float], dev: torch.device) -> Any:
    if beta2 is None or step is None:
        return 1.0
    if isinstance(step, torch.Tensor):
        return _on(1.0 - torch.pow(float(beta2), step.float()), dev).clamp_min(1e-12)
    return max(1e-12, 1.0 - beta2 ** float(step))


def hutchinson_trace(
    loss_fn: Callable[[], torch.Tensor], params: List[torch.Tensor], samples: int, seed: int = 0
) -> torch.Tensor:
    """Hutchinson estimate of tr(H) = E_v[v^T H v], v Rademacher, as a 0-d device tensor.

    Cost per sample: one forward of `loss_fn`, one backward with create_graph, one
    Hessian-vector product (a second backward): roughly 4-5x a training step on that
    batch, plus the memory of a double-backward graph. Gradients are taken with
    torch.autograd.grad, so `.grad` of the parameters is not touched. The Rademacher
    vectors come from a private seeded generator (global RNG state untouched).
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("hessian trace: no parameter requires grad")
    gens: Dict[torch.device, torch.Generator] = {}
    total = None
    for _ in range(samples):
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        used = [(p, g) for p, g in zip(params, grads) if g is not None]
        vs = []
        for p, _ in used:
            gen = gens.get(p.device)
            if gen is None:
                gen = gens[p.device] = torch.Generator(device=p.device)
                gen.manual_seed(seed)
            vs.append(
                (torch.randint(0, 2, p.shape, generator=gen, device=p.device) * 2 - 1).to(p.dtype)
            )
        hvs = torch.autograd.grad(
            [g for _, g in used], [p for p, _ in used], grad_outputs=vs, allow_unused=True
        )
        est = None
        for v, hv in zip(vs, hvs):
            if hv is None:
                continue
            term = (v.float() * hv.float()).sum()
            est = term if est is None else est + _on(term, est.device)
        if est is None:
            raise ValueError(
                "hessian trace: the loss does not depend on the parameters twice-differentiably"
            )
        total = est.detach() if total is None else total + est.detach()
    return total / samples
