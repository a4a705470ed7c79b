"""A ladder of reference runs: the expected trajectory of a run from smaller runs of its recipe.

"The Fine Line" observation this module rests on: downstream curves move with similar
dynamics across model sizes, so the runs of a pilot ladder (smaller models of the same data
and schedule) say how a larger run's curve should move, phase by phase. The prediction:

1. **Alignment.** Every reference curve is placed on one coordinate shared with the target:
   log training tokens (`tokens`), log optimizer steps (`steps`), log fraction of the run's
   own schedule (`fraction`: runs of different lengths line up by where they are in their LR
   schedule; needs each run's planned tokens), or log training compute 6·N·D (`compute`).
   `auto` chooses the coordinate whose leave-one-run-out prediction of the ladder's own
   curves is best (below), among those the data supports.
2. **Smoothing.** Each reference curve is smoothed by a local-linear fit on that coordinate
   (tricube weights, at least 5 neighbours): a reference's noise would otherwise become the
   target's expected wiggle.
3. **Across sizes.** At each coordinate the smoothed reference values are fitted by a line in
   log parameters and read at the target's size; with one reference (or sizes unknown) the
   prediction is the references' mean. Nothing is extrapolated along the coordinate: outside
   the references' span the prediction is NaN (the own-run detector judges alone there).
4. **Level calibration** (by the expectation source, not here): the target's first judged
   points fix one offset between ladder and target. Measured on the dev table's held-out
   runs this beats both the uncalibrated prediction and a level-and-scale fit (the scale is
   poorly determined by a few early points and its error grows with the distance from them);
   docs/alerts.md has the figures.

The core stays free of torch; everything is numpy.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from fineline_monitor.core.trajectory import Curve, TrajectoryError, read_trajectory

ALIGNMENTS = ("tokens", "steps", "fraction", "compute")
ALIGN_CHOICES = ("auto",) + ALIGNMENTS

SMOOTH_BANDWIDTH = (
    0.15  # half-width of the smoothing window, in natural-log units of the coordinate
)
SMOOTH_MIN_NEIGHBOURS = 5
SMOOTH_GRID = 200  # a smoothed curve is kept on at most this many coordinates
AUTO_MAX_CURVES = 24  # curves used to choose the alignment (enough to rank; keeps it ~seconds)
LOSO_CALIB_FRACTION = 0.2  # the held-out run's first 20% of points fix its level


class LadderError(TrajectoryError):
    """A reference ladder that cannot be read or used; the message says what was expected."""


Key = Tuple[str, str]  # (task, metric)


@dataclass
class ReferenceRun:
    """One reference run: its curves by (task, metric), its size and its length."""

    name: str  # `source/model`
    params: Optional[float]
    curves: Dict[Key, Curve] = field(default_factory=dict)

    @cached_property
    def total_tokens(self) -> Optional[float]:
        """The run's last tokens (its length); its curves do not change once read."""
        last = [
            float(np.nanmax(c.tokens)) for c in self.curves.values() if np.isfinite(c.tokens).any()
        ]
        return max(last) if last else None

    @property
    def has_tokens(self) -> bool:
        return any(np.isfinite(c.tokens).sum() >= 2 for c in self.curves.values())


def runs_from_curves(curves: Iterable[Curve]) -> List[ReferenceRun]:
    """Group curves into reference runs (one per `source/model`), in name order."""
    by_run: Dict[str, ReferenceRun] = {}
    for c in curves:
        name = f"{c.source}/{c.model}"
        run = by_run.setdefault(name, ReferenceRun(name=name, params=None))
        if c.params is not None and np.isfinite(c.params) and c.params > 0:
            run.params = float(c.params)
        run.curves[(c.task, c.metric)] = c
    return [by_run[k] for k in sorted(by_run)]


def _read_table(path: str):
    """A trajectory CSV, an lm-eval output folder/file, or another run's `run.db`."""
    p = Path(path)
    if p.suffix == ".db" and p.is_file():
        from fineline_monitor.core.store import RunStore

        store = RunStore(p, readonly=True)
        try:
            fd, tmp = tempfile.mkstemp(suffix=".csv")
            os.close(fd)
            try:
                store.export_trajectory_csv(tmp, all_runs=True)
                return read_trajectory(tmp)
            finally:
                os.unlink(tmp)
        finally:
            store.close()
    return read_trajectory(p)


def read_reference_runs(
    paths: Sequence[str], select: Sequence[str] = (), tables: Optional[Dict[str, Any]] = None
) -> List[ReferenceRun]:
    """The reference runs in `paths`; `select` keeps runs named `model` or `source/model`;
    `tables`: tables already read, by path (`analyze` of a table against runs of itself).

    Raises LadderError naming the file or the missing run (with the runs there are)."""
    if not paths:
        raise LadderError("no reference file given")
    runs: List[ReferenceRun] = []
    for path in paths:
        try:
            table = (tables or {}).get(str(path)) or _read_table(str(path))
        except TrajectoryError as e:
            raise LadderError(f"reference {path}: {e}") from None
        except Exception as e:  # an unreadable run.db, a folder without results
            raise LadderError(
                f"reference {path}: cannot read it ({type(e).__name__}: {e})"
            ) from None
        runs.extend(runs_from_curves(table.curves))
    if select:
        wanted = [s.strip() for s in select if s.strip()]
        chosen = []
        for s in wanted:
            hits = [
                r
                for r in runs
                if r.name == s or r.name.split("/", 1)[-1] == s or r.name.endswith("/" + s)
            ]
            if not hits:
                have = ", ".join(r.name for r in runs[:20])
                raise LadderError(
                    f"reference run `{s}` is not in {', '.join(map(str, paths))}; runs there: {have}"
                )
            chosen.extend(h for h in hits if h not in chosen)
        runs = chosen
    if not runs:
        raise LadderError(f"{', '.join(map(str, paths))}: no reference run found")
    return runs


def coordinate(
    align: str, steps, tokens, params: Optional[float], total_tokens: Optional[float]
) -> np.ndarray:
    """Where points lie on the shared coordinate (natural log); NaN where it is undefined."""
    steps = np.asarray(steps, dtype=float)
    tokens = np.asarray(tokens, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        if align == "steps":
            x = np.log(steps)
        elif align == "tokens":
            x = np.log(tokens)
        elif align == "fraction":
            x = np.log(tokens / total_tokens) if total_tokens else np.full(tokens.shape, np.nan)
        elif align == "compute":
            x = np.log(6.0 * params * tokens) if params else np.full(tokens.shape, np.nan)
        else:
            raise LadderError(f"alignment {align!r} is not one of {', '.join(ALIGN_CHOICES)}")
    x[~np.isfinite(x)] = np.nan
    return x


def smooth_on_grid(x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Local-linear smoothing with tricube weights, evaluated on <= SMOOTH_GRID coordinates."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if x.size < 2:
        return x, y
    grid = x if x.size <= SMOOTH_GRID else np.linspace(x[0], x[-1], SMOOTH_GRID)
    d = np.abs(grid[:, None] - x[None, :])
    k = min(SMOOTH_MIN_NEIGHBOURS, x.size) - 1
    h = np.maximum(SMOOTH_BANDWIDTH, np.partition(d, k, axis=1)[:, k] * 1.0001)
    w = np.clip(1.0 - (d / h[:, None]) ** 3, 0.0, None) ** 3
    sw = w.sum(axis=1)
    mx = (w * x).sum(axis=1) / sw
    my = (w * y).sum(axis=1) / sw
    dx = x[None, :] - mx[:, None]
    sxx = (w * dx * dx).sum(axis=1)
    sxy = (w * dx * (y[None, :] - my[:, None])).sum(axis=1)
    slope = np.where(sxx > 1e-12, sxy / np.where(sxx > 1e-12, sxx, 1.0), 0.0)
    return grid, my + slope * (grid - mx)


@dataclass
class _Smoothed:
    params: Optional[float]
    grid: np.ndarray
    values: np.ndarray

    def at(self, x: np.ndarray) -> np.ndarray:
        out = np.interp(x, self.grid, self.values)
        out[~(x >= self.grid[0]) | ~(x <= self.grid[-1])] = np.nan
        return out


class Ladder:
    """Predicts a target run's (task, metric) curves from a ladder of reference runs.

    `align` is one of ALIGN_CHOICES; `target_total_tokens` (the run's planned tokens) is what
    `fraction` alignment needs. Construction raises LadderError for a ladder it cannot align.
    """

    def __init__(
        self,
        runs: Sequence[ReferenceRun],
        *,
        align: str = "auto",
        target_total_tokens: Optional[float] = None,
    ):
        if not runs:
            raise LadderError("the reference ladder holds no run")
        if align not in ALIGN_CHOICES:
            raise LadderError(
                f"reference alignment {align!r} must be one of {', '.join(ALIGN_CHOICES)}"
            )
        self.runs = list(runs)
        self.target_total_tokens = float(target_total_tokens) if target_total_tokens else None
        feasible = self.feasible_alignments()
        if align == "auto":
            if not feasible:
                raise LadderError(self._unalignable("any alignment"))
            align = self._choose_alignment(feasible)
        elif align not in feasible:
            raise LadderError(self._unalignable(f"alignment `{align}`"))
        self.align = align
        self._cache: Dict[Key, List[_Smoothed]] = {}

    def for_run(self, name: str, total_tokens: Optional[float]) -> "Ladder":
        """This ladder for judging run `name` of planned length `total_tokens`: without that
        run itself (a table judged against a ladder cut from it), alignment kept."""
        if name in self.names and len(self.runs) > 1:
            out = Ladder(
                [r for r in self.runs if r.name != name],
                align=self.align,
                target_total_tokens=total_tokens or self.target_total_tokens,
            )
            return out
        out = copy.copy(self)  # shares the smoothed references: they do not depend on the target
        out.target_total_tokens = float(total_tokens) if total_tokens else self.target_total_tokens
        return out

    # -- what the ladder holds ------------------------------------------------------------
    @property
    def names(self) -> List[str]:
        return [r.name for r in self.runs]

    def keys(self) -> set:
        return {k for r in self.runs for k in r.curves}

    def describe(self) -> str:
        by_size = sorted(self.runs, key=lambda r: (r.params or 0.0, r.name))
        names = ", ".join(r.name.rsplit("/", 1)[-1] for r in by_size)
        return f"ladder {names} (aligned on {self.align})"

    def feasible_alignments(self) -> List[str]:
        out = ["steps"]
        if all(r.has_tokens for r in self.runs):
            out.append("tokens")
            if self.target_total_tokens:
                out.append("fraction")
            if all(r.params for r in self.runs):
                out.append("compute")
        return out

    def _unalignable(self, what: str) -> str:
        missing = []
        if not all(r.has_tokens for r in self.runs):
            missing.append(
                "tokens in every reference run (runs without: "
                + ", ".join(r.name for r in self.runs if not r.has_tokens)
                + ")"
            )
        if not self.target_total_tokens:
            missing.append("this run's planned training tokens (alerts.reference.total_tokens)")
        if not all(r.params for r in self.runs):
            missing.append("the parameter count of every reference run (its `params` column)")
        return f"cannot align the reference runs with {what}: needs " + "; ".join(
            missing or ["steps"]
        )

    # -- prediction -------------------------------------------------------------------------
    def _smoothed(self, key: Key, align: Optional[str] = None, runs=None) -> List[_Smoothed]:
        align = align or self.align
        use_cache = runs is None and align == self.align
        if use_cache and key in self._cache:
            return self._cache[key]
        out = []
        for r in runs if runs is not None else self.runs:
            c = r.curves.get(key)
            if c is None or len(c) < 2:
                continue
            x = coordinate(align, c.steps, c.tokens, r.params, r.total_tokens)
            grid, ys = smooth_on_grid(x, c.values.astype(float))
            if grid.size >= 2:
                out.append(_Smoothed(r.params, grid, ys))
        if use_cache:
            self._cache[key] = out
        return out

    def predict(
        self,
        task: str,
        metric: str,
        *,
        steps,
        tokens,
        params: Optional[float] = None,
        total_tokens: Optional[float] = None,
    ) -> np.ndarray:
        """The ladder's value of (task, metric) at the target's points; NaN where not covered."""
        total = total_tokens if total_tokens else self.target_total_tokens
        x = coordinate(self.align, steps, tokens, params, total)
        return _across_sizes(self._smoothed((task, metric)), x, params)

    # -- choosing the alignment -------------------------------------------------------------
    def _choose_alignment(self, feasible: List[str]) -> str:
        if len(self.runs) < 2 or len(feasible) == 1:
            return "tokens" if "tokens" in feasible else feasible[0]
        keys = sorted(k for k in self.keys() if sum(k in r.curves for r in self.runs) >= 2)
        if len(keys) > AUTO_MAX_CURVES:
            keys = [keys[i] for i in np.linspace(0, len(keys) - 1, AUTO_MAX_CURVES).astype(int)]
        scores = {a: self.loso_error(keys, a) for a in feasible}
        finite = {a: s for a, s in scores.items() if math.isfinite(s)}
        if not finite:
            return "tokens" if "tokens" in feasible else feasible[0]
        return min(finite, key=lambda a: (finite[a], ALIGNMENTS.index(a)))

    def loso_error(self, keys: Sequence[Key], align: Optional[str] = None) -> float:
        """Median level-calibrated error of predicting each run from the others, relative to
        each curve's range (leave one run out)."""
        align = align or self.align
        errs = []
        for key in keys:
            for i, held in enumerate(self.runs):
                c = held.curves.get(key)
                if c is None or len(c) < 6:
                    continue
                others = [r for j, r in enumerate(self.runs) if j != i]
                sm = self._smoothed(key, align, others)
                if not sm:
                    continue
                x = coordinate(align, c.steps, c.tokens, held.params, held.total_tokens)
                pred = _across_sizes(sm, x, held.params)
                e = _level_calibrated_errors(c.values.astype(float), pred)
                if e is not None:
                    span = (
                        float(np.nanpercentile(c.values, 95) - np.nanpercentile(c.values, 5)) or 1.0
                    )
                    errs.append(float(np.median(e)) / span)
        return float(np.mean(errs)) if errs else math.inf


def _level_calibrated_errors(y: np.ndarray, pred: np.ndarray) -> Optional[np.ndarray]:
    ok = np.flatnonzero(np.isfinite(pred) & np.isfinite(y))
    if ok.size < 6:
        return None
    n_cal = max(2, int(LOSO_CALIB_FRACTION * ok.size))
    offset = float(np.median(y[ok[:n_cal]] - pred[ok[:n_cal]]))
    rest = ok[n_cal:]
    return np.abs(y[rest] - pred[rest] - offset)


def _across_sizes(smoothed: List[_Smoothed], x: np.ndarray, params: Optional[float]) -> np.ndarray:
    """Per coordinate: a line in log(params) through the references there, read at `params`;
    their mean where sizes are unknown or all alike."""
    if not smoothed:
        return np.full(np.shape(x), np.nan)
    vals = np.stack([s.at(np.asarray(x, dtype=float)) for s in smoothed])  # (refs, points)
    have = np.isfinite(vals)
    n = have.sum(axis=0)
    mean = np.where(n > 0, np.where(have, vals, 0.0).sum(axis=0) / np.maximum(n, 1), np.nan)
    sizes = [s.params for s in smoothed]
    if not params or any(not p for p in sizes) or len(set(sizes)) < 2:
        return mean
    logn = np.log(np.asarray(sizes, dtype=float))[:, None] * np.ones_like(vals)
    logn = np.where(have, logn, 0.0)
    mx = np.where(n > 0, logn.sum(axis=0) / np.maximum(n, 1), 0.0)
    dx = np.where(have, logn - mx, 0.0)
    dy = np.where(have, vals - mean, 0.0)
    sxx = (dx * dx).sum(axis=0)
    slope = np.where(sxx > 1e-9, (dx * dy).sum(axis=0) / np.where(sxx > 1e-9, sxx, 1.0), 0.0)
    return mean + slope * (math.log(params) - mx)


def configured_reference(alerts_cfg: Any) -> Tuple[List[str], List[str], str, float]:
    """(files, runs, align, total_tokens) from `alerts.reference`, or from the older single-run
    fields (`reference_csv`, `reference_model`, `reference_align`, `reference_total_tokens`)."""
    ref = alerts_cfg.reference
    if ref.files:
        return list(ref.files), list(ref.runs), ref.align, float(ref.total_tokens)
    if alerts_cfg.reference_csv:
        runs = [alerts_cfg.reference_model] if alerts_cfg.reference_model else list(ref.runs)
        total = float(ref.total_tokens or alerts_cfg.reference_total_tokens)
        return [alerts_cfg.reference_csv], runs, alerts_cfg.reference_align, total
    return [], [], ref.align, float(ref.total_tokens)


def ladder_from_config(
    alerts_cfg: Any,
    *,
    run_params: Optional[float] = None,
    files: Sequence[str] = (),
    runs: Sequence[str] = (),
    total_tokens_known: bool = False,
    tables: Optional[Dict[str, Any]] = None,
) -> Tuple[Optional[Ladder], List[str]]:
    """The reference ladder the config (or `files`/`runs`, given on the command line) names.

    Returns (ladder or None, notes). A file that cannot be read or a run that is not in it
    raises LadderError (the user's to fix before the run starts). A ladder that cannot be
    used as configured gives None and a note saying what is missing and what was expected:
    the run is then judged by its own-run detector only. `total_tokens_known`: each judged
    run's planned tokens will be given later (`Ladder.for_run`; `analyze` takes them from the
    table), so schedule-fraction alignment is open without `total_tokens`."""
    cfg_files, cfg_runs, align, total = configured_reference(alerts_cfg)
    files = list(files) or cfg_files
    runs = list(runs) or cfg_runs
    if not files:
        return None, []
    members = read_reference_runs(files, runs, tables)
    fallback = "; judging with the own-run detector only"
    sizes = sorted({r.params for r in members if r.params})
    if len(members) >= 2 and len(sizes) < 2:
        have = ", ".join(f"{r.name.rsplit('/', 1)[-1]} ({_params_text(r.params)})" for r in members)
        return None, [
            f"the reference ladder needs runs of at least two sizes for its fit across sizes; it has "
            f"{len(sizes)} ({have}): give each run's parameter count (the `params` column) or keep one "
            f"reference run" + fallback
        ]
    try:
        ladder = Ladder(
            members, align=align, target_total_tokens=total or (1.0 if total_tokens_known else None)
        )
    except LadderError as e:
        return None, [f"{e}" + fallback]
    notes = []
    if len(sizes) >= 2 and not run_params:
        notes.append(
            f"this run's parameter count is unknown (set alerts.reference.params): {ladder.describe()} "
            f"gives the mean of its runs, not a fit across sizes"
        )
    return ladder, notes


def _params_text(p: Optional[float]) -> str:
    return "size unknown" if not p else f"{p / 1e6:.0f}M parameters"


__all__ = [
    "ALIGNMENTS",
    "ALIGN_CHOICES",
    "Ladder",
    "LadderError",
    "ReferenceRun",
    "coordinate",
    "configured_reference",
    "ladder_from_config",
    "read_reference_runs",
    "runs_from_curves",
    "smooth_on_grid",
]
