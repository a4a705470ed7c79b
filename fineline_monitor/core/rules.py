"""Alert rules: how verdicts become firing decisions, in one place.

- `RuleBook` holds one `RuleState` per condition (rule + curve or key): consecutive true
  rounds, the round it last fired, whether it is active, at which severity. It applies
  hysteresis, cooldown and de-duplication (a condition that stays true fires once, except
  to escalate warning -> critical) for every rule, capability or per-step.
- `single_point_hysteresis`: verdicts of single-point expectation sources (reference run,
  paired documents) count only after `hysteresis` consecutive bad rounds of a curve; the
  own-run frozen fit needs no such count (its lags already span several rounds).
- `classify` names a capability verdict: a stall, a sibling divergence (one task of a
  capability out of band while its other tasks are not), or a regression (critical when
  deep and capability-wide).
- `StepRules` and `probe_extra_rules` return `Finding`s (rule, severity, metric, observed,
  expected, band, what to look at first) for per-step indicators and probe-round
  stability; `alerts.py` passes them through the same `RuleBook`.

Per-step rules are built for short noisy runs as well as long ones: every statistic is
robust (medians, MAD of first differences) and a rule is only armed after `min_points`
collections, so the first steps of a tiny CPU demo do not page anyone.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Deque, Dict, List, Optional, Tuple

import numpy as np

from fineline_monitor import metric_names as names
from fineline_monitor.core.history import ScalarWindow

RULES = {
    "capability_regression": "a capability curve fell below its expected band (several tasks of the capability)",
    "capability_stall": "a curve stopped improving while its expected trajectory still grows",
    "sibling_divergence": "one task fell out of its band while the other tasks of its capability did not",
    "loss_spike": "training loss jumped far above its recent level (robust z-score)",
    "loss_divergence": "training loss stayed far above its recent level for several collections",
    "grad_norm_spike": "gradient norm jumped above a multiple of its rolling median",
    "nonfinite": "NaN/inf loss or gradients",
    "attention_logit_growth": "max attention logit above 1e3 (warning) / 1e4 (critical)",
    "output_logit_divergence": "output log-partition drifting far from 0",
    "grad_rms_near_eps": "gradient RMS of a parameter group close to Adam epsilon",
    "update_ratio": "update/parameter ratio out of range or jumped",
}


@dataclass
class Finding:
    rule: str
    severity: str
    metric: Optional[str]
    observed: Optional[float]
    expected: Optional[float]
    band: Optional[List[float]]
    detail: str  # what happened and what to look at first
    key: str = ""  # de-duplication key within the rule (e.g. the metric or group)


SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
NEVER = -(10**9)  # the round a condition that never fired last fired


@dataclass
class RuleState:
    """Firing state of one condition."""

    consecutive: int = 0  # rounds in a row the condition has been true
    last_fired_round: int = NEVER
    active: bool = False  # fired and still true (de-duplication)
    severity: str = ""  # severity it last fired at


class RuleBook:
    """Hysteresis, cooldown and de-duplication state, keyed by condition."""

    def __init__(self) -> None:
        self.states: Dict[str, RuleState] = {}

    def update(
        self, key: str, true: bool, round_no: int, *, hysteresis: int, cooldown: int, severity: str
    ) -> bool:
        """Record this round's truth of a condition; True when it fires now."""
        st = self.states.get(key)
        if st is None:
            if not true:
                return False
            st = self.states[key] = RuleState()
        if not true:
            st.consecutive = 0
            st.active = False
            return False
        st.consecutive += 1
        if st.consecutive < hysteresis:
            return False
        escalate = st.active and SEVERITY_RANK[severity] > SEVERITY_RANK.get(st.severity, -1)
        if st.active and not escalate:
            return False
        if not escalate and round_no - st.last_fired_round < cooldown:
            return False
        st.last_fired_round, st.active, st.severity = round_no, True, severity
        return True

    def consecutive(self, key: str) -> int:
        st = self.states.get(key)
        return st.consecutive if st else 0

    def settled(self, key: str) -> bool:
        """Neither counting nor active: nothing left to clear."""
        st = self.states.get(key)
        return st is None or (not st.consecutive and not st.active)

    def keys_with_prefix(self, prefix: str) -> List[str]:
        return [k for k in self.states if k.startswith(prefix)]

    def state_dict(self) -> Dict[str, Any]:
        # bounded: only conditions that are active, counting, or inside their cooldown matter
        return {
            k: asdict(v)
            for k, v in self.states.items()
            if v.consecutive or v.active or v.last_fired_round > NEVER
        }

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Loads both formats: named fields, or the list [consecutive, last_fired_round,
        active, severity] of state version 2."""
        self.states = {
            k: RuleState(**v)
            if isinstance(v, dict)
            else RuleState(int(v[0]), int(v[1]), bool(v[2]), str(v[3]))
            for k, v in sd.items()
        }


def single_point_hysteresis(
    runs: np.ndarray,
    judged: np.ndarray,
    point_bad: np.ndarray,
    eligible: np.ndarray,
    hysteresis: int,
) -> Tuple[np.ndarray, np.ndarray]:
    """Consecutive bad single-point verdicts per curve. `runs` is each curve's count so
    far, `judged` where a single-point source gave a verdict this round, `point_bad` where
    it was bad. A curve without a verdict this round starts counting again. Returns the
    new counts and where they reached `hysteresis` (on eligible points): bad."""
    runs = runs.copy()
    bad = np.zeros(runs.shape, dtype=bool)
    for i in np.flatnonzero(judged | (runs > 0)):
        runs[i] = runs[i] + 1 if point_bad[i] else 0
        if runs[i] >= hysteresis and eligible[i]:
            bad[i] = True
    return runs, bad


@dataclass
class Judgement:
    """What a bad capability verdict is called."""

    rule: str
    severity: str


def classify(
    *,
    observed_good: float,
    noise: float,
    gain: float,
    level_last: float,
    z: float,
    band_sigma: float,
    n_siblings: int,
    n_siblings_bad: int,
    capability_wide: bool,
) -> Judgement:
    """Name a bad verdict on one curve. `observed_good`, `gain` and `level_last` are in
    good-direction units (higher is better): a stall is a curve holding the level its
    frozen fit had at its last point while the fit expected a clear gain (a drop would be
    below that level); a sibling divergence is one task out of band while most of the
    other distinct tasks of its capability are not; otherwise a regression, critical when
    deep (z below 2 x band_sigma) and capability-wide (at least two other distinct tasks
    out of band too and they are half or more, or a capability score itself)."""
    if (
        math.isfinite(gain)
        and math.isfinite(level_last)
        and gain > 2.0 * noise
        and observed_good > level_last - noise
    ):
        return Judgement("capability_stall", "warning")
    if n_siblings >= 2 and n_siblings_bad * 2 < n_siblings:
        return Judgement("sibling_divergence", "warning")
    deep = math.isfinite(z) and z < -2 * band_sigma
    wide = (
        n_siblings >= 2 and n_siblings_bad >= 2 and n_siblings_bad * 2 >= n_siblings
    ) or capability_wide
    return Judgement("capability_regression", "critical" if (deep and wide) else "warning")


def _f(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v


SKIP_HORIZON = 200  # steps over which loss-scaler skips are counted
SKIP_WARN = (
    10  # skips within SKIP_HORIZON steps that warn (5%, ~50-100x a healthy dynamic scaler's rate)
)


class StepRules:
    """Per-step indicator rules with their rolling state."""

    def __init__(self, cfg: Any, window: int = 64, min_points: int = 8):
        self.cfg = cfg
        self.min_points = min_points
        self.loss = ScalarWindow(window)
        self.grad = ScalarWindow(window)
        self.ratio: Dict[str, ScalarWindow] = {}
        self.loss_high = 0  # consecutive collections with the loss far above its level
        self.nonfinite_seen = 0
        self.skips: Deque[Tuple[int, float]] = (
            deque()
        )  # (collect step, steps skipped in its window)
        self.first_step: Optional[int] = (
            None  # first step seen since attach (or in the saved state)
        )
        self.last_expectation: Optional[Dict[str, Any]] = None

    def observe(self, step: int, metrics: Dict[str, float], phase: str) -> List[Finding]:
        out: List[Finding] = []
        out += self._nonfinite(step, metrics, phase)
        out += self._loss(step, metrics, phase)
        out += self._grad(step, metrics, phase)
        out += self._update_ratio(step, metrics, phase)
        return out

    # ---- non-finite: critical, immediately ---------------------------------------------
    def _nonfinite(self, step: int, m: Dict[str, float], phase: str) -> List[Finding]:
        out = self._nonfinite_loss(m)
        grad, skipped, scale = self._nonfinite_grad(m)
        return out + grad + self._scaler_skips(step, phase, skipped, scale)

    @staticmethod
    def _nonfinite_loss(m: Dict[str, float]) -> List[Finding]:
        out = []
        loss = _f(m.get(names.LOSS))
        nf_loss = _f(m.get(names.NONFINITE_LOSS)) or 0.0
        if (loss is not None and not math.isfinite(loss)) or nf_loss > 0:
            out.append(
                Finding(
                    "nonfinite",
                    "critical",
                    names.LOSS,
                    loss,
                    None,
                    None,
                    "the training loss is NaN/inf. Look first at: the batch of this step (data "
                    "corruption), the LR at this step, and the last grad_norm / attention-logit "
                    "values; restore from the last good checkpoint.",
                    key="loss",
                )
            )
        return out

    @staticmethod
    def _nonfinite_grad(m: Dict[str, float]) -> Tuple[List[Finding], float, Optional[float]]:
        """Non-finite gradients applied (critical), or counted as loss-scaler skips; returns
        (findings, steps skipped in this collection, the loss scale)."""
        out = []
        nf_grad = _f(m.get(names.NONFINITE_GRAD)) or 0.0
        gn = _f(m.get(names.GRAD_NORM))
        # optim/nonfinite_grad counts NaN/inf gradient norms on steps not flagged as skipped;
        # steps a dynamic loss scaler skipped for overflow are counted apart, in
        # optim/skipped_steps (steps skipped since the last collection), by the indicators.
        grad_bad = nf_grad > 0 or (gn is not None and not math.isfinite(gn))
        skipped = _f(m.get(names.SKIPPED_STEPS)) or 0.0
        scale = _f(m.get(names.LOSS_SCALE))
        if grad_bad and scale is not None and scale != 1.0:
            # a dynamic loss scaler skips every step whose gradients overflow; an adapter that
            # cannot tell which steps it skipped (the framework does not say) reports them as
            # non-finite: with a loss scale in play they are counted as skips, not applied NaN.
            # (A scale of exactly 1 is what bf16/fp32 optimizers report: no scaler, no skip.)
            skipped += max(nf_grad, 1.0)
        elif grad_bad:
            out.append(
                Finding(
                    "nonfinite",
                    "critical",
                    names.NONFINITE_GRAD,
                    nf_grad if gn is None else gn,
                    0.0,
                    None,
                    "gradients are NaN/inf and no loss scaler is there to skip the step, so the update "
                    "was applied. Look first at: the batch of this step, the LR, the grad_norm history, "
                    "attention logits.",
                    key="grad",
                )
            )
        return out, skipped, scale

    def _scaler_skips(
        self, step: int, phase: str, skipped: float, scale: Optional[float]
    ) -> List[Finding]:
        out = []
        # Skips are judged as a rate over the last SKIP_HORIZON steps, outside warmup: a
        # dynamic scaler in steady state skips about one step per growth interval (1000-2000
        # steps), and backs off from its initial scale with a burst of skips at start-up.
        # The start-up back-off is ignored twice over: in warmup, and in the first
        # SKIP_HORIZON steps after attach (the phase is only known from the second LR
        # sample, and Megatron's 2^32 initial scale skips ~30 iterations from step 1).
        if self.first_step is None:
            self.first_step = int(step)
        while self.skips and self.skips[0][0] <= step - SKIP_HORIZON:
            self.skips.popleft()
        if (
            skipped > 0
            and phase not in ("warmup", "rewarm")
            and step - self.first_step >= SKIP_HORIZON
        ):
            self.skips.append((int(step), float(skipped)))
        recent = sum(n for _, n in self.skips)
        if recent >= SKIP_WARN:
            out.append(
                Finding(
                    "nonfinite",
                    "warning",
                    names.SKIPPED_STEPS,
                    recent,
                    0.0,
                    None,
                    f"{recent:.0f} of the last {SKIP_HORIZON} steps were skipped for overflowing "
                    f"gradients"
                    + (f" (loss scale now {scale:g})" if scale is not None else "")
                    + ": the loss scaler keeps overflowing. Look first at: the loss scale trend, "
                    "grad_norm, attention logits.",
                    key="grad-scaler",
                )
            )
        return out

    # ---- loss spike (robust z) and divergence ------------------------------------------
    def _loss(self, step: int, m: Dict[str, float], phase: str) -> List[Finding]:
        loss = _f(m.get(names.LOSS))
        if loss is None or not math.isfinite(loss):
            return []
        out: List[Finding] = []
        w = self.loss
        thr = self.cfg.loss_spike_z * (2.0 if phase in ("warmup", "rewarm") else 1.0)
        if len(w) >= self.min_points:
            level = w.median(last=16)
            noise = w.robust_noise(last=32)
            # relative floor: a loss that moves by 0.2% is not a spike whatever the noise says
            noise = max(noise if math.isfinite(noise) else 0.0, 2e-3 * abs(level), 1e-6)
            z = (loss - level) / noise
            self.last_expectation = {
                "name": names.LOSS,
                "expected": level,
                "low": level - thr * noise,
                "high": level + thr * noise,
            }
            if z > thr:
                self.loss_high += 1
                out.append(
                    Finding(
                        "loss_spike",
                        "warning",
                        names.LOSS,
                        loss,
                        level,
                        [level - thr * noise, level + thr * noise],
                        f"robust z = {z:.1f} (threshold {thr:g}). Look first at: the LR at this step, "
                        "the data batch (corruption, a repeated or out-of-domain shard), grad_norm.",
                        key="loss",
                    )
                )
                if self.loss_high >= 5:
                    out.append(
                        Finding(
                            "loss_divergence",
                            "critical",
                            names.LOSS,
                            loss,
                            level,
                            [level - thr * noise, level + thr * noise],
                            f"the loss has stayed {z:.1f} sigma above its recent level for "
                            f"{self.loss_high} collections: training is diverging. Look first at: the LR "
                            "schedule, attention logits (stability/attn_logit_max), grad_norm; consider "
                            "restoring the last good checkpoint with a lower LR.",
                            key="loss",
                        )
                    )
                # a spike is not learnt into the level (the median would adapt anyway)
                w.append(step, loss)
                return out
        self.loss_high = 0
        w.append(step, loss)
        return out

    # ---- grad-norm spike -----------------------------------------------------------------
    def _grad(self, step: int, m: Dict[str, float], phase: str) -> List[Finding]:
        g = _f(m.get(names.GRAD_NORM))
        if g is None or not math.isfinite(g):
            return []
        out: List[Finding] = []
        w = self.grad
        factor = self.cfg.grad_spike_factor * (2.0 if phase in ("warmup",) else 1.0)
        if len(w) >= self.min_points:
            med = w.median(last=32)
            if med > 0 and g > factor * med:
                out.append(
                    Finding(
                        "grad_norm_spike",
                        "warning",
                        names.GRAD_NORM,
                        g,
                        med,
                        [0.0, factor * med],
                        f"grad norm {g:.3g} is {g / med:.1f}x its rolling median {med:.3g} (threshold "
                        f"{factor:g}x). Look first at: the loss at the same step, the LR, the batch; "
                        "with gradient clipping the update is bounded but the batch may be bad.",
                        key="grad_norm",
                    )
                )
        w.append(step, g)
        return out

    # ---- update/param ratio ------------------------------------------------------------
    def _update_ratio(self, step: int, m: Dict[str, float], phase: str) -> List[Finding]:
        out: List[Finding] = []
        lr = _f(m.get(names.LR))
        for name, v in m.items():
            metric, item = names.lookup(name)
            if metric is None or metric.name != names.UPDATE_RATIO:
                continue
            r = _f(v)
            if r is None or not math.isfinite(r):
                continue
            w = self.ratio.setdefault(name, ScalarWindow(64))
            out += self._one_update_ratio(name, item or "all", r, w, lr, phase)
            w.append(step, r)
        return out

    def _one_update_ratio(
        self, name: str, group: str, r: float, w: "ScalarWindow", lr: Optional[float], phase: str
    ) -> List[Finding]:
        """One group's update ratio: out of [update_ratio_min, update_ratio_max], or a jump
        above its rolling median."""
        out: List[Finding] = []
        lo, hi = self.cfg.update_ratio_min, self.cfg.update_ratio_max
        if r > hi:
            out.append(
                Finding(
                    "update_ratio",
                    "warning",
                    name,
                    r,
                    None,
                    [lo, hi],
                    f"update/param ratio {r:.3g} of group `{group}` is above {hi:g}: each step "
                    "rewrites too much of the weights. Look first at: the LR (a spike?), the "
                    "optimizer state after a restart, weight decay.",
                    key=name,
                )
            )
        elif r < lo and phase not in ("warmup",) and (lr is None or lr > 0):
            out.append(
                Finding(
                    "update_ratio",
                    "warning",
                    name,
                    r,
                    None,
                    [lo, hi],
                    f"update/param ratio {r:.3g} of group `{group}` is below {lo:g}: this group "
                    "has stopped learning. Look first at: frozen parameters, LR of the group, "
                    "grad RMS vs Adam eps.",
                    key=name,
                )
            )
        elif len(w) >= self.min_points:
            med = w.median(last=32)
            jump = self.cfg.grad_spike_factor * (2.0 if phase in ("warmup", "rewarm") else 1.0)
            if med > 0 and r > jump * med:
                out.append(
                    Finding(
                        "update_ratio",
                        "warning",
                        name,
                        r,
                        med,
                        [lo, jump * med],
                        f"update/param ratio of group `{group}` jumped to {r:.3g}, {r / med:.1f}x its "
                        f"rolling median. Look first at: the LR at this step (a spike?), "
                        "the loss and grad norm.",
                        key=name,
                    )
                )
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {
            "loss": self.loss.state_dict(),
            "grad": self.grad.state_dict(),
            "ratio": {k: v.state_dict() for k, v in self.ratio.items()},
            "loss_high": self.loss_high,
            "skips": [list(x) for x in self.skips],
            "first_step": self.first_step,
        }

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.loss = ScalarWindow.from_state(sd["loss"])
        self.grad = ScalarWindow.from_state(sd["grad"])
        self.ratio = {k: ScalarWindow.from_state(v) for k, v in sd.get("ratio", {}).items()}
        self.loss_high = int(sd.get("loss_high", 0))  # keys not read here are ignored
        self.skips = deque((int(a), float(b)) for a, b in sd.get("skips", []))
        self.first_step = sd.get("first_step")


def _attention_logit_findings(cfg: Any, extra: Dict[str, float]) -> List[Finding]:
    """The largest attention logit of the round, and its worst layer."""
    out: List[Finding] = []
    attn = _f(extra.get(names.ATTN_LOGIT_MAX))
    if attn is not None:
        layers = names.items_of(names.ATTN_LOGIT_MAX, extra)
        worst = max(
            ((v, k) for k, v in layers.items() if v is not None and math.isfinite(v)), default=None
        )
        where = f" (worst layer {worst[1]}: {worst[0]:.3g})" if worst else ""
        if not math.isfinite(attn) or attn > cfg.attn_logit_critical:
            out.append(
                Finding(
                    "attention_logit_growth",
                    "critical",
                    names.ATTN_LOGIT_MAX,
                    attn,
                    None,
                    [0.0, cfg.attn_logit_warning],
                    f"max attention logit {attn:.3g} above {cfg.attn_logit_critical:g}{where}: attention "
                    "entropy collapse, loss divergence follows. Look first at: QK-layernorm / "
                    "qk-clip, the LR, that layer's query/key weight norms.",
                    key="attn",
                )
            )
        elif attn > cfg.attn_logit_warning:
            out.append(
                Finding(
                    "attention_logit_growth",
                    "warning",
                    names.ATTN_LOGIT_MAX,
                    attn,
                    None,
                    [0.0, cfg.attn_logit_warning],
                    f"max attention logit {attn:.3g} above {cfg.attn_logit_warning:g}{where}. Look first "
                    "at: its growth over the last rounds, QK-layernorm, the LR.",
                    key="attn",
                )
            )
    return out


def _output_logit_findings(cfg: Any, extra: Dict[str, float]) -> List[Finding]:
    """The mean output log-partition (logit drift)."""
    out: List[Finding] = []
    lse = _f(extra.get(names.OUTPUT_LOGSUMEXP_MEAN))
    if lse is not None and (not math.isfinite(lse) or abs(lse) > cfg.output_logit_warning):
        sev = (
            "critical"
            if (not math.isfinite(lse) or abs(lse) > 10 * cfg.output_logit_warning)
            else "warning"
        )
        out.append(
            Finding(
                "output_logit_divergence",
                sev,
                names.OUTPUT_LOGSUMEXP_MEAN,
                lse,
                0.0,
                [-cfg.output_logit_warning, cfg.output_logit_warning],
                f"mean output log-partition {lse:.3g} (|.| above {cfg.output_logit_warning:g}): output "
                "logits are drifting. Look first at: stability/output_logit_max, adding z-loss, "
                "the LR and weight decay of the output layer.",
                key="lse",
            )
        )
    return out


def _grad_rms_findings(cfg: Any, extra: Dict[str, float]) -> List[Finding]:
    """Gradient RMS against Adam eps, per param group."""
    out: List[Finding] = []
    ratio = _f(extra.get(names.GRAD_RMS_OVER_EPS_MIN))
    if ratio is not None and math.isfinite(ratio) and ratio < cfg.grad_rms_eps_factor:
        groups = names.items_of(names.GRAD_RMS, extra)
        worst = min(
            ((v, k) for k, v in groups.items() if v is not None and math.isfinite(v)), default=None
        )
        eps = _f(extra.get(names.ADAM_EPS))
        where = (
            f" (smallest: group {worst[1]}, grad RMS {worst[0]:.3g}, eps {eps:g})"
            if worst and eps
            else ""
        )
        out.append(
            Finding(
                "grad_rms_near_eps",
                "warning",
                names.GRAD_RMS_OVER_EPS_MIN,
                ratio,
                None,
                [cfg.grad_rms_eps_factor, math.inf],
                f"gradient RMS is only {ratio:.3g}x Adam eps{where}: updates of that group shrink "
                "and stop being scale-free (Wortsman et al.). Look first at: lowering Adam eps "
                "(e.g. 1e-15), the group's LR.",
                key="eps",
            )
        )
    return out


def probe_extra_rules(cfg: Any, extra: Dict[str, float]) -> List[Finding]:
    """Stability indicators measured during probe rounds (Wortsman et al. 2023)."""
    return (
        _attention_logit_findings(cfg, extra)
        + _output_logit_findings(cfg, extra)
        + _grad_rms_findings(cfg, extra)
    )
