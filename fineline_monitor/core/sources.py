"""Expectation sources: where a curve's expected value and band come from.

A source is one small class with one interface. Given a block of points (one point per
curve and round: value, known sampling variance, and the curve's trailing window), it
returns a `Verdict` per point: expected value, band, z, whether the point is bad, and
where it has a verdict at all. The engine (`core/alerts.py`) asks every source in
registration order; `core/rules.py` turns the combined verdicts into alerts.

- `sustained`: the source's "bad" already spans several rounds (the own-run frozen fit
  judges the `lags` newest points together), so it counts at once. A single-point
  source's bad points count after `hysteresis` consecutive bad rounds of a curve.
- `takes_over`: whose expected value and band are shown (alerts, dashboards):
  "always" (wherever the source has a verdict), "where_missing" (where no earlier source
  has an expected value), or "never" (it may only confirm a fault).
- `per_round`: the source keeps state that changes round by round (a calibration, the
  anchor documents), so the engine calls it once per round, in order; otherwise once for
  the whole block (a live round is a block of one round; `analyze` passes a whole run).

Built-in sources, in the order they are asked:
1. `OwnRunSource` ("own"): the curve's own trend, frozen 1..K rounds before the newest
   points (`expectations.lagged_detect`).
2. `PairedDocumentsSource` ("paired"): mean gold log-probability of the same documents,
   compared with the last round that was not bad (a fixed document set makes
   round-to-round changes far less noisy than two independent means).
3. `ReferenceRunSource` ("reference"): a reference run (a pilot or smaller model)
   interpolated at this run's tokens, calibrated on this run's first points after take-off.
Sibling tasks of a capability are no source of their own: `rules.classify` reads them
from the combined verdicts of a round.

Adding a source: subclass `ExpectationSource`, decorate it with `@register_source`;
docs/alerts-engine.md walks through the reference-run source as the example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Type

import numpy as np

from fineline_monitor.core.config import DetectorParams
from fineline_monitor.core.expectations import LOSS, ReferenceCurves, lagged_detect


@dataclass
class SourceContext:
    """What a source is built from."""

    cfg: Any  # the AlertConfig
    params: DetectorParams
    references: List[ReferenceCurves] = field(
        default_factory=list
    )  # a single reference run's curves
    ladder: Any = None  # a `core.ladder.Ladder` of reference runs (the `ladder` source)
    run_params: Optional[float] = None  # this run's parameter count, for the fit across sizes
    notes: List[str] = field(default_factory=list)  # what a source says once (the engine logs it)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    @property
    def band_sigma(self) -> float:
        return float(self.cfg.band_sigma)

    @property
    def hysteresis(self) -> int:
        return int(self.cfg.hysteresis)


@dataclass
class PointBlock:
    """Points to judge, one per (curve, round), arrays aligned. A per-round source gets
    the points of one round. `curves` are the engine's `CurveState`s of the points."""

    curves: Sequence[Any]
    y: np.ndarray  # observed values
    var: np.ndarray  # known sampling variance (nan: unknown)
    kind: np.ndarray  # ACC / LOSS / NEG, -1 for no direction
    taken: np.ndarray  # an accuracy curve has taken off (others: always)
    eligible: np.ndarray  # judged: taken, a known direction, finite, outside warmup
    windows: Optional[Dict[str, np.ndarray]] = None  # X, G, V, U, floor for the eligible points
    step: Optional[int] = None  # per-round blocks: the round's step, tokens, phase and documents
    tokens: Optional[float] = None
    phase: str = ""
    paired: Optional[Dict[str, Dict[Any, float]]] = None

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Verdict:
    """Per point: expected value and band (value units), z (standardised deviation,
    negative on the bad side), whether it is bad, and where the source has a verdict.
    The own-run source also fills the fields `rules.classify` reads."""

    expected: np.ndarray
    low: np.ndarray
    high: np.ndarray
    z: np.ndarray
    bad: np.ndarray
    has: np.ndarray
    lag: Optional[np.ndarray] = None  # rounds the deciding fit was frozen before the point
    noise: Optional[np.ndarray] = None
    gain: Optional[np.ndarray] = None  # expected improvement since the fit's last point
    level_last: Optional[np.ndarray] = None  # the fit at its last point (good-direction units)

    @classmethod
    def empty(cls, n: int) -> "Verdict":
        nan = np.full(n, np.nan)
        return cls(
            expected=nan.copy(),
            low=nan.copy(),
            high=nan.copy(),
            z=nan.copy(),
            bad=np.zeros(n, dtype=bool),
            has=np.zeros(n, dtype=bool),
        )

    def subset(self, idx: np.ndarray) -> "Verdict":
        return Verdict(**{k: (None if v is None else v[idx]) for k, v in self.__dict__.items()})


class ExpectationSource:
    """One source of expected values. Subclass, set the class attributes, implement
    `build` and `evaluate`; register with `@register_source`."""

    name: str = ""
    sustained: bool = False
    takes_over: str = "never"  # "always" | "where_missing" | "never"
    per_round: bool = True
    gives_series: bool = False  # `series` gives a value per point, kept in the curve's window

    @classmethod
    def build(cls, ctx: SourceContext) -> Optional["ExpectationSource"]:
        """The source for one run, or None where it has nothing to say (no reference run)."""
        raise NotImplementedError

    def active(self, block: PointBlock) -> bool:
        """Whether `evaluate` has anything to do on this (per-round) block."""
        return True

    def evaluate(self, block: PointBlock, so_far: Verdict, open_: np.ndarray) -> Verdict:
        """Verdicts on the block's points. `so_far` is what earlier sources said; `open_`
        where no earlier single-point source has taken the point over."""
        raise NotImplementedError

    def commit(self, block: PointBlock, bad: np.ndarray) -> None:
        """Learn from the round once the engine has decided which points are bad."""

    def describe(self, verdict: Verdict, i: int) -> str:
        """Where point i's expected value comes from, for the alert message."""
        return self.name

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        pass


SOURCES: Dict[str, Type[ExpectationSource]] = {}


def register_source(cls: Type[ExpectationSource]) -> Type[ExpectationSource]:
    """Class decorator: the engine asks registered sources in registration order."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name`")
    if cls.takes_over not in ("always", "where_missing", "never"):
        raise ValueError(f"{cls.__name__}.takes_over must be always, where_missing or never")
    SOURCES[cls.name] = cls
    return cls


def build_sources(ctx: SourceContext) -> List[ExpectationSource]:
    return [s for s in (cls.build(ctx) for cls in SOURCES.values()) if s is not None]


def frozen_fit_decision(
    ctx: SourceContext, z: np.ndarray, zpt: np.ndarray, band_sigma: float
) -> "tuple[np.ndarray, np.ndarray]":
    """Which points a frozen-fit detection (`lagged_detect`, (N, lags) z and zpt) finds bad,
    and the lag index each verdict is read at. Bad: for some lag k >= hysteresis the mean of
    the k newest points is band_sigma low and every one of them at least `point_z` low; the
    deciding lag is the most alarming such k; when nothing fired, the most frozen fit's view."""
    K = ctx.params.lags
    with np.errstate(invalid="ignore"):
        cond = (z < -band_sigma) & (zpt < -ctx.params.point_z)
    cond[:, : min(max(ctx.hysteresis, 1), K) - 1] = False
    bad = cond.any(1)
    kuse = np.where(bad, np.argmin(np.where(cond, z, np.inf), axis=1), K - 1)
    return bad, kuse


# ---- the own run's frozen fit ------------------------------------------------------------
@register_source
class OwnRunSource(ExpectationSource):
    """The curve's own trend, frozen before the newest points (`lagged_detect`). Bad: for
    some lag k >= hysteresis, the mean of the k newest points is more than band_sigma
    below the frozen fit and every one of them is below it by at least `point_z` sigma."""

    name = "own"
    sustained = True
    takes_over = "always"
    per_round = False

    def __init__(self, ctx: SourceContext):
        self.ctx = ctx

    @classmethod
    def build(cls, ctx: SourceContext) -> "OwnRunSource":
        return cls(ctx)

    def evaluate(self, block: PointBlock, so_far: Verdict, open_: np.ndarray) -> Verdict:
        p = self.ctx.params
        n, K = len(block), p.lags
        det = {f: np.full((n, K), np.nan) for f in ("z", "zpt", "pred_k", "sig_k")}
        det.update({f: np.full(n, np.nan) for f in ("expected", "level_last", "noise")})
        jr = np.flatnonzero(block.eligible)
        if jr.size:
            w = block.windows
            d = lagged_detect(w["X"], w["G"], w["V"], w["U"], w["floor"], p)
            for f in det:
                det[f][jr] = getattr(d, f)
        return self._decide(det, block.kind)

    def _decide(self, det: Dict[str, np.ndarray], kind: np.ndarray) -> Verdict:
        band_sigma = self.ctx.band_sigma
        z = det["z"]
        bad, kuse = frozen_fit_decision(self.ctx, z, det["zpt"], band_sigma)
        r = np.arange(z.shape[0])
        sgn = np.where(kind == LOSS, -1.0, 1.0)
        pg, sg = det["pred_k"][r, kuse], det["sig_k"][r, kuse]
        lo, hi = sgn * (pg - band_sigma * sg), sgn * (pg + band_sigma * sg)
        expected = sgn * pg
        return Verdict(
            expected=expected,
            low=np.fmin(lo, hi),
            high=np.fmax(lo, hi),
            z=z[r, kuse],
            bad=bad,
            has=np.isfinite(expected),
            lag=kuse + 1,
            noise=det["noise"],
            gain=det["expected"] - det["level_last"],
            level_last=det["level_last"],
        )

    def describe(self, verdict: Verdict, i: int) -> str:
        return f"own-run trend frozen {int(verdict.lag[i])} rounds ago"


# ---- paired per-document log-probabilities -------------------------------------------------
GOLD_LOGPROB = "gold_logprob"


@register_source
class PairedDocumentsSource(ExpectationSource):
    """Mean gold log-probability of the documents scored in this round and in the anchor
    round (the last round the curve was not bad): their paired change has a far smaller
    standard error than the change of two independent means. Expected: the anchor's level
    on this round's scale (no growth assumed: a paired change below zero by band_sigma
    sigma is a loss of what the documents knew)."""

    name = "paired"
    takes_over = "always"

    def __init__(self, ctx: SourceContext):
        self.ctx = ctx
        self.anchors: Dict[str, Dict[str, float]] = {}  # task -> doc_id (str) -> gold logprob

    @classmethod
    def build(cls, ctx: SourceContext) -> "PairedDocumentsSource":
        return cls(ctx)

    def active(self, block: PointBlock) -> bool:
        return bool(block.paired)

    def evaluate(self, block: PointBlock, so_far: Verdict, open_: np.ndarray) -> Verdict:
        out = Verdict.empty(len(block))
        k = self.ctx.band_sigma
        for i, c in enumerate(block.curves):
            if c.metric != GOLD_LOGPROB or not block.eligible[i] or not open_[i]:
                continue
            cur, anc = block.paired.get(c.task), self.anchors.get(c.task)
            if not cur or not anc:
                continue
            common = [d for d in cur if str(d) in anc]
            if len(common) < self.ctx.params.paired_min_docs:
                continue
            dif = np.array([cur[d] - anc[str(d)] for d in common])
            se = float(dif.std(ddof=1) / math.sqrt(len(dif)))
            change = float(np.mean([cur[d] for d in common])) - float(
                np.mean([anc[str(d)] for d in common])
            )
            noise = (
                so_far.noise[i]
                if so_far.noise is not None and math.isfinite(so_far.noise[i])
                else 0.0
            )
            sp = math.sqrt(se * se + (0.25 * noise) ** 2) or 1e-9
            e = block.y[i] - change
            zz = (block.y[i] - e) / sp
            out.has[i], out.bad[i] = True, zz < -k
            out.expected[i], out.low[i], out.high[i], out.z[i] = e, e - k * sp, e + k * sp, zz
        return out

    def commit(self, block: PointBlock, bad: np.ndarray) -> None:
        if not block.paired:
            return
        for i, c in enumerate(block.curves):
            if c.metric == GOLD_LOGPROB and not bad[i] and c.task in block.paired:
                self.anchors[c.task] = {str(d): float(v) for d, v in block.paired[c.task].items()}

    def describe(self, verdict: Verdict, i: int) -> str:
        return "paired per-document change"

    def state_dict(self) -> Dict[str, Any]:
        return {"anchors": self.anchors}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.anchors = {t: dict(d) for t, d in sd.get("anchors", {}).items()}


# ---- a reference run -----------------------------------------------------------------------
@dataclass
class ReferenceCalibration:
    """A reference run's fit to one curve of this run."""

    residuals: List[float] = field(
        default_factory=list
    )  # this run minus the reference, while calibrating
    offset: Optional[float] = None  # median residual, once calibrated
    scatter: Optional[float] = None  # robust scatter of the residuals (at least the sampling sigma)
    reference_at_calibration: Optional[float] = None  # the reference value when calibration ended


@register_source
class ReferenceRunSource(ExpectationSource):
    """A reference run interpolated at this run's tokens, calibrated on this run's first
    `reference_calibration_points` points after take-off (median offset and the scatter
    around it), then frozen; its sigma grows with how far the reference has moved since
    (10% of that distance). It is the expectation while the own fit has none; after that
    it only confirms: a point the own fit leaves in band is bad when the reference puts it
    band_sigma low and the own fit agrees on the direction (z < -1)."""

    name = "reference"
    takes_over = "where_missing"

    def __init__(self, ctx: SourceContext, reference: ReferenceCurves):
        self.ctx = ctx
        self.reference = reference
        self.calibration: Dict[str, ReferenceCalibration] = {}  # curve key -> calibration

    @classmethod
    def build(cls, ctx: SourceContext) -> Optional["ReferenceRunSource"]:
        return cls(ctx, ctx.references[0]) if ctx.references else None

    def active(self, block: PointBlock) -> bool:
        return block.tokens is not None

    def evaluate(self, block: PointBlock, so_far: Verdict, open_: np.ndarray) -> Verdict:
        out = Verdict.empty(len(block))
        for i, c in enumerate(block.curves):
            if block.kind[i] < 0 or not math.isfinite(block.y[i]) or c.task is None or not open_[i]:
                continue
            rv = self.reference.value(c.task, c.metric, float(block.tokens))
            if rv is None:
                continue
            cal = self.calibration.setdefault(c.key, ReferenceCalibration())
            if cal.offset is None:
                if block.taken[i] and block.phase != "warmup":
                    self._calibrate(cal, block.y[i] - rv, block.var[i], rv)
                continue
            if block.eligible[i]:
                self._judge(out, i, rv, cal, block, so_far)
        return out

    def _calibrate(self, cal: ReferenceCalibration, residual: float, var: float, rv: float) -> None:
        cal.residuals.append(float(residual))
        n = self.ctx.params.reference_calibration_points
        if len(cal.residuals) >= n:
            c = np.array(cal.residuals)
            cal.offset = float(np.median(c))
            mad = float(np.median(np.abs(c - np.median(c)))) * 1.4826
            noise = math.sqrt(var) if math.isfinite(var) else 0.0
            cal.scatter = max(mad, noise, 1e-3 * max(abs(rv), 1e-3))
            cal.reference_at_calibration = rv

    def _judge(
        self,
        out: Verdict,
        i: int,
        rv: float,
        cal: ReferenceCalibration,
        block: PointBlock,
        so_far: Verdict,
    ) -> None:
        k, n = self.ctx.band_sigma, self.ctx.params.reference_calibration_points
        ref_cal = rv if cal.reference_at_calibration is None else cal.reference_at_calibration
        drift = 0.1 * abs(rv - ref_cal)
        var = block.var[i]
        s = math.sqrt(
            cal.scatter**2 * (1 + 1 / n) + drift**2 + (var if math.isfinite(var) else 0.0)
        )
        e = rv + cal.offset
        sg = 1.0 if block.kind[i] != LOSS else -1.0
        zz = sg * (block.y[i] - e) / s
        out.expected[i], out.low[i], out.high[i], out.z[i] = e, e - k * s, e + k * s, zz
        if not np.isfinite(so_far.expected[i]):
            out.has[i], out.bad[i] = True, zz < -k
        elif zz < -k and so_far.z[i] < -1.0:
            out.has[i], out.bad[i] = True, True

    def describe(self, verdict: Verdict, i: int) -> str:
        return f"reference run {self.reference.name}"

    def state_dict(self) -> Dict[str, Any]:
        return {"calibration": {k: c.__dict__ for k, c in self.calibration.items()}}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.calibration = {
            k: ReferenceCalibration(**c) for k, c in sd.get("calibration", {}).items()
        }


# ---- a ladder of reference runs ------------------------------------------------------------
@register_source
class LadderSource(ExpectationSource):
    """The reference ladder's prediction (`core/ladder.py`) carries the trend: the own-run
    detector (`lagged_detect`: frozen fits, lags 1..K) runs on the curve's residual from the
    ladder instead of on the curve. Bad: for some lag k >= hysteresis, the k newest residuals
    are `ladder_band_sigma` below the residual's frozen fit (every one at least `point_z`
    low), and the own-run fit of the curve itself puts the point at least `ladder_confirm_z`
    sigma low. A stall (the curve stops while the ladder still climbs) or a drift away from
    the ladder's growth leaves the residual; the own-run trend alone cannot say how much
    growth to expect. Expected value: the ladder at this point plus the residual's frozen fit,
    i.e. the run's own level moved on by the ladder's growth."""

    name = "ladder"
    sustained = True
    takes_over = "always"
    per_round = False
    gives_series = True

    def __init__(self, ctx: SourceContext):
        self.ctx = ctx
        self.ladder = ctx.ladder
        self.covered: Optional[bool] = None  # whether any judged curve is in the ladder (said once)

    @classmethod
    def build(cls, ctx: SourceContext) -> Optional["LadderSource"]:
        return cls(ctx) if ctx.ladder is not None else None

    def series(
        self, curves: Sequence[Any], pc: np.ndarray, steps: np.ndarray, tokens: np.ndarray
    ) -> np.ndarray:
        out = np.full(len(curves), np.nan)
        keys = self.ladder.keys()
        for c in np.unique(pc):
            sel = np.flatnonzero(pc == c)
            cs = curves[sel[0]]
            if cs.task is None or (cs.task, cs.metric) not in keys:
                continue
            out[sel] = self.ladder.predict(
                cs.task, cs.metric, steps=steps[sel], tokens=tokens[sel], params=self.ctx.run_params
            )
        if self.covered is None and len(curves):
            self.covered = bool(np.isfinite(out).any())
            if not self.covered:
                shared = sorted({f"{c.task}/{c.metric}" for c in curves if c.task})[:5]
                self.ctx.note(
                    f"the reference {self.ladder.describe()} shares no task and metric with this run "
                    f"(this run has {', '.join(shared)}...; the ladder has "
                    f"{', '.join(sorted(f'{t}/{m}' for t, m in keys)[:5])}...): judging with the "
                    f"own-run detector only"
                )
        return out

    def evaluate(self, block: PointBlock, so_far: Verdict, open_: np.ndarray) -> Verdict:
        p, n = self.ctx.params, len(block)
        w = block.windows
        # only the points where the ladder has a prediction (windows are of the eligible points)
        covered = np.isfinite(w["R"][:, -1]) if len(w["R"]) else np.zeros(0, dtype=bool)
        jr = np.flatnonzero(block.eligible)[covered]
        out = Verdict.empty(n)
        if not jr.size:
            return out
        w = {k: v[covered] for k, v in w.items()}
        ref = w["R"]  # the ladder at the window's points, good-direction units
        d = lagged_detect(w["X"], w["G"] - ref, w["V"], w["U"] & np.isfinite(ref), w["floor"], p)
        band = p.ladder_band_sigma
        bad, kuse = frozen_fit_decision(self.ctx, d.z, d.zpt, band)
        r = np.arange(jr.size)
        sgn = np.where(block.kind[jr] == LOSS, -1.0, 1.0)
        pg = d.pred_k[r, kuse] + ref[:, -1]
        sg = d.sig_k[r, kuse]
        lo, hi = sgn * (pg - band * sg), sgn * (pg + band * sg)
        has = np.isfinite(pg) & np.isfinite(sg)
        if p.ladder_confirm_z > 0 and so_far.z is not None:
            with np.errstate(invalid="ignore"):
                bad &= so_far.z[jr] < -p.ladder_confirm_z
        out.expected[jr], out.low[jr], out.high[jr] = sgn * pg, np.fmin(lo, hi), np.fmax(lo, hi)
        out.z[jr], out.bad[jr], out.has[jr] = d.z[r, kuse], bad & has, has
        out.lag = np.ones(n, dtype=np.int64)
        out.lag[jr] = kuse + 1
        # what `rules.classify` reads (good-direction units): the level when the fit was
        # frozen and the growth expected since, the ladder's included
        ref_then = ref[r, ref.shape[1] - 2 - kuse]
        out.level_last, out.gain, out.noise = (
            np.full(n, np.nan),
            np.full(n, np.nan),
            np.full(n, np.nan),
        )
        out.level_last[jr] = d.level_last + ref_then
        out.gain[jr] = (d.expected - d.level_last) + (ref[:, -1] - ref_then)
        out.noise[jr] = d.noise
        return out

    def describe(self, verdict: Verdict, i: int) -> str:
        return self.ladder.describe()


__all__ = [
    "ExpectationSource",
    "SourceContext",
    "PointBlock",
    "Verdict",
    "register_source",
    "SOURCES",
    "build_sources",
    "OwnRunSource",
    "PairedDocumentsSource",
    "ReferenceRunSource",
    "LadderSource",
]
