"""Bounded histories: per-step scalars and windowed probe curves.

Everything here is bounded so `state_dict()` stays small on a months-long run:
- `ScalarWindow` keeps the last `size` values of one per-step metric (loss, grad norm...)
  plus a log-spaced downsample of older ones (enough to draw, not to re-fit);
- `CurveWindows` keeps, for many probe curves at once, the trailing `width` points of the
  current phase segment in (curves x width) arrays, so one probe round is fitted for all
  curves in a handful of vectorised numpy operations (this is what makes `analyze` take a
  630k-row table in seconds, and it is the same code the live monitor runs).
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
        return {"size": self.size, "steps": list(self.steps), "values": [_jsonable(v) for v in self.values]}

    @classmethod
    def from_state(cls, sd: Dict[str, Any]) -> "ScalarWindow":
        w = cls(sd.get("size", 64))
        for s, v in zip(sd["steps"], sd["values"]):
            w.append(s, math.nan if v is None else v)
        return w


def _jsonable(v: float) -> Optional[float]:
    return v if v is not None and math.isfinite(v) else None


class CurveWindows:
    """Trailing windows of many curves, as (n_curves, width) float arrays, nan-padded.

    Columns are time, newest last. `use` marks the points a fit may use: a point that fell
    out of its band is quarantined (kept for the record, not learnt from) so a fault is not
    absorbed into the expectation that should expose it.
    """

    def __init__(self, width: int = 16):
        self.width = int(width)
        self.keys: List[str] = []
        self.index: Dict[str, int] = {}
        self.x = np.full((0, self.width), np.nan)  # log tokens (or log steps)
        self.y = np.full((0, self.width), np.nan)  # observed value
        self.var = np.full((0, self.width), np.nan)  # known sampling variance (nan: unknown)
        self.use = np.zeros((0, self.width), dtype=bool)

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        """Row index of each key, adding new curves as needed."""
        new = [k for k in keys if k not in self.index]
        if new:
            # dict.fromkeys keeps order and drops repeats within this batch
            new = list(dict.fromkeys(new))
            n0 = len(self.keys)
            for i, k in enumerate(new):
                self.index[k] = n0 + i
            self.keys.extend(new)
            add = len(new)
            self.x = np.vstack([self.x, np.full((add, self.width), np.nan)])
            self.y = np.vstack([self.y, np.full((add, self.width), np.nan)])
            self.var = np.vstack([self.var, np.full((add, self.width), np.nan)])
            self.use = np.vstack([self.use, np.zeros((add, self.width), dtype=bool)])
        return np.fromiter((self.index[k] for k in keys), dtype=np.int64, count=len(keys))

    def push(self, rows: np.ndarray, x: np.ndarray, y: np.ndarray, var: np.ndarray, use: np.ndarray) -> None:
        """Append one point to each of `rows` (shifting the window left)."""
        for arr, val in ((self.x, x), (self.y, y), (self.var, var), (self.use, use)):
            arr[rows, :-1] = arr[rows, 1:]
            arr[rows, -1] = val

    def clear(self, rows: np.ndarray) -> None:
        """Forget the window of `rows` (a new phase segment starts a new fit)."""
        self.x[rows] = np.nan
        self.y[rows] = np.nan
        self.var[rows] = np.nan
        self.use[rows] = False

    def unquarantine(self, rows: np.ndarray) -> None:
        """Accept the quarantined points of `rows` as the new normal (a level shift that
        persisted and was alerted on; learning it avoids paging forever)."""
        self.use[rows] = np.isfinite(self.y[rows])

    def widen(self, width: int) -> None:
        """Grow to `width` columns (empty ones in front, so the newest stay last); a
        narrower request is ignored (points are never dropped here)."""
        add = int(width) - self.width
        if add <= 0:
            return
        n = len(self.keys)
        self.x = np.hstack([np.full((n, add), np.nan), self.x])
        self.y = np.hstack([np.full((n, add), np.nan), self.y])
        self.var = np.hstack([np.full((n, add), np.nan), self.var])
        self.use = np.hstack([np.zeros((n, add), dtype=bool), self.use])
        self.width = int(width)

    def state_dict(self) -> Dict[str, Any]:
        def enc(a: np.ndarray) -> List[List[Optional[float]]]:
            return [[None if not math.isfinite(v) else float(v) for v in row] for row in a.tolist()]

        return {"width": self.width, "keys": list(self.keys), "x": enc(self.x), "y": enc(self.y),
                "var": enc(self.var), "use": self.use.astype(int).tolist()}

    @classmethod
    def from_state(cls, sd: Dict[str, Any]) -> "CurveWindows":
        w = cls(sd["width"])
        w.keys = list(sd["keys"])
        w.index = {k: i for i, k in enumerate(w.keys)}
        n = len(w.keys)

        def dec(rows: Iterable) -> np.ndarray:
            a = np.array([[math.nan if v is None else v for v in r] for r in rows], dtype=np.float64)
            return a.reshape(n, w.width)

        w.x, w.y, w.var = dec(sd["x"]), dec(sd["y"]), dec(sd["var"])
        w.use = np.array(sd["use"], dtype=bool).reshape(n, w.width)
        return w


def log_time(tokens: Optional[float], step: Optional[float]) -> Tuple[float, str]:
    """The fit's time axis: log tokens when known, else log steps (both shifted by one so
    step 0 / token 0 is finite). Returns (x, which)."""
    if tokens is not None and math.isfinite(tokens):
        return math.log(tokens + 1.0), "tokens"
    return math.log(float(step or 0) + 1.0), "steps"
