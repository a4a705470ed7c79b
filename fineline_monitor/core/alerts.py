"""AlertEngine: phases -> expectations -> rules -> alerts, live and offline.

The monitor calls `observe_metrics` every `indicators.collect_every` steps and
`observe_probe` at every probe round; `fineline-monitor analyze` replays a trajectory
table through `observe_curves`, the very method `observe_probe` uses, so offline and
live results come from the same code.

Firing discipline (all rules):
- hysteresis: a capability rule needs `hysteresis` consecutive out-of-band rounds;
  per-step and stability rules fire on the first observation (a spike is one event);
- de-duplication: while a condition stays true after firing it does not fire again,
  except to escalate warning -> critical;
- cooldown: after firing, the same condition (rule + curve or key) waits
  `cooldown_rounds` rounds (probe rounds, or collections for per-step rules);
- quarantine: an out-of-band point (on the bad side) is not learnt into the fit, so a
  fault is not absorbed; after `hysteresis + 3` bad rounds in a row the new level is
  accepted (it has been alerted on) and the curve is judged against it from then on.
All of it is in `state_dict()`, so a restart neither forgets a fit nor re-pages.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fineline_monitor import metric_names as names
from fineline_monitor.core.expectations import (ACC, LOSS, NEG, LagDetection, ReferenceCurves, base_task,
                                                 capability_for, chance_for, lagged_detect, majority_for,
                                                 metric_kind)
from fineline_monitor.core.history import CurveWindows
from fineline_monitor.core.phases import PhaseTracker
from fineline_monitor.core.rules import Finding, StepRules, probe_extra_rules
from fineline_monitor.core.types import Alert, ProbeRound

STATE_VERSION = 2
SEV_RANK = {"info": 0, "warning": 1, "critical": 2}
ASSUMED_DOCS = 500  # binomial noise for take-off checks when neither stderr nor n docs is known
CALIB_POINTS = 5  # points that calibrate a reference run
# Points kept per curve: the 3 judged, the F = 10 of each frozen fit, and all of the
# earlier ones for the noise estimate and the self-calibration back-test. Why 48 and not
# 24: ~20 residuals gave a noise sigma with ~16% sampling error, i.e. heavy-tailed z (the
# bulk of healthy z had an RMS of ~0.8 while z < -4 was ~20x the normal rate), and a
# back-test over ~10 positions; with 48 both settle. Measured on the tune split (150
# faults per kind, fit_floor 1): warnings per 50 run-rounds 1.96 with 24 points and the
# self-calibration, 1.49 with 48 points and none, at the same drop / drift recall (0.833 /
# 0.787); 96 points without calibration 1.17 at 0.833 / 0.767, for twice the cost.
WINDOW = 48
K_LAGS = 3  # a fault is judged against fits frozen 1..3 rounds before it ("within 3 rounds")
POINT_Z = 1.0  # every one of the k judged points must be at least this many sigma low
ANCHORS = 4  # points of the previous phase kept as level anchors in decay/anneal
ABS_FLOOR = 0.002  # accuracy noise floor (absolute): a curve can look smoother than its eval is
REL_FLOOR = 0.001  # loss-like noise floor, relative to the value


def _capability_kind(key: str) -> Optional[int]:
    """A capability series' kind (metric_names.capability_judged_as); None: not judged."""
    judged = names.capability_judged_as(key)
    return None if judged is None else {"loss": LOSS, "acc": ACC}[judged[2]]


def _floor(kind: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.where(kind == ACC, ABS_FLOOR, REL_FLOOR * np.maximum(np.abs(np.nan_to_num(y)), 1e-3))


def _takeoff_margin(base: float, var: float) -> float:
    p = min(max(base, 0.02), 0.98)
    sd = math.sqrt(var) if math.isfinite(var) else math.sqrt(p * (1 - p) / ASSUMED_DOCS)
    return max(3 * sd, 0.01)


def _takeoff_margin_vec(base: np.ndarray, var: np.ndarray) -> np.ndarray:
    p = np.clip(np.nan_to_num(base), 0.02, 0.98)
    sd = np.where(np.isfinite(var), np.sqrt(np.where(np.isfinite(var), var, 0.0)), np.sqrt(p * (1 - p) / ASSUMED_DOCS))
    return np.maximum(3 * sd, 0.01)


def _empty_det(n: int, k: int) -> Dict[str, np.ndarray]:
    d = {f: np.full(n, np.nan) for f in ("expected", "sigma", "level_last", "noise")}
    d.update({f: np.full((n, k), np.nan) for f in ("z", "zpt", "pred_k", "sig_k")})
    return d


ALIAS_MIN_POINTS = 5  # identical values over at least this many rounds: one curve under two names


def alias_groups(windows: np.ndarray, metrics: Sequence[Any]) -> np.ndarray:
    """For rows of value windows (n, W), the index of the first row with the same metric and
    the very same values in every column (nan where the other is nan too), or the row
    itself. Why: trajectory tables report some evaluations twice under two names (OLMo's
    ladder tables have `arc_challenge` and `arc_challenge_rc_0shot`, `commonsense_qa` and
    `csqa_rc_0shot`, ...: 6 of 90 curves per run); without this one event pages twice and
    an alias counts as a second sibling task out of band (toward a critical)."""
    n = windows.shape[0]
    out = np.arange(n)
    if n < 2:
        return out
    fin = np.isfinite(windows)
    first: Dict[Tuple[Any, bytes, bytes], int] = {}
    for i in np.flatnonzero(fin.sum(1) >= ALIAS_MIN_POINTS):
        key = (metrics[i], fin[i].tobytes(), np.where(fin[i], windows[i], 0.0).tobytes())
        out[i] = first.setdefault(key, i)
    return out


class RuleBook:
    """Hysteresis, cooldown and de-duplication state, keyed by condition."""

    def __init__(self) -> None:
        self.s: Dict[str, List[Any]] = {}  # key -> [consec, last_fire_round, active, last_severity]

    def update(self, key: str, true: bool, round_no: int, *, hysteresis: int, cooldown: int,
               severity: str) -> bool:
        st = self.s.get(key)
        if st is None:
            if not true:
                return False
            st = self.s[key] = [0, -10 ** 9, False, ""]
        if not true:
            st[0] = 0
            st[2] = False
            return False
        st[0] += 1
        if st[0] < hysteresis:
            return False
        escalate = st[2] and SEV_RANK[severity] > SEV_RANK.get(st[3], -1)
        if st[2] and not escalate:
            return False
        if not escalate and round_no - st[1] < cooldown:
            return False
        st[1], st[2], st[3] = round_no, True, severity
        return True

    def consec(self, key: str) -> int:
        st = self.s.get(key)
        return st[0] if st else 0

    def state_dict(self) -> Dict[str, Any]:
        # bounded: only conditions that are active, counting, or inside their cooldown matter
        return {k: v for k, v in self.s.items() if v[0] or v[2] or v[1] > -10 ** 9}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.s = {k: list(v) for k, v in sd.items()}


class AlertEngine:
    """Phase-aware expectations and alert rules for one run."""

    def __init__(self, cfg: Any, run: str, *, source: Optional[str] = None, model: Optional[str] = None,
                 reference: Optional[ReferenceCurves] = None, emit_expectations: bool = True):
        self.cfg = cfg
        self.run = run
        self.source, self.model = source, model
        self.k = float(cfg.band_sigma)
        self.m = int(cfg.hysteresis)
        self.cooldown = int(cfg.cooldown_rounds)
        self.phases = PhaseTracker(cfg.phases, cfg.warmup_steps)
        self.step_rules = StepRules(cfg)
        self.book = RuleBook()
        self.win = CurveWindows(width=WINDOW)
        self._dirty: set = set()  # curve conditions with rule-book state to clear when they recover
        self.emit_expectations = emit_expectations
        self._exp_rows: List[Dict[str, Any]] = []
        self.n_probe = 0
        self.n_collect = 0
        # per-curve metadata, aligned with the window rows
        self.meta: List[Dict[str, Any]] = []
        self.paired_anchor: Dict[str, Dict[str, float]] = {}  # task -> doc_id(str) -> gold logprob
        self.reference = reference
        if reference is None and getattr(cfg, "reference_csv", ""):
            reference = ReferenceCurves.from_csv(cfg.reference_csv, cfg.reference_model, align=cfg.reference_align,
                                                 total_tokens=cfg.reference_total_tokens)
            self.reference = reference
        self.alert_counts: Dict[str, int] = {}
        self._reset_arrays()

    # ---- the monitor's interface ----------------------------------------------------------
    @property
    def phase(self) -> str:
        return self.phases.phase

    def observe_metrics(self, step: int, tokens: Optional[int], lr: Optional[float],
                        metrics: Dict[str, float]) -> List[Alert]:
        if lr is None:
            lr = metrics.get("train/lr")
        self.phases.observe(step, tokens, lr)
        self.n_collect += 1
        findings = self.step_rules.observe(step, metrics, self.phase)
        if self.emit_expectations and self.step_rules.last_expectation is not None:
            self._exp_rows.append(dict(self.step_rules.last_expectation))
            self.step_rules.last_expectation = None
        return self._findings_to_alerts(findings, step, tokens, self.n_collect, scope="step")

    def observe_probe(self, round: ProbeRound, extra: Optional[Dict[str, float]] = None) -> List[Alert]:
        step, tokens = int(round.step), round.tokens
        self.phases.observe(step, tokens, None)
        keys, tasks, metrics, caps, vals, var, chance, ndocs = [], [], [], [], [], [], [], []
        for name, r in round.tasks.items():
            mets = dict(r.metrics)
            gl = round.gold_logprobs.get(name) if round.gold_logprobs else None
            if gl and "gold_logprob" not in mets:
                mets["gold_logprob"] = float(np.mean(list(gl.values())))
            for metric, v in mets.items():
                if metric_kind(metric) is None:
                    continue
                keys.append(f"probe/{name}/{metric}")
                tasks.append(name)
                metrics.append(metric)
                caps.append(r.capability or capability_for(name))
                vals.append(float(v))
                se = r.stderr.get(metric) if r.stderr else None
                n = r.n_docs or 0
                if se is not None and math.isfinite(se) and se > 0:
                    var.append(float(se) ** 2)
                elif metric_kind(metric) == ACC and n > 0:
                    p = min(max(float(v), 0.02), 0.98)
                    var.append(p * (1 - p) / n)
                else:
                    var.append(math.nan)
                # a probe's baseline is 1/choices; a task where always giving the same answer
                # scores more (yes/no tasks: BoolQ 0.62) has not taken off until it beats that
                # (the probe's own documents, `constant_baseline`, or by name, `majority_for`)
                if metric_kind(metric) != ACC:
                    chance.append(None)
                elif r.random_baseline > 0:
                    chance.append(max(r.random_baseline, r.constant_baseline, majority_for(name) or 0.0))
                else:
                    chance.append(chance_for(name))
                ndocs.append(n)
        for series_key, v in round.capability_scores.items():
            key = f"capability/{series_key}"
            judged = names.capability_judged_as(key)
            if judged is None:  # headline / took_off switch meaning: recorded, not judged
                continue
            se = (round.capability_stderr or {}).get(series_key)
            keys.append(key)
            tasks.append(None)
            metrics.append(judged[1])
            caps.append(judged[0])
            vals.append(float(v))
            var.append(float(se) ** 2 if se is not None and math.isfinite(se) and se > 0 else math.nan)
            chance.append(judged[3])
            ndocs.append(0)
        alerts = self.observe_curves(step, tokens, keys, tasks, metrics, caps, vals, var, chance,
                                     paired=round.gold_logprobs or None)
        if extra:
            alerts += self._findings_to_alerts(probe_extra_rules(self.cfg, extra), step, tokens, self.n_probe,
                                               scope="probe")
        return alerts

    def pop_phase_changes(self) -> List[Dict[str, Any]]:
        return self.phases.pop_changes()

    def pop_expectations(self) -> List[Dict[str, Any]]:
        out, self._exp_rows = self._exp_rows, []
        return out

    # ---- capability curves: shared by live probes and offline replay --------------------
    def _ensure_meta(self, keys: Sequence[str], tasks, metrics, caps, chance) -> np.ndarray:
        rows = self.win.rows(keys)
        if len(self.meta) < len(self.win):
            pos = {k: j for j, k in enumerate(keys)}
            while len(self.meta) < len(self.win):
                key = self.win.keys[len(self.meta)]
                j = pos[key]
                metric = metrics[j] or "capability"
                kind = metric_kind(metric) if not key.startswith("capability/") else _capability_kind(key)
                self.meta.append({"key": key, "task": tasks[j], "metric": metrics[j], "cap": caps[j],
                                  "base_task": base_task(tasks[j]) if tasks[j] else key,
                                  "kind": -1 if kind is None else kind, "lo": chance[j], "base": None,
                                  "taken": kind != ACC, "above": 0, "seg": None, "n": 0, "calib": [],
                                  "offset": None, "s_cal": None, "x_cal": None, "pb": 0})
            self._grow()
        return rows

    def observe_curves(self, step: int, tokens: Optional[float], keys: Sequence[str],
                       tasks: Sequence[Optional[str]], metrics: Sequence[Optional[str]],
                       caps: Sequence[Optional[str]], values: Sequence[float], var: Sequence[float],
                       chance: Sequence[Optional[float]], *, paired: Optional[Dict[str, Dict[Any, float]]] = None,
                       ) -> List[Alert]:
        """One evaluation round of many curves. `var` is the known sampling variance of
        each value (stderr^2, binomial, or nan when unknown); `chance` the chance accuracy
        (None when unknown)."""
        self.n_probe += 1
        phase, seg = self.phases.phase, self.phases.segment
        if not keys:
            return []
        rows = self._ensure_meta(keys, tasks, metrics, caps, chance)
        y = np.asarray(values, dtype=np.float64)
        v = np.asarray(var, dtype=np.float64)
        x_val = math.log(tokens + 1.0) if tokens is not None and math.isfinite(tokens) else math.log(step + 1.0)
        fit_x = (tokens is not None and tokens > 0) or (tokens is None and step > 0)
        meta = [self.meta[r] for r in rows]
        kind = self._kind[rows]

        # new phase segment: a new fit. Decay/anneal keep the last ANCHORS usable points as
        # level anchors (a regression right after the LR starts decaying is still visible).
        for i in np.flatnonzero(self._seg[rows] != seg):
            r = rows[i]
            if self._seg[r] >= 0 and phase in ("decay", "anneal"):
                used = np.flatnonzero(self.win.use[r])
                self.win.use[r] = False
                self.win.use[r, used[-ANCHORS:]] = True
            else:
                self.win.clear(rows[i:i + 1])
            self._seg[r] = seg
            meta[i]["seg"] = seg

        finite = np.isfinite(y)
        self._takeoff_live(rows, meta, y, v, finite)
        self.win.push(rows, np.full(len(rows), x_val), y, v, finite & fit_x)
        self._n[rows] += 1

        known_kind = kind >= 0
        eligible = self._taken[rows] & known_kind & finite & (phase != "warmup")
        nr = len(rows)
        det = _empty_det(nr, K_LAGS)
        jr = np.flatnonzero(eligible)
        if jr.size:
            rj = rows[jr]
            sgn = np.where(kind[jr] == LOSS, -1.0, 1.0)
            d = lagged_detect(self.win.x[rj], sgn[:, None] * self.win.y[rj], self.win.var[rj], self.win.use[rj],
                              _floor(kind[jr], y[jr]), K=K_LAGS)
            for name in det:
                det[name][jr] = getattr(d, name)
        res = self._decide(det, kind)
        source = np.array(["own"] * nr, dtype=object)

        # paired per-document differences (live): a fixed document set makes round-to-round
        # changes far less noisy than two independent accuracies
        point_bad = np.zeros(nr, dtype=bool)
        has_point = np.zeros(nr, dtype=bool)
        if paired:
            for i, mt in enumerate(meta):
                if mt["metric"] != "gold_logprob" or not eligible[i]:
                    continue
                task = mt["task"]
                cur, anc = paired.get(task), self.paired_anchor.get(task)
                if not cur or not anc:
                    continue
                common = [dd for dd in cur if str(dd) in anc]
                if len(common) < 5:
                    continue
                dif = np.array([cur[c] - anc[str(c)] for c in common])
                se = float(dif.std(ddof=1) / math.sqrt(len(dif)))
                cur_mean = float(np.mean([cur[c] for c in common]))
                anchor_mean = float(np.mean([anc[str(c)] for c in common]))
                nz = det["noise"][i] if math.isfinite(det["noise"][i]) else 0.0
                sp = math.sqrt(se * se + (0.25 * nz) ** 2) or 1e-9
                # expressed on this round's value scale: the anchor's level (no growth assumed:
                # a paired change below zero by k sigma is a loss of what the docs knew)
                e = y[i] - (cur_mean - anchor_mean)
                zz = (y[i] - e) / sp
                has_point[i] = True
                point_bad[i] = zz < -self.k
                res["expected"][i], res["low"][i], res["high"][i] = e, e - self.k * sp, e + self.k * sp
                res["z"][i] = zz
                source[i] = "paired"

        # reference run: calibrate on early points after take-off, then judge against it
        if self.reference is not None and tokens is not None:
            for i, mt in enumerate(meta):
                if not known_kind[i] or not finite[i] or mt["task"] is None or source[i] == "paired":
                    continue
                rv = self.reference.value(mt["task"], mt["metric"], float(tokens))
                if rv is None:
                    continue
                if mt["offset"] is None:
                    if mt["taken"] and phase != "warmup":
                        mt["calib"].append(y[i] - rv)
                        if len(mt["calib"]) >= CALIB_POINTS:
                            c = np.array(mt["calib"])
                            mt["offset"] = float(np.median(c))
                            mad = float(np.median(np.abs(c - np.median(c)))) * 1.4826
                            noise = math.sqrt(v[i]) if math.isfinite(v[i]) else 0.0
                            mt["s_cal"] = max(mad, noise, 1e-3 * max(abs(rv), 1e-3))
                            mt["ref_cal_value"] = rv
                    continue
                drift = 0.1 * abs(rv - mt.get("ref_cal_value", rv))
                s = math.sqrt(mt["s_cal"] ** 2 * (1 + 1 / CALIB_POINTS) + drift ** 2 +
                              (v[i] if math.isfinite(v[i]) else 0.0))
                e = rv + mt["offset"]
                sg = 1.0 if mt["kind"] != LOSS else -1.0
                zz = sg * (y[i] - e) / s
                if not eligible[i]:
                    continue
                if not np.isfinite(res["expected"][i]):  # the reference is the expectation until the own fit is ready
                    has_point[i] = True
                    point_bad[i] = zz < -self.k
                    res["expected"][i], res["low"][i], res["high"][i] = e, e - self.k * s, e + self.k * s
                    res["z"][i] = zz
                    source[i] = "reference"
                elif zz < -self.k and res["z"][i] < -1.0:
                    # own fit in band but the calibrated reference says the curve drifted
                    # away, and the own fit agrees on the direction
                    has_point[i] = True
                    point_bad[i] = True
        # single-point conditions need `hysteresis` consecutive rounds
        bad = res["bad"].copy()
        for i in np.flatnonzero(has_point | (self._pb[rows] > 0)):
            r = rows[i]
            self._pb[r] = self._pb[r] + 1 if point_bad[i] else 0
            meta[i]["pb"] = int(self._pb[r])
            if self._pb[r] >= self.m and eligible[i]:
                bad[i] = True
        if paired:
            for i, mt in enumerate(meta):
                if mt["metric"] == "gold_logprob" and not bad[i] and mt["task"] in paired:
                    self.paired_anchor[mt["task"]] = {str(k): float(val) for k, val in paired[mt["task"]].items()}

        if self.emit_expectations:
            for i in np.flatnonzero(np.isfinite(res["expected"])):
                self._exp_rows.append({"name": meta[i]["key"], "expected": float(res["expected"][i]),
                                       "low": float(res["low"][i]), "high": float(res["high"][i])})
        have = eligible & np.isfinite(res["expected"])
        return self._fire_round(self.n_probe, step, tokens, phase, rows, y, bad, have, res, source,
                                clear_rows=rows, windows=self.win.y[rows] if bad.any() else None)

    # -- detection decision (shared) --
    def _decide(self, det: Dict[str, np.ndarray], kind: np.ndarray) -> Dict[str, np.ndarray]:
        """Alarm when, for some lag k >= hysteresis, the mean of the k newest points is
        more than band_sigma below the frozen fit and every one of them is below it by at
        least POINT_Z sigma (a sustained fault, not one outlier)."""
        z, zpt = det["z"], det["zpt"]
        kmin = min(max(self.m, 1), K_LAGS)
        with np.errstate(invalid="ignore"):
            cond = (z < -self.k) & (zpt < -POINT_Z)
        cond[:, :kmin - 1] = False
        zz = np.where(cond, z, np.inf)
        kbest = np.argmin(zz, axis=1)
        bad = cond.any(1)
        # when nothing fired, report the lag-K view (the most frozen fit)
        kuse = np.where(bad, kbest, K_LAGS - 1)
        r = np.arange(z.shape[0])
        sgn = np.where(kind == LOSS, -1.0, 1.0)
        pg = det["pred_k"][r, kuse]
        sg = det["sig_k"][r, kuse]
        expected = sgn * pg
        lo = sgn * (pg - self.k * sg)
        hi = sgn * (pg + self.k * sg)
        return {"bad": bad, "z": z[r, kuse], "k": kuse + 1, "expected": expected, "low": np.fmin(lo, hi),
                "high": np.fmax(lo, hi), "sigma": sg, "noise": det["noise"],
                "gain": det["expected"] - det["level_last"], "level_last": det["level_last"]}

    def _takeoff_live(self, rows, meta, y, v, finite) -> None:
        """Accuracy curves at chance are not judged until they rise 3 sigma above
        max(chance, first value) in 2 consecutive rounds (the same rule as `_takeoff_batch`)."""
        for i in np.flatnonzero(~self._taken[rows] & finite):
            mt = meta[i]
            if mt["base"] is None:
                mt["base"] = max(mt["lo"], y[i]) if mt["lo"] is not None else y[i]
            if y[i] > mt["base"] + _takeoff_margin(mt["base"], v[i]):
                mt["above"] += 1
                if mt["above"] >= 2:
                    mt["taken"] = True
                    self._taken[rows[i]] = True
            else:
                mt["above"] = 0

    # -- firing (shared by live and batch) --
    def _fire_round(self, round_no: int, step: int, tokens: Optional[float], phase: str, rows: np.ndarray,
                    y: np.ndarray, bad: np.ndarray, have: np.ndarray, res: Dict[str, np.ndarray],
                    source: Any, clear_rows: Optional[np.ndarray] = None,
                    windows: Optional[np.ndarray] = None) -> List[Alert]:
        """Hysteresis is inside the detector (k >= m points); here: de-duplication,
        cooldown, sibling context, severity. `rows` are window rows, arrays are aligned
        with them. Conditions of `clear_rows` not bad this round are cleared. `windows`
        (the rows' value windows, aligned too) identify aliases (`alias_groups`): one
        curve reported under two names alerts once, naming both, and counts as one
        sibling."""
        alerts: List[Alert] = []
        n = len(rows)
        canon = np.arange(n)
        if bad.any() and windows is not None:
            cand = np.flatnonzero(have | bad)
            # the lowest window row of a group represents it: a stable key round after round,
            # so one event keeps one condition (cooldown, de-duplication) under either name
            cand = cand[np.argsort(rows[cand], kind="stable")]
            canon[cand] = cand[alias_groups(windows[cand], [self.meta[rows[i]]["metric"] for i in cand])]
        # a group is bad when any of its names is (the names' detector state can differ: a
        # reference run or paired anchors known under one name only)
        group_bad = np.zeros(n, dtype=bool)
        group_bad[canon[bad]] = True
        group_bad = group_bad[canon]
        if bad.any():
            groups: Dict[Tuple[Any, Any], List[int]] = {}
            for i in np.flatnonzero((have | bad) & (canon == np.arange(n))):
                mt = self.meta[rows[i]]
                if mt["cap"] and mt["task"] is not None:
                    groups.setdefault((mt["cap"], mt["metric"]), []).append(i)
            for i in np.flatnonzero(group_bad & (canon == np.arange(n))):
                members = np.flatnonzero(canon == i)
                src = i if bad[i] else int(members[bad[members]][0])  # the row whose detector fired
                aka = [self.meta[rows[j]]["task"] or self.meta[rows[j]]["key"] for j in members if j != i]
                mt = self.meta[rows[i]]
                key = self._cap_key(mt)
                sib = [j for j in groups.get((mt["cap"], mt["metric"]), []) if j != i]
                sib_bases = {self.meta[rows[j]]["base_task"] for j in sib} - {mt["base_task"]}
                bad_bases = {self.meta[rows[j]]["base_task"] for j in sib if group_bad[j]} - {mt["base_task"]}
                rule, severity = self._classify(src, mt, y, res, len(sib_bases), len(bad_bases))
                if not self.book.update(key, True, round_no, hysteresis=1, cooldown=self.cooldown,
                                        severity=severity):
                    continue
                self._dirty.add(key)
                alerts.append(self._curve_alert(rule, severity, step, tokens, phase, mt, y[src], res, src,
                                                source[src] if source is not None else "own", len(sib_bases),
                                                len(bad_bases), aka))
                self.alert_counts[rule] = self.alert_counts.get(rule, 0) + 1
        if clear_rows is not None and self._dirty:
            book = self.book.s
            for i in np.flatnonzero(~group_bad):
                key = self._cap_key(self.meta[rows[i]])
                if key in self._dirty:
                    self.book.update(key, False, round_no, hysteresis=1, cooldown=self.cooldown, severity="warning")
                    st = book.get(key)
                    if st is None or (not st[0] and not st[2]):
                        self._dirty.discard(key)
        for i in np.flatnonzero(group_bad):
            self._dirty.add(self._cap_key(self.meta[rows[canon[i]]]))
        return alerts

    # ---- offline: a whole run's table at once -------------------------------------------
    def observe_table(self, steps: Sequence[int], tokens: Sequence[Optional[float]], phases: Sequence[str],
                      segments: Sequence[int], keys: Sequence[str], tasks: Sequence[Optional[str]],
                      metrics: Sequence[Optional[str]], caps: Sequence[Optional[str]],
                      chance: Sequence[Optional[float]], pt_curve: np.ndarray, pt_round: np.ndarray,
                      pt_value: np.ndarray, pt_var: np.ndarray) -> List[Alert]:
        """Replay R evaluation rounds of C curves in one pass: the same windows, take-off
        rule, detector (`lagged_detect` + `_decide`) and firing (`_fire_round`) as
        `observe_curves`, computed for every (curve, round) at once instead of round by
        round. Round r has `steps[r]`, `tokens[r]`, and the phase/segment the tracker was in
        (the caller runs the tracker). Points: `pt_curve` (index into keys), `pt_round`,
        value, known variance; one point per (curve, round) at most. No reference run or
        paired documents here (`analyze` uses `observe_curves` round by round for those)."""
        R = len(steps)
        if R == 0 or len(keys) == 0:
            return []
        rows_c = self._ensure_meta(keys, tasks, metrics, caps, chance)
        W = self.win.width
        order = np.lexsort((pt_round, pt_curve))
        pc, pr = pt_curve[order], pt_round[order]
        y, v = pt_value[order].astype(float), pt_var[order].astype(float)
        P = pc.size
        steps_a = np.asarray(steps, dtype=float)
        tok_a = np.array([np.nan if t is None else float(t) for t in tokens])
        x_r = np.where(np.isfinite(tok_a), np.log(np.nan_to_num(tok_a) + 1.0), np.log(steps_a + 1.0))
        fitx_r = np.where(np.isfinite(tok_a), tok_a > 0, steps_a > 0)
        seg_r = np.asarray(segments, dtype=np.int64)
        warm_r = np.array([p == "warmup" for p in phases])
        decay_r = np.array([p in ("decay", "anneal") for p in phases])
        x, fitx, seg = x_r[pr], fitx_r[pr], seg_r[pr]
        finite = np.isfinite(y)
        usable = finite & fitx
        kind_c = self._kind[rows_c]
        kind = kind_c[pc]
        first = np.ones(P, dtype=bool)
        first[1:] = pc[1:] != pc[:-1]

        # take-off (same rule as _takeoff_live)
        taken = np.ones(P, dtype=bool)
        acc_c = np.array([not self.meta[r]["taken"] for r in rows_c])
        if acc_c.any():
            base_c = np.full(len(keys), np.nan)
            fi = np.flatnonzero(first & finite)
            for p in fi:
                c = pc[p]
                mt = self.meta[rows_c[c]]
                if mt["base"] is None and acc_c[c]:
                    mt["base"] = max(mt["lo"], y[p]) if mt["lo"] is not None else float(y[p])
            for c in np.flatnonzero(acc_c):
                b = self.meta[rows_c[c]]["base"]
                base_c[c] = np.nan if b is None else b
            base = base_c[pc]
            above = finite & (y > base + _takeoff_margin_vec(base, v))
            prev = np.zeros(P, dtype=bool)
            prev[1:] = above[:-1] & ~first[1:]
            tk = above & prev & acc_c[pc]
            tk_first = np.full(len(keys), P + 1)
            idx = np.flatnonzero(tk)
            if idx.size:
                cu, at = np.unique(pc[idx], return_index=True)
                tk_first[cu] = idx[at]
            taken = ~acc_c[pc] | (np.arange(P) >= tk_first[pc])
            for c in np.flatnonzero(acc_c & (tk_first <= P)):
                self.meta[rows_c[c]]["taken"] = True
                self._taken[rows_c[c]] = True

        # windows ending at every point: pad each curve with W-1 empty slots in front
        cstart = np.flatnonzero(first)
        ccount = np.diff(np.append(cstart, P))
        shift = np.repeat(np.arange(cstart.size) + 1, ccount) * (W - 1)
        pos = np.arange(P) + shift
        L = P + cstart.size * (W - 1)

        def padded(a, fill):
            out = np.full(L, fill, dtype=a.dtype)
            out[pos] = a
            return np.lib.stride_tricks.sliding_window_view(out, W)[pos - (W - 1)]

        # decay/anneal segments keep the last ANCHORS usable points of the previous one
        anchor_of = np.full(P, -1, dtype=np.int64)
        bnd = np.flatnonzero(~first & (seg != np.roll(seg, 1)) & decay_r[pr])
        for p in bnd.tolist():
            c0 = cstart[np.searchsorted(cstart, p, side="right") - 1]
            cand = np.flatnonzero(usable[c0:p])[-ANCHORS:] + c0
            anchor_of[cand] = seg[p]

        Ypad = padded(y, np.nan)  # every point's value window (also what aliases are told by)
        judged = taken & (kind >= 0) & finite & ~warm_r[pr]
        jr = np.flatnonzero(judged)
        nr = P
        det = _empty_det(nr, K_LAGS)
        if jr.size:
            Xw = padded(x, np.nan)[jr]
            Yw = Ypad[jr]
            Vw = padded(v, np.nan)[jr]
            Sw = padded(seg, -2)[jr]
            Aw = padded(anchor_of, -1)[jr]
            Uw = padded(usable, False)[jr] & ((Sw == seg[jr, None]) | (Aw == seg[jr, None]))
            sgn = np.where(kind[jr] == LOSS, -1.0, 1.0)
            d = lagged_detect(Xw, sgn[:, None] * Yw, Vw, Uw, _floor(kind[jr], y[jr]), K=K_LAGS)
            for name in det:
                det[name][jr] = getattr(d, name)
        res = self._decide(det, kind)
        have = judged & np.isfinite(res["expected"])
        bad = res["bad"]

        # firing, round by round, only where something happens
        by_round = np.argsort(pr, kind="stable")
        rb = np.searchsorted(pr[by_round], np.arange(R + 1))
        bad_rounds = set(np.unique(pr[bad]).tolist())
        alerts: List[Alert] = []
        n0 = self.n_probe
        rows_p = rows_c[pc]
        for r in range(R):
            if r not in bad_rounds and not self._dirty:
                continue
            sel = by_round[rb[r]:rb[r + 1]]
            if sel.size == 0:
                continue
            sub = {k2: a[sel] for k2, a in res.items()}
            alerts += self._fire_round(n0 + r + 1, int(steps[r]), tokens[r], phases[r], rows_p[sel], y[sel],
                                       bad[sel], have[sel], sub, None, clear_rows=rows_p[sel], windows=Ypad[sel])
        self.n_probe = n0 + R
        # leave the live state where round-by-round replay would have left it
        last = np.append(cstart[1:], P) - 1
        self.win.x[rows_c[pc[last]]] = padded(x, np.nan)[last]
        self.win.y[rows_c[pc[last]]] = Ypad[last]
        self.win.var[rows_c[pc[last]]] = padded(v, np.nan)[last]
        Sl = padded(seg, -2)[last]
        self.win.use[rows_c[pc[last]]] = padded(usable, False)[last] & ((Sl == seg_r[-1]) |
                                                                         (padded(anchor_of, -1)[last] == seg_r[-1]))
        self._seg[rows_c] = seg_r[-1]
        for r_ in rows_c:
            self.meta[r_]["seg"] = int(seg_r[-1])
        np.add.at(self._n, rows_p, 1)
        return alerts

    def _grow(self) -> None:
        """Per-row arrays of what every round reads (kept in step with self.meta)."""
        n0 = self._seg.shape[0]
        n = len(self.meta)
        if n == n0:
            return
        new = self.meta[n0:]
        self._seg = np.concatenate([self._seg, [-1 if m["seg"] is None else m["seg"] for m in new]]).astype(np.int64)
        self._taken = np.concatenate([self._taken, [bool(m["taken"]) for m in new]]).astype(bool)
        self._kind = np.concatenate([self._kind, [m["kind"] for m in new]]).astype(np.int64)
        self._n = np.concatenate([self._n, [m["n"] for m in new]]).astype(np.int64)
        self._pb = np.concatenate([self._pb, [m.get("pb", 0) for m in new]]).astype(np.int64)

    def _reset_arrays(self) -> None:
        self._seg = np.zeros(0, np.int64)
        self._taken = np.zeros(0, bool)
        self._kind = np.zeros(0, np.int64)
        self._n = np.zeros(0, np.int64)
        self._pb = np.zeros(0, np.int64)
        self._grow()

    def _cap_key(self, mt: Dict[str, Any]) -> str:
        return f"curve|{mt['key']}"

    def _classify(self, i, mt, y, res, n_sib, n_sib_bad) -> Tuple[str, str]:
        k = self.k
        noise, gain, lvl = res["noise"][i], res["gain"][i], res["level_last"][i]
        sgn = -1.0 if mt["kind"] == LOSS else 1.0
        # a stall: the frozen fit expected a clear gain and the curve holds the level it had
        # when the fit stopped (a drop would be below that level)
        if math.isfinite(gain) and math.isfinite(lvl) and gain > 2.0 * noise and sgn * y[i] > lvl - noise:
            return "capability_stall", "warning"
        if n_sib >= 2 and n_sib_bad * 2 < n_sib:
            return "sibling_divergence", "warning"
        z = res["z"][i]
        deep = math.isfinite(z) and z < -2 * k
        # critical = a capability-wide collapse: deep, and at least two other distinct tasks
        # of the capability (not just other formats of the same task) out of band too
        wide = (n_sib >= 2 and n_sib_bad >= 2 and n_sib_bad * 2 >= n_sib) or mt["key"].startswith("capability/")
        return "capability_regression", "critical" if (deep and wide) else "warning"

    def _curve_alert(self, rule, severity, step, tokens, phase, mt, obs, res, i, src, n_sib, n_sib_bad,
                     aka: Sequence[str] = ()) -> Alert:
        name = mt["task"] or mt["key"]
        what = f"{name} {mt['metric']}" if mt["metric"] else name
        cap = mt["cap"] or "unknown capability"
        exp, low, high, z, kr = res["expected"][i], res["low"][i], res["high"][i], res["z"][i], int(res["k"][i])
        first = {
            "capability_regression": "the data mixture and loader around this step (a shard or source change), "
                                     "the LR schedule, and loss/grad spikes in the last rounds; the capability's "
                                     "other tasks dropped too",
            "sibling_divergence": "this task's probe/eval itself (prompt format, tokenizer, truncation) and data "
                                  "specific to its domain (removed, deduplicated or contaminated); the other "
                                  f"{n_sib} tasks of {cap} are mostly on track",
            "capability_stall": "the LR (decayed too early or too low?), data repetition or an exhausted domain, "
                                "and the update/param ratio",
        }[rule]
        src_txt = {"own": f"own-run trend frozen {kr} rounds ago", "paired": "paired per-document change",
                   "reference": f"reference run {self.reference.name if self.reference else ''}"}.get(src, src)
        sib_txt = f"; {n_sib_bad}/{n_sib} sibling tasks also out of band" if n_sib else ""
        msg = (f"{what} ({cap}) is {obs:.4g}, expected {exp:.4g} from the {src_txt} (band [{low:.4g}, {high:.4g}], "
               f"{self.k:g} sigma; the last {kr} rounds average z={z:.1f}) in phase {phase}{sib_txt}"
               + (f"; the same values are reported as {', '.join(aka)}" if aka else "") + ". "
               f"Look first at: {first}.")
        return Alert(rule=rule, severity=severity, step=int(step), tokens=None if tokens is None else int(tokens),
                     run=self.run, source=self.source, model=self.model, capability=mt["cap"], task=mt["task"],
                     metric=mt["metric"] or mt["key"], observed=float(obs), expected=float(exp),
                     band=[float(low), float(high)], phase=phase, message=msg)

    # ---- per-step and stability findings -> alerts ---------------------------------------
    def _findings_to_alerts(self, findings: List[Finding], step: int, tokens: Optional[int], round_no: int,
                            scope: str) -> List[Alert]:
        out: List[Alert] = []
        fired_keys = set()
        for f in findings:
            key = f"{scope}|{f.rule}|{f.key}"
            fired_keys.add(key)
            if not self.book.update(key, True, round_no, hysteresis=1, cooldown=self.cooldown, severity=f.severity):
                continue
            band_txt = f", band [{f.band[0]:.4g}, {f.band[1]:.4g}]" if f.band else ""
            exp_txt = f", expected {f.expected:.4g}" if f.expected is not None else ""
            obs_txt = "nan" if f.observed is None else f"{f.observed:.4g}"
            msg = f"{f.metric} = {obs_txt}{exp_txt}{band_txt} in phase {self.phase}: {f.detail}"
            out.append(Alert(rule=f.rule, severity=f.severity, step=int(step),
                             tokens=None if tokens is None else int(tokens), run=self.run, source=self.source,
                             model=self.model, capability=None, task=None, metric=f.metric, observed=f.observed,
                             expected=f.expected, band=None if f.band is None else [float(b) for b in f.band],
                             phase=self.phase, message=msg))
        # conditions of this scope that were not raised this time are cleared
        for key in [k for k in self.book.s if k.startswith(scope + "|") and k not in fired_keys]:
            self.book.update(key, False, round_no, hysteresis=1, cooldown=self.cooldown, severity="warning")
        for a in out:
            self.alert_counts[a.rule] = self.alert_counts.get(a.rule, 0) + 1
        return out

    # ---- state ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        meta = []
        for mt in self.meta:
            m = dict(mt)
            m["calib"] = [float(c) for c in m["calib"]]
            meta.append(m)
        return {"version": STATE_VERSION, "run": self.run, "phases": self.phases.state_dict(),
                "step_rules": self.step_rules.state_dict(), "book": self.book.state_dict(),
                "windows": self.win.state_dict(), "meta": meta, "paired_anchor": self.paired_anchor,
                "n_probe": self.n_probe, "n_collect": self.n_collect, "alert_counts": dict(self.alert_counts)}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"alert engine state version {sd.get('version')!r} is not {STATE_VERSION}")
        self.phases.load_state_dict(sd["phases"])
        self.step_rules.load_state_dict(sd["step_rules"])
        self.book.load_state_dict(sd["book"])
        self.win = CurveWindows.from_state(sd["windows"])
        self.win.widen(WINDOW)  # a state saved with a narrower window keeps its points
        self._dirty = {k for k in self.book.s if k.startswith("curve|")}
        self.meta = [dict(m) for m in sd["meta"]]
        self._reset_arrays()
        self.paired_anchor = {k: dict(v) for k, v in sd.get("paired_anchor", {}).items()}
        self.n_probe = int(sd["n_probe"])
        self.n_collect = int(sd["n_collect"])
        self.alert_counts = dict(sd.get("alert_counts", {}))


__all__ = ["AlertEngine", "RuleBook", "ACC", "LOSS", "NEG"]


def takeoff_index(values: np.ndarray, var: np.ndarray, chance: Optional[float]) -> Optional[int]:
    """First index at which the engine starts judging an accuracy curve (the take-off rule
    of `_takeoff_live` / `observe_table`: 2 consecutive points above max(chance, first
    value) by max(3 sigma, 0.01)); None if it never does. Used by the alert-quality
    benchmark so faults are only injected where the engine judges by design."""
    y = np.asarray(values, dtype=float)
    if y.size == 0:
        return None
    base = max(chance, y[0]) if chance is not None else y[0]
    above = y > base + _takeoff_margin_vec(np.full(y.size, base), np.asarray(var, dtype=float))
    hit = np.flatnonzero(above[1:] & above[:-1])
    return int(hit[0] + 1) if hit.size else None
