"""Expected trajectories with bands, for many curves at once.

Three sources of expectation (DESIGN.md "Phases, expectations, alerts"):

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


def chance_for(task: str) -> Optional[float]:
    t = task.lower()
    for pat, c in _CHANCE:
        if re.search(pat, t):
            return c
    return None


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
        if align not in ("tokens", "fraction"):
            raise ValueError(f"reference alignment {align!r} must be `tokens` or `fraction`")
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
            raise ValueError("reference alignment `fraction` needs `alerts.total_tokens` (this run's planned tokens)")
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


__all__ = ["ACC", "LOSS", "NEG", "metric_kind", "chance_for", "capability_for", "fit_predict", "Prediction",
           "ReferenceCurves", "base_task"]
