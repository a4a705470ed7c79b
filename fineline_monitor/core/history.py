"""Bounded histories: per-step scalars and windowed probe curves.

Everything here is bounded so `state_dict()` stays small on a months-long run:
- `ScalarWindow` keeps the last `size` values of one per-step metric (loss, grad norm...)
  plus a log-spaced downsample of older ones (enough to draw, not to re-fit);
- `TrailingPoints` keeps, for many probe curves at once, the newest `width` points (with
  their phase segments) in (curves x width) arrays: the alert engine judges the next
  round, or a whole table, from them in a handful of vectorised numpy operations.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np


class ScalarWindow:
    """Recent values of one scalar series with robust statistics."""

    def __init__(self, size: int = 64):
        self.size = int(size)
        self.values: deque = deque(maxlen=self.size)
        self.steps: deque = deque(maxlen=self.size)

    def __len__(self) -> int:
        return len(self.values)

    def append(self, step: int, value: float) -> None:
        self.steps.append(int(step))
        self.values.append(float(value))

    def array(self) -> np.ndarray:
        return np.asarray(self.values, dtype=np.float64)

    def median(self, last: Optional[int] = None) -> float:
        a = self.array() if last is None else self.array()[-last:]
        a = a[np.isfinite(a)]
        return float(np.median(a)) if a.size else math.nan

    def robust_noise(self, last: Optional[int] = None) -> float:
        """Noise scale robust to trend and outliers: MAD of first differences / sqrt(2).

        Differences cancel a slow trend (a falling loss), the median ignores a few spikes.
        """
        a = self.array() if last is None else self.array()[-last:]
        a = a[np.isfinite(a)]
        if a.size < 3:
            return math.nan
        d = np.diff(a)
        mad = float(np.median(np.abs(d - np.median(d))))
        return 1.4826 * mad / math.sqrt(2.0)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "size": self.size,
            "steps": list(self.steps),
            "values": [_jsonable(v) for v in self.values],
        }

    @classmethod
    def from_state(cls, sd: Dict[str, Any]) -> "ScalarWindow":
        w = cls(sd.get("size", 64))
        for s, v in zip(sd["steps"], sd["values"]):
            w.append(s, math.nan if v is None else v)
        return w


def _jsonable(v: float) -> Optional[float]:
    return v if v is not None and math.isfinite(v) else None


class TrailingPoints:
    """The newest `width` points of many curves, as (n_curves, width) arrays, newest last,
    empty slots (x nan) in front. Each point keeps what judging a later point needs: its
    time (log tokens or log steps), value, known sampling variance, whether a fit may use
    it (finite, at a positive time), its phase segment, and the segment it anchors
    (`anchor`: a decay or anneal segment that keeps it as a level anchor; -1 none)."""

    FIELDS = ("x", "y", "var", "usable", "segment", "anchor", "ref")

    def __init__(self, width: int = 16):
        self.width = int(width)
        self.keys: List[str] = []
        self.index: Dict[str, int] = {}
        self.x = np.full((0, self.width), np.nan)
        self.y = np.full((0, self.width), np.nan)
        self.var = np.full((0, self.width), np.nan)
        self.usable = np.zeros((0, self.width), dtype=bool)
        self.segment = np.full((0, self.width), -2, dtype=np.int64)
        self.anchor = np.full((0, self.width), -1, dtype=np.int64)
        self.ref = np.full(
            (0, self.width), np.nan
        )  # a reference ladder's value at the point (nan: none)

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def _empty(n: int, width: int) -> Dict[str, np.ndarray]:
        return {
            "x": np.full((n, width), np.nan),
            "y": np.full((n, width), np.nan),
            "var": np.full((n, width), np.nan),
            "usable": np.zeros((n, width), dtype=bool),
            "segment": np.full((n, width), -2, dtype=np.int64),
            "anchor": np.full((n, width), -1, dtype=np.int64),
            "ref": np.full((n, width), np.nan),
        }

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        """Row index of each key, adding new curves as needed."""
        new = list(dict.fromkeys(k for k in keys if k not in self.index))  # ordered, no repeats
        if new:
            for i, k in enumerate(new):
                self.index[k] = len(self.keys) + i
            self.keys.extend(new)
            add = self._empty(len(new), self.width)
            for f in self.FIELDS:
                setattr(self, f, np.vstack([getattr(self, f), add[f]]))
        return np.fromiter((self.index[k] for k in keys), dtype=np.int64, count=len(keys))

    def widen(self, width: int) -> None:
        """Grow to `width` columns (empty ones in front, so the newest stay last); a
        narrower request is ignored (points are never dropped here)."""
        add = int(width) - self.width
        if add <= 0:
            return
        pad = self._empty(len(self.keys), add)
        for f in self.FIELDS:
            setattr(self, f, np.hstack([pad[f], getattr(self, f)]))
        self.width = int(width)

    def state_dict(self) -> Dict[str, Any]:
        def enc(a: np.ndarray) -> List[List[Optional[float]]]:
            return [[None if not math.isfinite(v) else float(v) for v in row] for row in a.tolist()]

        return {
            "width": self.width,
            "keys": list(self.keys),
            "x": enc(self.x),
            "y": enc(self.y),
            "var": enc(self.var),
            "usable": self.usable.astype(int).tolist(),
            "segment": self.segment.tolist(),
            "anchor": self.anchor.tolist(),
            "ref": enc(self.ref),
        }

    @classmethod
    def from_state(
        cls, sd: Dict[str, Any], segments: Optional[Sequence[int]] = None
    ) -> "TrailingPoints":
        """Loads both formats. State version 2 kept a `use` mask already restricted to the
        curve's segment and no segments per point: its points get the curve's segment
        (`segments`, one per key), usable where `use` was."""
        w = cls(sd["width"])
        w.keys = list(sd["keys"])
        w.index = {k: i for i, k in enumerate(w.keys)}
        n = len(w.keys)

        def dec(rows: Iterable) -> np.ndarray:
            a = np.array(
                [[math.nan if v is None else v for v in r] for r in rows], dtype=np.float64
            )
            return a.reshape(n, w.width)

        w.x, w.y, w.var = dec(sd["x"]), dec(sd["y"]), dec(sd["var"])
        w.ref = dec(sd["ref"]) if "ref" in sd else np.full((n, w.width), np.nan)
        if "usable" in sd:
            w.usable = np.array(sd["usable"], dtype=bool).reshape(n, w.width)
            w.segment = np.array(sd["segment"], dtype=np.int64).reshape(n, w.width)
            w.anchor = np.array(sd["anchor"], dtype=np.int64).reshape(n, w.width)
        else:
            w.usable = np.array(sd["use"], dtype=bool).reshape(n, w.width)
            seg = np.asarray(list(segments) if segments is not None else [-1] * n, dtype=np.int64)
            w.segment = np.repeat(seg.reshape(n, 1), w.width, axis=1)
            w.anchor = np.full((n, w.width), -1, dtype=np.int64)
        return w


def log_time(tokens: Optional[float], step: Optional[float]) -> Tuple[float, str]:
    """The fit's time axis: log tokens when known, else log steps (both shifted by one so
    step 0 / token 0 is finite). Returns (x, which)."""
    if tokens is not None and math.isfinite(tokens):
        return math.log(tokens + 1.0), "tokens"
    return math.log(float(step or 0) + 1.0), "steps"
