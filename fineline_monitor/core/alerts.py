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

from fineline_monitor.core.expectations import (ACC, LOSS, NEG, ReferenceCurves, base_task, capability_for, chance_for,
                                                 fit_predict, metric_kind)
from fineline_monitor.core.history import CurveWindows
from fineline_monitor.core.phases import PhaseTracker
from fineline_monitor.core.rules import Finding, StepRules, probe_extra_rules
from fineline_monitor.core.types import Alert, ProbeRound

STATE_VERSION = 1
SEV_RANK = {"info": 0, "warning": 1, "critical": 2}
ASSUMED_DOCS = 500  # binomial noise for take-off checks when neither stderr nor n docs is known
MIN_POINTS = 6  # accepted points in the phase before an own-run fit is trusted
CALIB_POINTS = 5  # points that calibrate a reference run


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
        self.win = CurveWindows(width=16)
        self.emit_expectations = emit_expectations
        self._exp_rows: List[Dict[str, Any]] = []
        self.n_probe = 0
        self.n_collect = 0
        # per-curve metadata, aligned with the window rows
        self.meta: List[Dict[str, Any]] = []
        self.paired_anchor: Dict[str, Dict[str, float]] = {}  # task -> doc_id(str) -> gold logprob
        self.reference = reference
        if reference is None and getattr(cfg, "reference_csv", ""):
            reference = ReferenceCurves.from_csv(cfg.reference_csv, getattr(cfg, "reference_model", ""),
                                                 align=getattr(cfg, "reference_align", "tokens"),
                                                 total_tokens=float(getattr(cfg, "total_tokens", 0) or 0))
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
                chance.append(r.random_baseline if metric_kind(metric) == ACC and r.random_baseline > 0
                              else (chance_for(name) if metric_kind(metric) == ACC else None))
                ndocs.append(n)
        for cap, v in round.capability_scores.items():
            keys.append(f"capability/{cap}")
            tasks.append(None)
            metrics.append(None)
            caps.append(cap)
            vals.append(float(v))
            var.append(math.nan)
            chance.append(None)
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
        rows = self.win.rows(keys)
        while len(self.meta) < len(self.win):
            i = len(self.meta)
            key = self.win.keys[i]
            j = list(keys).index(key)
            metric = metrics[j] or "capability"
            kind = metric_kind(metric) if not key.startswith("capability/") else ACC
            ch = chance[j]
            self.meta.append({"key": key, "task": tasks[j], "metric": metrics[j], "cap": caps[j],
                              "base_task": base_task(tasks[j]) if tasks[j] else key,
                              "kind": -1 if kind is None else kind, "lo": ch, "base": None, "taken": kind != ACC,
                              "above": 0, "seg": None, "n": 0, "calib": [], "offset": None, "s_cal": None,
                              "x_cal": None})
        self._grow()
        y = np.asarray(values, dtype=np.float64)
        v = np.asarray(var, dtype=np.float64)
        x_val = math.log(tokens + 1.0) if tokens is not None and math.isfinite(tokens) else math.log(step + 1.0)
        fit_x = (tokens is not None and tokens > 0) or (tokens is None and step > 0)
        meta = [self.meta[r] for r in rows]
        kind = self._kind[rows]
        lo = self._lo_fit[rows]

        # new phase segment: a new fit. Decay/anneal keep their last accepted points as level
        # anchors (a regression right after the LR starts decaying is still visible).
        for i in np.flatnonzero(self._seg[rows] != seg):
            r = rows[i:i + 1]
            if self._seg[r[0]] >= 0 and phase in ("decay", "anneal"):
                used = np.flatnonzero(self.win.use[r[0]])
                keep = used[-4:]
                self.win.use[r[0]] = False
                self.win.use[r[0], keep] = True
            else:
                self.win.clear(r)
            self._seg[r[0]] = seg
            meta[i]["seg"] = seg

        # take-off: accuracy curves at chance are not judged
        finite = np.isfinite(y)
        for i in np.flatnonzero(~self._taken[rows] & finite):
            mt = meta[i]
            if mt["base"] is None:
                mt["base"] = max(mt["lo"], y[i]) if mt["lo"] is not None else y[i]
            p = min(max(mt["base"], 0.02), 0.98)
            sd = math.sqrt(v[i]) if math.isfinite(v[i]) else math.sqrt(p * (1 - p) / ASSUMED_DOCS)
            if y[i] > mt["base"] + max(3 * sd, 0.01):
                mt["above"] += 1
                if mt["above"] >= 2:
                    mt["taken"] = True
                    self._taken[rows[i]] = True
            else:
                mt["above"] = 0

        known_kind = kind >= 0
        # only curves that can be judged are fitted (curves at chance cost nothing)
        judged = self._taken[rows] & known_kind & finite & (phase != "warmup")
        nr = len(rows)
        expected, low, high, sigma = (np.full(nr, np.nan) for _ in range(4))
        growth = np.zeros(nr)
        ok = np.zeros(nr, dtype=bool)
        jr = np.flatnonzero(judged)
        if jr.size:
            rj = rows[jr]
            pr = fit_predict(self.win.x[rj], self.win.y[rj], self.win.var[rj], self.win.use[rj], kind[jr], lo[jr],
                             np.full(jr.size, x_val), v[jr], band_sigma=self.k, min_points=MIN_POINTS)
            expected[jr], low[jr], high[jr], sigma[jr], growth[jr], ok[jr] = (
                pr.expected, pr.low, pr.high, pr.sigma, pr.growth, pr.ok)
        source = np.array(["own"] * len(rows), dtype=object)

        # paired per-document differences (live): a fixed document set makes round-to-round
        # changes far less noisy than two independent accuracies
        if paired:
            for i, mt in enumerate(meta):
                if mt["metric"] != "gold_logprob" or not ok[i]:
                    continue
                task = mt["task"]
                cur, anc = paired.get(task), self.paired_anchor.get(task)
                if not cur or not anc:
                    continue
                common = [d for d in cur if str(d) in anc]
                if len(common) < 5:
                    continue
                d = np.array([cur[c] - anc[str(c)] for c in common])
                se = float(d.std(ddof=1) / math.sqrt(len(d)))
                anchor_mean = float(np.mean([anc[str(c)] for c in common]))
                cur_mean = float(np.mean([cur[c] for c in common]))
                g = growth[i]
                sp = math.sqrt(se * se + (0.25 * sigma[i]) ** 2)
                # expressed on this round's value scale: the anchor's level plus the expected change
                expected[i] = y[i] - (cur_mean - anchor_mean) + g
                sigma[i] = sp
                low[i], high[i] = expected[i] - self.k * sp, expected[i] + self.k * sp
                source[i] = "paired"

        # reference run: calibrate on early accepted points, then judge against it
        ref_bad = np.zeros(len(rows), dtype=bool)
        ref_ok = np.zeros(len(rows), dtype=bool)
        if self.reference is not None and tokens is not None:
            for i, mt in enumerate(meta):
                if not known_kind[i] or not finite[i] or mt["task"] is None:
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
                            mt["x_cal"] = float(tokens)
                            mt["ref_cal_value"] = rv
                    continue
                drift = 0.1 * abs(rv - mt.get("ref_cal_value", rv))
                s = math.sqrt(mt["s_cal"] ** 2 * (1 + 1 / CALIB_POINTS) + drift ** 2 +
                              (v[i] if math.isfinite(v[i]) else 0.0))
                e = rv + mt["offset"]
                sgn = 1.0 if mt["kind"] != LOSS else -1.0
                ref_ok[i] = True
                ref_bad[i] = sgn * (y[i] - e) / s < -self.k
                if not ok[i]:  # the reference is the expectation until the own fit is ready
                    expected[i], sigma[i] = e, s
                    low[i], high[i] = e - self.k * s, e + self.k * s
                    source[i] = "reference"

        have = ok | ref_ok
        sgn = np.where(kind == LOSS, -1.0, 1.0)
        with np.errstate(invalid="ignore"):
            bad_side = np.where(sgn > 0, y < low, y > high)
            good_side = np.where(sgn > 0, y > high, y < low)
            z = sgn * (y - expected) / sigma
        eligible = self._taken[rows] & (phase != "warmup") & known_kind & finite
        bad = eligible & have & bad_side
        # own fit in band but a calibrated reference says the curve drifted away: also bad
        # when the own fit agrees on the direction (protects against a schedule mismatch)
        bad |= eligible & ok & ref_bad & (np.nan_to_num(z) < -1.0)

        # quarantine bad points; accept a persistent shift after alerting on it
        accept_after = self.m + 3
        use_new = finite & fit_x & ~bad
        for i in np.flatnonzero(bad):
            if self.book.consec(self._cap_key(meta[i])) + 1 >= accept_after:
                use_new[i] = True
                self.win.unquarantine(rows[i:i + 1])
        self.win.push(rows, np.full(len(rows), x_val), y, v, use_new)
        self._n[rows] += 1
        if paired:
            for i, mt in enumerate(meta):
                if mt["metric"] == "gold_logprob" and use_new[i] and mt["task"] in paired:
                    self.paired_anchor[mt["task"]] = {str(k): float(val) for k, val in paired[mt["task"]].items()}

        if self.emit_expectations:
            for i in np.flatnonzero(have):
                self._exp_rows.append({"name": meta[i]["key"], "expected": float(expected[i]),
                                       "low": float(low[i]), "high": float(high[i])})

        # sibling context per (capability, metric): how many siblings are out of band
        groups: Dict[Tuple[Any, Any], List[int]] = {}
        if bad.any():
            for i in np.flatnonzero(eligible & have):
                mt = meta[i]
                if mt["cap"] and mt["task"] is not None:
                    groups.setdefault((mt["cap"], mt["metric"]), []).append(i)

        alerts: List[Alert] = []
        book = self.book.s
        for i in np.flatnonzero(bad):
            mt = meta[i]
            key = self._cap_key(mt)
            sib = [j for j in groups.get((mt["cap"], mt["metric"]), []) if j != i]
            sib_bases = {meta[j]["base_task"] for j in sib} - {mt["base_task"]}
            bad_bases = {meta[j]["base_task"] for j in sib if bad[j]} - {mt["base_task"]}
            rule, severity = self._classify(i, mt, y, expected, sigma, growth, len(sib_bases),
                                            len(bad_bases), z)
            if not self.book.update(key, True, self.n_probe, hysteresis=self.m, cooldown=self.cooldown,
                                    severity=severity):
                continue
            alerts.append(self._curve_alert(rule, severity, step, tokens, mt, y[i], expected[i], low[i], high[i],
                                            z[i], source[i], len(sib_bases), len(bad_bases), growth[i]))
        # conditions that cleared this round
        for i in np.flatnonzero(~bad):
            key = "curve|" + meta[i]["key"]
            if key in book:
                st = book[key]
                if st[0] and not bad[i]:
                    # back in band after a short excursion: the excluded points were noise,
                    # let the fit learn them so its scatter estimate stays honest
                    self.win.unquarantine(rows[i:i + 1])
                self.book.update(key, False, self.n_probe, hysteresis=self.m, cooldown=self.cooldown,
                                 severity="warning")
        for a in alerts:
            self.alert_counts[a.rule] = self.alert_counts.get(a.rule, 0) + 1
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
        self._lo_fit = np.concatenate([self._lo_fit, [0.0 if m["lo"] is None else m["lo"] for m in new]])
        self._n = np.concatenate([self._n, [m["n"] for m in new]]).astype(np.int64)

    def _reset_arrays(self) -> None:
        self._seg = np.zeros(0, np.int64)
        self._taken = np.zeros(0, bool)
        self._kind = np.zeros(0, np.int64)
        self._lo_fit = np.zeros(0)
        self._n = np.zeros(0, np.int64)
        self._grow()

    def _cap_key(self, mt: Dict[str, Any]) -> str:
        return f"curve|{mt['key']}"

    def _classify(self, i, mt, y, expected, sigma, growth, n_sib, n_sib_bad, z) -> Tuple[str, str]:
        k = self.k
        # a stall: the curve holds its last accepted level, the expectation moved on
        used = self.win.y[self.win.index[mt["key"]]][self.win.use[self.win.index[mt["key"]]]]
        last = float(used[-1]) if used.size else math.nan
        sgn = -1.0 if mt["kind"] == LOSS else 1.0
        held = math.isfinite(last) and sgn * (y[i] - last) > -1.0 * sigma[i]
        if held and growth[i] > 0.5 * k * sigma[i] / max(self.m, 1):
            return "capability_stall", "warning"
        if n_sib >= 2 and n_sib_bad * 2 < n_sib:
            return "sibling_divergence", "warning"
        deep = np.isfinite(z[i]) and z[i] < -2 * k
        # critical = a capability-wide collapse: deep, and at least two other distinct tasks
        # of the capability (not just other formats of the same task) out of band too
        wide = (n_sib >= 2 and n_sib_bad >= 2 and n_sib_bad * 2 >= n_sib) or mt["key"].startswith("capability/")
        return "capability_regression", "critical" if (deep and wide) else "warning"

    def _curve_alert(self, rule, severity, step, tokens, mt, obs, exp, low, high, z, src, n_sib, n_sib_bad,
                     growth) -> Alert:
        name = mt["task"] or mt["key"]
        what = f"{name} {mt['metric']}" if mt["metric"] else name
        cap = mt["cap"] or "unknown capability"
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
        src_txt = {"own": "own-run fit", "paired": "paired per-document change", "reference":
                   f"reference run {self.reference.name if self.reference else ''}"}.get(src, src)
        sib_txt = f"; {n_sib_bad}/{n_sib} sibling tasks also out of band" if n_sib else ""
        rounds = self.book.consec(self._cap_key(mt))
        msg = (f"{what} ({cap}) is {obs:.4g}, expected {exp:.4g} from the {src_txt} (band [{low:.4g}, {high:.4g}], "
               f"{self.k:g} sigma, z={z:.1f}) in phase {self.phase}, out of band for {rounds} rounds{sib_txt}. "
               f"Look first at: {first}.")
        return Alert(rule=rule, severity=severity, step=int(step), tokens=None if tokens is None else int(tokens),
                     run=self.run, source=self.source, model=self.model, capability=mt["cap"], task=mt["task"],
                     metric=mt["metric"] or mt["key"], observed=float(obs), expected=float(exp),
                     band=[float(low), float(high)], phase=self.phase, message=msg)

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
        self.meta = [dict(m) for m in sd["meta"]]
        self._reset_arrays()
        self.paired_anchor = {k: dict(v) for k, v in sd.get("paired_anchor", {}).items()}
        self.n_probe = int(sd["n_probe"])
        self.n_collect = int(sd["n_collect"])
        self.alert_counts = dict(sd.get("alert_counts", {}))


__all__ = ["AlertEngine", "RuleBook", "ACC", "LOSS", "NEG"]
