"""StepIndicators: per-step optimization-state indicators, kept on the device.

Call order (the monitor's contract): `on_step` runs once per optimizer step, AFTER
`optimizer.step()` and BEFORE `optimizer.zero_grad()`, so `.grad` still holds the step's
gradient and the parameters already hold the updated values. If gradients are gone
(`zero_grad(set_to_none=True)` ran first, or ZeRO keeps them elsewhere) and the framework
passes no `grad_norm`, the gradient norm is simply not reported.

The per-step path never synchronises with the host: every value that arrives as a
tensor is copied, on its device, into one preallocated float32 buffer with a row per
step (K = `collect_every` rows); values that arrive as Python numbers (lr, tokens, a
float loss scale, `skipped`) go to a host-side twin of that buffer. `collect(step)` does
the single device-to-host copy (`.tolist()` of the whole buffer) every K steps and turns
rows into metrics. Rolling statistics (the loss window for mean and z-score) live on the
host, fed from collected rows, so they cost nothing per step.

Per step (device work): copy the loss; the gradient norm if the framework did not give
one (one `_foreach_norm` over the gradients, i.e. one read of the gradients); copy the
grad norm / loss scale / lr when they are tensors.
Only on the step before a collect step and on the collect step: the update ratio
(see `_snapshot` below) and the parameter norm.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from fineline_monitor import metric_names as names
from fineline_monitor.indicators.layout import (
    find_attention,
    find_blocks,
    find_output_head,
    param_group_names,
    unwrap,
)
from fineline_monitor.indicators.optim_stats import (
    adam_group_stats,
    group_norms,
    hutchinson_trace,
    stacked_norm,
)
from fineline_monitor.indicators.probe import ProbeContext

log = logging.getLogger("fineline_monitor")

STATE_VERSION = 1

# Columns of the per-step buffer.
LOSS, GRAD_NORM, LOSS_SCALE, LR = range(4)
NCOLS = 4
# Minimum number of previous finite losses before a z-score is reported: a standard
# deviation from a handful of points is mostly noise and would make spikes out of nothing.
MIN_Z_HISTORY = 10


class StepIndicators:
    """Per-step indicators for one model/optimizer; see the module docstring for the contract."""

    def __init__(
        self,
        model: Any,
        optimizer: Any,
        cfg: Any,
        extra_fn: Optional[Callable[[], Dict[str, Any]]] = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.cfg = cfg
        self.extra_fn = extra_fn
        self._collectives_step: Optional[int] = None  # the collect step whose collectives ran
        self.K = max(1, int(cfg.collect_every))
        self.window = max(2, int(cfg.loss_window))
        self.do_update_ratio = bool(getattr(cfg, "update_ratio", True))

        # Parameters: the optimizer's groups (deduplicated, in order); without an
        # optimizer, the model's parameters as one group.
        self.group_names: List[str] = []
        self.params: List[torch.Tensor] = []
        self.group_idx: List[List[int]] = []
        seen: Dict[int, int] = {}
        groups = getattr(optimizer, "param_groups", None) if optimizer is not None else None
        if groups:
            self.group_names = param_group_names(optimizer)
            plists = [[p for p in g["params"] if isinstance(p, torch.Tensor)] for g in groups]
        else:
            self.group_names = ["0"]
            plists = [list(model.parameters()) if model is not None else []]
        for plist in plists:
            idx = []
            for p in plist:
                if id(p) not in seen:
                    seen[id(p)] = len(self.params)
                    self.params.append(p)
                idx.append(seen[id(p)])
            self.group_idx.append(idx)
        G = len(self.group_names)
        # Extras region (filled at collect steps): param norm, update ratio, then per group.
        self._ex_off = self.K * NCOLS
        self._ex_len = 2 + 2 * G

        self._buf: Optional[torch.Tensor] = None  # [K*NCOLS + extras] float32, on the device
        self._cells: List[List[torch.Tensor]] = []  # views buf[row, col], built once
        self._host = np.full((self.K, NCOLS), np.nan)  # values that came as Python numbers
        self._is_dev = np.zeros((self.K, NCOLS), dtype=bool)  # which source holds (row, col)
        self._present = np.zeros((self.K, NCOLS), dtype=bool)  # a value was given (NaN is a value)
        self._skipped = np.zeros(self.K, dtype=bool)
        self._steps = np.full(self.K, -1, dtype=np.int64)
        self._times = np.zeros(self.K)
        self._tokens = [None] * self.K
        self._n = 0  # rows written since the last collect
        self._extra_valid = False
        self._extra_has_ratio = False
        self._snap: Optional[List[torch.Tensor]] = None
        self._snap_step: Optional[int] = None

        # host-side rolling state (what state_dict saves)
        self._loss_hist: List[float] = []
        self._ref_time: Optional[float] = None
        self._ref_tokens: Optional[float] = None
        self._tokens_sum = 0.0  # running token count when only batch_tokens is given
        self._last: Dict[str, float] = {}
        self._extra_failed = False

        # probe-round parts
        self._hessian_fn: Optional[Callable[[], torch.Tensor]] = None
        core = unwrap(model) if isinstance(model, torch.nn.Module) else None
        self._core = core
        if core is not None:
            self.blocks = find_blocks(core)
            self.attention = find_attention(core, self.blocks)
            self.head, self.head_kind = find_output_head(core)
        else:
            self.blocks, self.attention, self.head, self.head_kind = [], [], None, "model"

    # ---- per step -------------------------------------------------------------------------
    def _ensure_buffer(self, device: torch.device) -> None:
        if self._buf is not None:
            return
        self._buf = torch.full(
            (self._ex_off + self._ex_len,), float("nan"), dtype=torch.float32, device=device
        )
        rows = self._buf[: self._ex_off].view(self.K, NCOLS)
        self._cells = [[rows[r, c] for c in range(NCOLS)] for r in range(self.K)]

    def _device_for(self, *values: Any) -> torch.device:
        for v in values:
            if isinstance(v, torch.Tensor):
                return v.device
        for p in self.params:
            return p.device
        return torch.device("cpu")

    def _put(self, row: int, col: int, value: Any) -> None:
        self._present[row, col] = value is not None
        if value is None:
            self._host[row, col] = np.nan
            self._is_dev[row, col] = False
        elif isinstance(value, torch.Tensor):
            # copy_ into a preallocated view: a device-side copy (and cast), no sync.
            self._cells[row][col].copy_(value.detach().reshape(()), non_blocking=True)
            self._is_dev[row, col] = True
        else:
            self._host[row, col] = float(value)
            self._is_dev[row, col] = False

    def on_step(
        self,
        step: int,
        loss: Any = None,
        lr: Any = None,
        tokens: Optional[float] = None,
        grad_norm: Any = None,
        loss_scale: Any = None,
        skipped: bool = False,
        batch_tokens: Optional[float] = None,
    ) -> None:
        """Record one optimizer step; device work only, no host synchronisation."""
        self._ensure_buffer(self._device_for(loss, grad_norm))
        row = self._n % self.K
        self._n += 1
        self._steps[row] = int(step)
        self._times[row] = time.perf_counter()
        self._skipped[row] = bool(skipped)
        if batch_tokens is not None:
            self._tokens_sum += float(batch_tokens)
        self._tokens[row] = (
            float(tokens)
            if tokens is not None
            else (self._tokens_sum if batch_tokens is not None else None)
        )
        if grad_norm is None and not skipped:
            with torch.no_grad():
                grad_norm = stacked_norm([p.grad for p in self.params if p.grad is not None])
        self._put(row, LOSS, loss)
        self._put(row, GRAD_NORM, grad_norm)
        self._put(row, LOSS_SCALE, loss_scale)
        self._put(row, LR, lr)

        self._collect_step_work(int(step), bool(skipped))

    def _collect_step_work(self, step: int, skipped: bool) -> None:
        """Parameter norm and update ratio, only around collect steps.

        Update ratio ||dθ||/||θ|| needs the update itself. A parameter copy every step
        would double the step's memory traffic and memory; deriving dθ from Adam's
        state (lr * m_hat/(sqrt(v_hat)+eps) + weight decay) would be exact only for one
        optimizer implementation (not fused/8-bit/ZeRO/Lion/Muon, not after clipping or
        schedulers that touch the update). So we take the exact update of the collect
        step only: snapshot the parameters (a device copy) at the step BEFORE a collect
        step, diff in place at the collect step, and free the copy. Cost: one parameter
        copy and two norm passes per K steps, and one extra parameter-sized buffer held
        for one step. `update_ratio: false` turns it off where that memory is too tight.
        """
        K = self.K
        is_collect = step % K == 0
        with torch.no_grad():
            if is_collect and self.params:
                pn_t = torch._foreach_norm(self.params, 2, dtype=torch.float32)
                pn_g = group_norms(list(pn_t), self.group_idx)
                pn = torch.linalg.vector_norm(pn_g)
                ex = self._buf[self._ex_off :]
                G = len(self.group_names)
                ex[0].copy_(pn)
                ex[2 : 2 + G].copy_(pn_g)
                have_ratio = self._snap is not None and self._snap_step == step - 1 and not skipped
                if have_ratio:
                    torch._foreach_sub_(self._snap, self.params)  # snap := θ_prev - θ_now = -Δθ
                    dn_t = torch._foreach_norm(self._snap, 2, dtype=torch.float32)
                    dn_g = group_norms(list(dn_t), self.group_idx)
                    ex[1].copy_(torch.linalg.vector_norm(dn_g) / pn)
                    ex[2 + G :].copy_(dn_g / pn_g)
                self._extra_valid = True
                self._extra_has_ratio = have_ratio
                self._snap, self._snap_step = None, None
            if self.do_update_ratio and (step + 1) % K == 0 and self.params:
                self._snap = torch._foreach_mul(self.params, 1.0)  # device copy, no sync
                self._snap_step = step

    # ---- collect --------------------------------------------------------------------------
    def run_collectives(self, step: int) -> Dict[str, float]:
        """The framework's extra step metrics (`extra_fn`: e.g. the ZeRO-3 parameter norm, an
        all-reduce), once per collect step. First thing in `collect`, before any local work
        that could fail on one rank only; and the monitor calls it at collect steps even
        after this rank's indicators were disabled by an error, so every rank keeps joining
        the same collectives (a rank that stopped would pair the others' all-reduce with
        the next training all-reduce)."""
        if self._collectives_step == step:
            return {}
        self._collectives_step = step
        out: Dict[str, float] = {}
        if self.extra_fn is not None and not self._extra_failed:
            try:
                for k, v in (self.extra_fn() or {}).items():
                    fv = float(v.item() if isinstance(v, torch.Tensor) else v)
                    if math.isfinite(fv):
                        out[str(k)] = fv
            except Exception as e:  # noqa: BLE001 - a framework metric must not kill the indicators
                self._extra_failed = True
                log.warning(
                    "fineline_monitor: extra step metrics failed and are disabled: %s: %s",
                    type(e).__name__,
                    e,
                )
        return out

    def collect(self, step: int) -> Dict[str, float]:
        """One host copy of the buffer; returns the latest values and window aggregates."""
        extra = self.run_collectives(step)
        n = min(self._n, self.K)
        out: Dict[str, float] = {}
        if self._buf is None or n == 0:
            return extra
        flat = self._buf.tolist()  # the single device -> host transfer
        dev_rows = np.asarray(flat[: self._ex_off], dtype=np.float64).reshape(self.K, NCOLS)
        # rows in step order, oldest first
        start = self._n % self.K if self._n >= self.K else 0
        order = [(start + i) % self.K for i in range(n)] if self._n >= self.K else list(range(n))
        vals = np.where(self._is_dev, dev_rows, self._host)[order]
        present = self._present[order]
        skipped = self._skipped[order]
        times = self._times[order]
        toks = [self._tokens[r] for r in order]

        # -- loss: latest, rolling mean, z-score of each new loss vs. the window before it
        losses = vals[:, LOSS]
        finite = np.isfinite(losses)
        has = present[:, LOSS]
        have_loss = bool(np.any(has))
        if have_loss:
            out[names.NONFINITE_LOSS] = float(np.sum(has & ~finite))
        zs = []
        for x, ok in zip(losses, finite & has):
            if not ok:
                continue
            hist = self._loss_hist[-self.window :]
            if len(hist) >= min(MIN_Z_HISTORY, self.window):
                sd = float(np.std(hist, ddof=1))
                if sd > 0:
                    zs.append((x - float(np.mean(hist))) / sd)
            self._loss_hist.append(float(x))
        self._loss_hist = self._loss_hist[-self.window :]
        if has[-1] and np.isfinite(losses[-1]):
            out[names.LOSS] = float(losses[-1])
        if self._loss_hist:
            out[names.LOSS_MEAN] = float(np.mean(self._loss_hist))
        if zs:
            # The largest z over the window's steps, so a one-step spike between two
            # collect steps is still seen by the alert rule.
            out[names.LOSS_Z] = float(max(zs))

        # -- gradient norm: latest and window max; non-finite counts
        gns = vals[:, GRAD_NORM]
        have_gn = present[:, GRAD_NORM]
        if np.any(have_gn):
            bad = have_gn & ~np.isfinite(gns) & ~skipped
            # Overflow steps that the framework skipped (fp16 loss scaling) are expected
            # and counted in optim/skipped_steps, not here.
            out[names.NONFINITE_GRAD] = float(np.sum(bad))
            fin = gns[have_gn & np.isfinite(gns)]
            if have_gn[-1] and np.isfinite(gns[-1]):
                out[names.GRAD_NORM] = float(gns[-1])
            if fin.size:
                out[names.GRAD_NORM_MAX] = float(np.max(fin))
        out[names.SKIPPED_STEPS] = float(np.sum(skipped))
        ls = vals[:, LOSS_SCALE]
        if np.isfinite(ls[-1]):
            out[names.LOSS_SCALE] = float(ls[-1])
        lr = vals[:, LR]
        if np.isfinite(lr[-1]):
            out[names.LR] = float(lr[-1])

        # -- tokens and throughput (host clock; over many steps it tracks the device)
        if toks[-1] is not None:
            out[names.TOKENS] = float(toks[-1])
            if self._ref_time is not None and self._ref_tokens is not None:
                t0, k0 = self._ref_time, self._ref_tokens
            else:
                t0, k0 = float(times[0]), toks[0]
            dt = float(times[-1]) - t0
            if k0 is not None and dt > 0:
                out[names.TOKENS_PER_S] = (float(toks[-1]) - float(k0)) / dt
            self._ref_time, self._ref_tokens = float(times[-1]), float(toks[-1])

        # -- parameter norm and update ratio (computed at the collect step, if it was this one)
        if self._extra_valid and self._steps[order[-1]] == step:
            ex = flat[self._ex_off :]
            G = len(self.group_names)
            out[names.PARAM_NORM] = ex[0]
            if self._extra_has_ratio:
                out[names.UPDATE_RATIO] = ex[1]
                for g, name in enumerate(self.group_names):
                    if len(self.group_idx[g]):
                        out[names.per_item(names.UPDATE_RATIO, name)] = ex[2 + G + g]
        out = {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}

        # reset the window
        self._n = 0
        self._is_dev[:] = False
        self._present[:] = False
        self._host[:] = np.nan
        self._extra_valid = False
        self._extra_has_ratio = False

        out.update(extra)
        self._last = out
        return out

    # ---- probe rounds ---------------------------------------------------------------------
    def set_hessian_batch(self, loss_fn: Optional[Callable[[], torch.Tensor]]) -> None:
        """Give a closure returning the (differentiable, scalar) loss of a small fixed batch.

        Used for the Hutchinson Hessian trace when `cfg.hessian_trace` is on. It runs on
        every rank in `probe_context()`; cost per probe round: `hessian_samples` x (one
        forward + one backward with create_graph + one Hessian-vector product), about
        4-5 training steps on that batch each, and the memory of a double-backward graph.
        Under DDP/FSDP pass a closure over the unwrapped module so no gradient
        collective runs.
        """
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("set_hessian_batch expects a callable returning a scalar loss tensor")
        self._hessian_fn = loss_fn

    def probe_context(self) -> ProbeContext:
        """Hooks for the probe round's forward passes, plus optimizer statistics taken now.

        Called by the monitor on every rank just before a probe round (the gradient of
        the last step is still in `.grad`).
        """
        stats: Dict[str, Any] = {}
        with torch.no_grad():
            if (
                getattr(self.cfg, "optimizer_stats", True)
                and self.optimizer is not None
                and getattr(self.optimizer, "param_groups", None)
            ):
                stats["adam"] = adam_group_stats(self.optimizer, self.group_names)
        if getattr(self.cfg, "hessian_trace", False) and self._hessian_fn is not None:
            stats["hessian_trace"] = self._hessian_trace()
        hooks = bool(getattr(self.cfg, "attention_hooks", True)) and self._core is not None
        return ProbeContext(
            self._core if self._core is not None else self.model,
            blocks=self.blocks,
            attention=self.attention,
            head=self.head,
            head_kind=self.head_kind,
            hooks_enabled=hooks,
            device_stats=stats,
        )

    def _hessian_trace(self) -> torch.Tensor:
        model = self._core
        was_training = model.training if model is not None else None
        if model is not None:
            model.eval()  # no dropout noise in the curvature estimate
        try:
            return hutchinson_trace(
                self._hessian_fn, self.params, int(getattr(self.cfg, "hessian_samples", 4)), seed=0
            )
        finally:
            if model is not None and was_training:
                model.train()

    def probe_round_metrics(self, ctx: ProbeContext) -> Dict[str, float]:
        """All probe-round indicators of `ctx`, with one device-to-host copy."""
        dev_metrics: Dict[str, Any] = dict(ctx.device_metrics())
        host: Dict[str, float] = {}
        adam = ctx.device_stats.get("adam")
        if adam:
            for name, v in adam["grad_rms"].items():
                dev_metrics[names.per_item(names.GRAD_RMS, name)] = v
            for name, v in adam["exp_avg_sq_mean"].items():
                dev_metrics[names.per_item(names.EXP_AVG_SQ_MEAN, name)] = v
            for name, v in adam["v_below_eps_frac"].items():
                dev_metrics[names.per_item(names.V_BELOW_EPS_FRAC, name)] = v
            if adam["eps"]:
                host[names.ADAM_EPS] = min(adam["eps"].values())
        if "hessian_trace" in ctx.device_stats:
            dev_metrics[names.HESSIAN_TRACE] = ctx.device_stats["hessian_trace"]
        out = dict(host)
        tensors = {k: v for k, v in dev_metrics.items() if isinstance(v, torch.Tensor)}
        for k, v in dev_metrics.items():
            if not isinstance(v, torch.Tensor):
                out[k] = float(v)
        if tensors:
            dev = next(iter(tensors.values())).device
            values = torch.stack(
                [t.detach().float().reshape(()).to(dev) for t in tensors.values()]
            ).tolist()
            out.update(dict(zip(tensors.keys(), values)))
        if adam and adam["eps"]:
            ratios = [
                out[names.per_item(names.GRAD_RMS, g)] / e
                for g, e in adam["eps"].items()
                if names.per_item(names.GRAD_RMS, g) in out
            ]
            if ratios:
                out[names.GRAD_RMS_OVER_EPS_MIN] = min(ratios)
        return {k: float(v) for k, v in out.items() if math.isfinite(v)}

    # ---- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Rolling state only (JSON-able): the loss window and the token counter.

        Rows recorded since the last collect are not saved; after a restart the first
        window starts fresh.
        """
        return {
            "version": STATE_VERSION,
            "loss_hist": [float(x) for x in self._loss_hist[-self.window :]],
            "tokens_sum": float(self._tokens_sum),
        }

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        if not isinstance(sd, dict) or sd.get("version") != STATE_VERSION:
            raise ValueError(
                f"indicator state version {sd.get('version') if isinstance(sd, dict) else sd!r} "
                f"is not {STATE_VERSION}"
            )
        self._loss_hist = [float(x) for x in sd.get("loss_hist", [])][-self.window :]
        self._tokens_sum = float(sd.get("tokens_sum", 0.0))
        self._ref_time = self._ref_tokens = None
