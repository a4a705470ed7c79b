"""Cadence decisions: small pure functions of the step (and tokens).

Every decision that leads into a collective (probe now, collect now) must come out the
same on every rank, so these depend only on numbers every rank has: the optimizer step
and the global token count.
"""

from __future__ import annotations

import math
from typing import Optional


def should_collect(step: int, every: int) -> bool:
    """Copy device-side indicators to the host on this step?"""
    return every > 0 and step % every == 0


def should_probe(
    step: int,
    *,
    every: int,
    tokens: Optional[int] = None,
    every_tokens: int = 0,
    last_probe_tokens: Optional[int] = None,
    at_start: bool = True,
    first_step: Optional[int] = None,
    not_before: Optional[int] = None,
) -> bool:
    """Run a probe round on this step?

    - `every` > 0: every `every` optimizer steps (step % every == 0).
    - `every_tokens` > 0: when the global token count crossed a multiple of it since the
      last probe (token counts jump by a batch, so test the crossing, not equality).
    - `at_start`: also on the first step the monitor sees, to anchor every curve.
    - `not_before`: no round before this step (the whole-run budget postponed it).
    `every == 0 and every_tokens == 0` turns probes off entirely.
    """
    if every <= 0 and every_tokens <= 0:
        return False
    if not_before is not None and step < not_before:
        return False
    if at_start and first_step is not None and step == first_step:
        return True
    if every > 0 and step > 0 and step % every == 0:
        return True
    if every_tokens > 0 and tokens is not None:
        prev = last_probe_tokens if last_probe_tokens is not None else 0
        return tokens // every_tokens > prev // every_tokens
    return False


def probe_budget_next_step(
    step: int,
    *,
    every: int,
    max_overhead: float,
    monitor_seconds: float,
    train_seconds: float,
    round_seconds: float,
    step_seconds: float,
    monitor_step_seconds: float = 0.0,
) -> Optional[int]:
    """Whole-run budget for the monitor: None when a probe round may run at `step`, else
    the first step at which it may.

    The budget is cumulative since attach: `monitor_seconds` (everything spent inside
    `monitor.step`, probe rounds and per-step indicators alike) must stay within
    `max_overhead` of `train_seconds` (the loop's own time between calls). A round that
    would cost about `round_seconds` (the last one) runs only if it keeps that share; else
    the next attempt is `n` steps later, where `n` solves

        monitor_seconds + round_seconds + n * monitor_step_seconds
            <= max_overhead * (train_seconds + n * step_seconds),

    rounded up to a multiple of `every` (probe steps stay comparable across runs and
    restarts). Cumulative, not per interval, so an expensive anchor round at the first
    step is paid back before the next one, and the whole run, not each gap, is what the
    budget bounds. `max_overhead <= 0` or no measured round yet: always None.
    """
    if max_overhead <= 0 or round_seconds <= 0:
        return None
    deficit = monitor_seconds + round_seconds - max_overhead * train_seconds
    if deficit <= 0:
        return None
    if step_seconds <= 0:
        return step + max(every, 1)  # no step timing yet: look again one interval later
    # Per-step indicator time eats into what each training step earns; if it alone used
    # most of the budget, rounds would never run, so at least half a step's share counts.
    earned = max(
        max_overhead * step_seconds - monitor_step_seconds, 0.5 * max_overhead * step_seconds
    )
    n = max(1, math.ceil(deficit / earned))
    if every > 0:
        return -(-(step + n) // every) * every  # the first multiple of `every` at or after step + n
    return step + n
