"""Cadence decisions: small pure functions of the step (and tokens).

Every decision that leads into a collective (probe now, collect now) must come out the
same on every rank, so these depend only on numbers every rank has: the optimizer step
and the global token count.
"""

from __future__ import annotations

from typing import Optional


def should_collect(step: int, every: int) -> bool:
    """Copy device-side indicators to the host on this step?"""
    return every > 0 and step % every == 0


def should_probe(step: int, *, every: int, tokens: Optional[int] = None, every_tokens: int = 0,
                 last_probe_tokens: Optional[int] = None, at_start: bool = True,
                 first_step: Optional[int] = None) -> bool:
    """Run a probe round on this step?

    - `every` > 0: every `every` optimizer steps (step % every == 0).
    - `every_tokens` > 0: when the global token count crossed a multiple of it since the
      last probe (token counts jump by a batch, so test the crossing, not equality).
    - `at_start`: also on the first step the monitor sees, to anchor every curve.
    `every == 0 and every_tokens == 0` turns probes off entirely.
    """
    if every <= 0 and every_tokens <= 0:
        return False
    if at_start and first_step is not None and step == first_step:
        return True
    if every > 0 and step > 0 and step % every == 0:
        return True
    if every_tokens > 0 and tokens is not None:
        prev = last_probe_tokens if last_probe_tokens is not None else 0
        return tokens // every_tokens > prev // every_tokens
    return False


def budgeted_interval(every: int, round_seconds: float, step_seconds: float, max_overhead: float) -> int:
    """Steps until the next probe round so probes stay within `max_overhead` of wall time.

    A round that took `round_seconds`, on steps that take `step_seconds` of training,
    costs round_seconds / (interval * step_seconds) of the wall time; the interval is the
    smallest multiple of `every` that keeps that at or under the budget. Rounding to
    multiples of `every` keeps probe steps comparable across runs and restarts.
    """
    if every <= 0:
        return 0
    if max_overhead <= 0 or step_seconds <= 0 or round_seconds <= 0:
        return every
    needed = round_seconds / (max_overhead * step_seconds)
    multiples = max(1, -(-int(needed) // every))  # ceil without floats drifting
    if multiples * every < needed:
        multiples += 1
    return multiples * every
