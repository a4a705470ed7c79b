"""Training phases from the learning-rate schedule, as observed or as declared.

Phases (each has its own expectations, see expectations.py):
- `warmup`: LR still rising from its start (capability rules are suppressed);
- `stable`: LR at a plateau or near its peak (most of a WSD/cosine run's early life);
- `decay`:  LR below `decay_frac` (90%) of the peak reached so far and going down
            (cosine tail, WSD decay): curves may legitimately improve faster;
- `anneal`: LR below `anneal_frac` (10%) of the peak: the low-LR tail where loss and
            capabilities improve fastest (OLMo-style annealing);
- `rewarm`: LR rising again after a decay/anneal, or climbing above the old peak
            (continual pretraining): the loss may legitimately bump up.

Inference rules, in order, from LR samples (every `indicators.collect_every` steps):
- declared phases (`alerts.phases: [warmup@0, stable@2000, ...]`) win outright;
- `alerts.warmup_steps > 0`: steps below it are warmup, whatever the LR does;
- otherwise a rise of more than `rel_tol` (1%) between samples is warmup when no plateau
  has been seen yet and rewarm afterwards; a rewarm ends (-> stable) when the LR stops
  rising for `settle` samples; a fall below the fractions above is decay / anneal.
Without any LR and without declarations the phase is `stable` (offline tables usually
carry no LR; give `--phases` to `analyze` to declare them).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

PHASES = ("warmup", "stable", "decay", "anneal", "rewarm")


def parse_declared(specs: List[str]) -> List[Tuple[int, str]]:
    """`["warmup@0", "stable@2000"]` -> sorted [(0, "warmup"), (2000, "stable")]."""
    out = []
    for s in specs:
        name, _, step = s.partition("@")
        name = name.strip()
        if name not in PHASES or not step.strip().isdigit():
            raise ValueError(
                f"phase {s!r} must be `PHASE@STEP` with PHASE one of {', '.join(PHASES)}"
            )
        out.append((int(step), name))
    return sorted(out)


class PhaseTracker:
    """Tracks the current phase; records transitions as {step, tokens, phase, previous}."""

    def __init__(
        self,
        declared: Optional[List[str]] = None,
        warmup_steps: int = 0,
        *,
        decay_frac: float = 0.9,
        anneal_frac: float = 0.1,
        rel_tol: float = 0.01,
        settle: int = 2,
    ):
        self.declared = parse_declared(declared or [])
        self.warmup_steps = int(warmup_steps)
        self.decay_frac, self.anneal_frac, self.rel_tol, self.settle = (
            decay_frac,
            anneal_frac,
            rel_tol,
            settle,
        )
        self.phase: str = (
            "warmup"
            if (self.warmup_steps > 0 or (self.declared and self.declared[0][1] == "warmup"))
            else "stable"
        )
        self.segment = 0  # increments on every transition: expectations are per segment
        self.peak_lr = 0.0
        self.last_lr: Optional[float] = None
        self.min_since_peak: Optional[float] = None
        self.flat_count = 0
        self.seen_plateau = False
        self.n_lr = 0
        self.changes: List[Dict[str, Any]] = []
        self.history: List[
            Dict[str, Any]
        ] = []  # every transition ever, for reports (bounded below)
        self._started = False
        self._pending: Optional[Tuple[int, Optional[float]]] = None

    # ---- the one entry point --------------------------------------------------------------
    def observe(self, step: int, tokens: Optional[float] = None, lr: Optional[float] = None) -> str:
        """Update from one step; returns the phase in force at `step`."""
        new = self._infer(step, lr)
        if not self._started:
            # One LR sample says nothing about its direction: the first phase stays
            # provisional until the second sample, then is recorded at the first step (a run
            # whose LR rises from step 0 starts in warmup, not stable -> warmup -> stable).
            lr_ok = lr is not None and isinstance(lr, (int, float)) and math.isfinite(lr)
            if lr_ok and self.n_lr == 1 and not self.declared and self.warmup_steps == 0:
                self._pending = (int(step), tokens)
                self.phase = new
                return self.phase
            if not lr_ok and self._pending is not None:
                # A call without an LR (a probe round at the same step) must not settle the
                # provisional phase: only the next LR sample can.
                return self.phase
            self._started = True
            s0, t0 = self._pending if self._pending is not None else (step, tokens)
            self._pending = None
            self._set(new, s0, t0, previous=None)
        elif new != self.phase:
            self._set(new, step, tokens, previous=self.phase)
        return self.phase

    def _set(self, new: str, step: int, tokens: Optional[float], previous: Optional[str]) -> None:
        if previous is not None:
            self.segment += 1
        self.phase = new
        ev = {
            "step": int(step),
            "tokens": None if tokens is None else int(tokens),
            "phase": new,
            "previous": previous,
        }
        self.changes.append(ev)
        self.history.append(ev)
        if len(self.history) > 200:  # bounded state: keep the first and the latest transitions
            del self.history[1 : len(self.history) - 150]

    def pop_changes(self) -> List[Dict[str, Any]]:
        out, self.changes = self.changes, []
        return out

    def _declared_phase(self, step: int) -> Optional[str]:
        cur = None
        for s, name in self.declared:
            if step >= s:
                cur = name
        return cur

    def _infer(self, step: int, lr: Optional[float]) -> str:
        lr_ok = lr is not None and isinstance(lr, (int, float)) and math.isfinite(lr)
        if lr_ok:
            self._update_lr(float(lr))  # keep LR statistics even when phases are declared
        if self.declared:
            d = self._declared_phase(step)
            if d is not None:
                return d
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return "warmup"
        if not lr_ok or self.n_lr < 2:
            if self.warmup_steps > 0 and self.phase == "warmup":
                return "stable"
            if lr_ok and self.n_lr == 1 and self.warmup_steps == 0 and float(lr) == 0.0:
                return "warmup"  # LR starts at zero: a warmup is about to happen
            return self.phase
        return self._lr_phase(float(lr))

    def _update_lr(self, lr: float) -> None:
        prev = self.last_lr
        self.n_lr += 1
        self._rising = prev is not None and lr > prev * (1 + self.rel_tol) + 1e-30
        self._falling = prev is not None and lr < prev * (1 - self.rel_tol)
        if self._rising:
            self.flat_count = 0
        else:
            self.flat_count += 1
        if self.min_since_peak is None or lr < self.min_since_peak:
            self.min_since_peak = lr
        self.last_lr = lr

    def _lr_phase(self, lr: float) -> str:
        cur = self.phase
        peak = self.peak_lr
        if self._rising:
            was_low = (
                peak > 0
                and self.min_since_peak is not None
                and self.min_since_peak < self.decay_frac * peak
            )
            if cur in ("decay", "anneal") or (
                cur == "stable"
                and self.seen_plateau
                and (was_low or lr > peak * (1 + 10 * self.rel_tol))
            ):
                new = "rewarm"
            elif cur == "rewarm":
                new = "rewarm"
            elif not self.seen_plateau:
                new = "warmup"
            else:
                new = cur
            if lr > self.peak_lr:
                self.peak_lr = lr
            if new in ("warmup", "rewarm"):
                self.min_since_peak = lr
            return new
        if lr > self.peak_lr:
            self.peak_lr = lr
            peak = lr
        if cur in ("warmup", "rewarm"):
            if self.flat_count >= self.settle or self._falling:
                self.seen_plateau = True
                self.peak_lr = max(self.peak_lr, lr)
                if cur == "rewarm":
                    self.peak_lr = lr  # the rewarmed LR is the new reference peak
                return "stable"
            return cur
        self.seen_plateau = True
        if peak > 0 and lr < self.anneal_frac * peak:
            return "anneal"
        if peak > 0 and lr < self.decay_frac * peak:
            return "decay" if cur != "anneal" else "anneal"
        return "stable" if cur not in ("decay", "anneal") else cur

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "phase": self.phase,
            "segment": self.segment,
            "peak_lr": self.peak_lr,
            "last_lr": self.last_lr,
            "min_since_peak": self.min_since_peak,
            "flat_count": self.flat_count,
            "seen_plateau": self.seen_plateau,
            "n_lr": self.n_lr,
            "history": list(self.history),
            "started": self._started,
            "pending": list(self._pending) if self._pending else None,
        }

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.phase = sd["phase"]
        self.segment = int(sd["segment"])
        self.peak_lr = float(sd["peak_lr"])
        self.last_lr = sd["last_lr"]
        self.min_since_peak = sd["min_since_peak"]
        self.flat_count = int(sd["flat_count"])
        self.seen_plateau = bool(sd["seen_plateau"])
        self.n_lr = int(sd["n_lr"])
        self.history = list(sd.get("history", []))
        self._started = bool(sd.get("started", True))
        self._pending = tuple(sd["pending"]) if sd.get("pending") else None  # type: ignore[assignment]
        self.changes = []
