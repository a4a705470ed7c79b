"""AlertEngine: phases -> expectation sources -> rules -> alerts, live and offline.

One code path. `observe_table` judges a block of evaluation rounds of many curves; a live
probe round (`observe_probe` -> `observe_curves`) is a block of one round, and
`fineline-monitor analyze` passes a whole run as one block. Per block:

1. take-off: an accuracy curve is judged once it is `takeoff_sigma` sampling sigmas above
   max(chance, its first value) in two consecutive rounds (`takeoff_index` is the same
   rule on one curve);
2. windows: every new point gets the window of the `window` points ending at it (the
   curve's trailing points from earlier blocks, then the block's); a fit uses the points
   of the point's own phase segment, plus `decay_anchors` points of the previous segment
   when a decay or anneal phase starts;
3. expectation sources (`core/sources.py`), in registration order: the own-run frozen
   fit over the whole block at once, then per round the reference run and paired
   documents; their verdicts are combined into one per point;
4. rules (`core/rules.py`), round by round where something happens: single-point
   hysteresis, aliases (one curve reported under two names alerts once), sibling
   context, `classify`, then the `RuleBook` (cooldown, de-duplication, escalation).

Per-step indicators go through `observe_metrics` (`rules.StepRules`) and stability
indicators of a probe round through `probe_extra_rules`, both into the same `RuleBook`:
hysteresis 1 (a spike is one event), cooldown `cooldown_rounds` collections or rounds.
Everything is in `state_dict()`, so a restart neither forgets a fit nor re-pages.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fineline_monitor import metric_names as names
from fineline_monitor.core.config import DetectorParams
from fineline_monitor.core.expectations import (
    ACC,
    LOSS,
    NEG,
    ReferenceCurves,
    base_task,
    capability_for,
    chance_for,
    majority_for,
    metric_kind,
)
from fineline_monitor.core.history import TrailingPoints
from fineline_monitor.core.ladder import ladder_from_config
from fineline_monitor.core.phases import PhaseTracker
from fineline_monitor.core.rules import (
    Finding,
    RuleBook,
    StepRules,
    classify,
    probe_extra_rules,
    single_point_hysteresis,
)
from fineline_monitor.core.sources import (
    GOLD_LOGPROB,
    ExpectationSource,
    PointBlock,
    SourceContext,
    Verdict,
    build_sources,
)
from fineline_monitor.core.types import Alert, ProbeRound

STATE_VERSION = 3
DEFAULT_PARAMS = DetectorParams()
LOOK_FIRST = {
    "capability_regression": "the data mixture and loader around this step (a shard or source change), "
    "the LR schedule, and loss/grad spikes in the last rounds; the capability's "
    "other tasks dropped too",
    "sibling_divergence": "this task's probe/eval itself (prompt format, tokenizer, truncation) and data "
    "specific to its domain (removed, deduplicated or contaminated); the other "
    "{n_sib} tasks of {cap} are mostly on track",
    "capability_stall": "the LR (decayed too early or too low?), data repetition or an exhausted domain, "
    "and the update/param ratio",
}


@dataclass
class CurveState:
    """What the engine knows about one curve between rounds (its points are in
    `AlertEngine.points`, source-specific state in the sources)."""

    key: str  # probe/<task>/<metric> or capability/<capability>
    task: Optional[str]
    metric: Optional[str]
    capability: Optional[str]
    base_task: str  # formats of one task share it (siblings must be distinct tasks)
    kind: int  # ACC / LOSS / NEG; -1: no direction, never judged
    chance: Optional[float]  # accuracy without the capability (take-off), None unknown
    takeoff_base: Optional[float] = None  # max(chance, first value)
    above_takeoff: bool = False  # the last point was above the take-off margin
    taken_off: bool = False  # judged from now on
    single_point_run: int = 0  # consecutive bad single-point verdicts


@dataclass
class CurveTable:
    """Evaluation rounds of many curves: R rounds (step, tokens, the phase and segment the
    tracker was in), C curves, and points (curve index, round index, value, known
    variance; one point per curve and round at most). `paired`: per round, the gold
    log-probability of every document by task (or None)."""

    steps: Sequence[int]
    tokens: Sequence[Optional[float]]
    phases: Sequence[str]
    segments: Sequence[int]
    keys: Sequence[str]
    tasks: Sequence[Optional[str]]
    metrics: Sequence[Optional[str]]
    capabilities: Sequence[Optional[str]]
    chance: Sequence[Optional[float]]
    pt_curve: np.ndarray
    pt_round: np.ndarray
    pt_value: np.ndarray
    pt_var: np.ndarray
    paired: Optional[Sequence[Optional[Dict[str, Dict[Any, float]]]]] = None


def _capability_kind(key: str) -> Optional[int]:
    """A capability series' kind (`capability/<cap>/bpb` is loss-like, `.../acc_above_chance`
    accuracy-like; metric_names.capability_judged_as); None: recorded, not judged."""
    judged = names.capability_judged_as(key)
    return None if judged is None else {"loss": LOSS, "acc": ACC}[judged[2]]


def _noise_floor(kind: np.ndarray, y: np.ndarray, p: DetectorParams) -> np.ndarray:
    return np.where(
        kind == ACC,
        p.accuracy_noise_floor,
        p.relative_noise_floor * np.maximum(np.abs(np.nan_to_num(y)), 1e-3),
    )


def _takeoff_margin(
    base: np.ndarray, var: np.ndarray, p: DetectorParams = DEFAULT_PARAMS
) -> np.ndarray:
    """How far above its base an accuracy must be to count as taken off: `takeoff_sigma`
    sampling sigmas (binomial on `assumed_docs` documents when the variance is unknown)."""
    q = np.clip(np.nan_to_num(base), 0.02, 0.98)
    known = np.isfinite(var)
    sd = np.where(known, np.sqrt(np.where(known, var, 0.0)), np.sqrt(q * (1 - q) / p.assumed_docs))
    return np.maximum(p.takeoff_sigma * sd, p.takeoff_min_margin)


def takeoff_index(
    values: np.ndarray,
    var: np.ndarray,
    chance: Optional[float],
    params: DetectorParams = DEFAULT_PARAMS,
) -> Optional[int]:
    """First index at which the engine starts judging an accuracy curve (2 consecutive
    points above max(chance, first value) by the take-off margin); None if it never does.
    Used by the alert-quality benchmark so faults are only injected where the engine judges."""
    y = np.asarray(values, dtype=float)
    if y.size == 0:
        return None
    base = max(chance, y[0]) if chance is not None else y[0]
    above = y > base + _takeoff_margin(np.full(y.size, base), np.asarray(var, dtype=float), params)
    hit = np.flatnonzero(above[1:] & above[:-1])
    return int(hit[0] + 1) if hit.size else None


def alias_groups(windows: np.ndarray, metrics: Sequence[Any], min_points: int = 5) -> np.ndarray:
    """For rows of value windows (n, W), the index of the first row with the same metric and
    the very same values in every column (nan where the other is nan too), or the row
    itself. Why: trajectory tables report some evaluations twice under two names (OLMo's
    ladder tables have `arc_challenge` and `arc_challenge_rc_0shot`, ...); without this one
    event pages twice and an alias counts as a second sibling task out of band."""
    n = windows.shape[0]
    out = np.arange(n)
    if n < 2:
        return out
    fin = np.isfinite(windows)
    first: Dict[Tuple[Any, bytes, bytes], int] = {}
    for i in np.flatnonzero(fin.sum(1) >= min_points):
        key = (metrics[i], fin[i].tobytes(), np.where(fin[i], windows[i], 0.0).tobytes())
        out[i] = first.setdefault(key, i)
    return out


@dataclass
class _Block:
    """A table's points merged with the curves' trailing points from earlier blocks,
    grouped by curve, oldest first. `new` marks the table's points; `at` maps the table's
    points (sorted by curve, then round) to their merged index."""

    x: np.ndarray
    y: np.ndarray
    var: np.ndarray
    usable: np.ndarray
    segment: np.ndarray
    anchor: np.ndarray
    ref: np.ndarray  # a reference ladder's value at the point (nan: none)
    row: np.ndarray  # engine row of each merged point
    starts: np.ndarray  # merged index where each curve starts (per merged point)
    at: np.ndarray
    curve: np.ndarray  # table curve index per new point (sorted order)
    rnd: np.ndarray  # round index per new point
    width: int
    _pos: Optional[np.ndarray] = field(default=None, repr=False)
    _padded: Dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def window(self, name: str, idx: np.ndarray, fill: Any) -> np.ndarray:
        """The `width` values of field `name` ending at each merged index in `idx` (each
        curve is preceded by `width` - 1 slots of `fill`)."""
        W = self.width
        if self._pos is None:
            first = np.ones(self.row.size, dtype=bool)
            first[1:] = self.row[1:] != self.row[:-1]
            ci = np.cumsum(first)  # 1-based curve number
            self._pos = np.arange(self.row.size) + ci * (W - 1)
        if name not in self._padded:
            a = getattr(self, name)
            n_curves = (
                int(self._pos[-1] - self.row.size + 1) // (W - 1) if self.row.size and W > 1 else 0
            )
            out = np.full(a.size + n_curves * (W - 1), fill, dtype=a.dtype)
            out[self._pos] = a
            self._padded[name] = out
        return np.lib.stride_tricks.sliding_window_view(self._padded[name], W)[
            self._pos[idx] - (W - 1)
        ]


class AlertEngine:
    """Phase-aware expectations and alert rules for one run."""

    def __init__(
        self,
        cfg: Any,
        run: str,
        *,
        source: Optional[str] = None,
        model: Optional[str] = None,
        reference: Optional[ReferenceCurves] = None,
        references: Sequence[ReferenceCurves] = (),
        params: Optional[DetectorParams] = None,
        emit_expectations: bool = True,
        ladder: Any = None,
        run_params: Optional[float] = None,
    ):
        self.cfg = cfg
        self.run = run
        self.source, self.model = source, model
        self.params = params or getattr(cfg, "detector", None) or DEFAULT_PARAMS
        self.band_sigma = float(cfg.band_sigma)
        self.hysteresis = int(cfg.hysteresis)
        self.cooldown = int(cfg.cooldown_rounds)
        self.phases = PhaseTracker(cfg.phases, cfg.warmup_steps)
        self.step_rules = StepRules(cfg)
        self.book = RuleBook()
        self.points = TrailingPoints(width=self.params.window)
        self.curves: List[CurveState] = []
        self._dirty: set = set()  # curve conditions with rule-book state to clear when they recover
        self.emit_expectations = emit_expectations
        self._exp_rows: List[Dict[str, Any]] = []
        self.n_probe = 0
        self.n_collect = 0
        refs = list(references) + ([reference] if reference is not None else [])
        self.reference = refs[0] if refs else None
        notes: List[str] = []
        if ladder is None and not refs and hasattr(cfg, "reference"):
            # alerts.reference (or the older reference_csv): an unreadable file raises here,
            # a ladder that cannot be used as configured leaves a note and no ladder
            ladder, notes = ladder_from_config(cfg, run_params=run_params)
        self.ladder = ladder
        self.context = SourceContext(
            cfg, self.params, refs, ladder=ladder, run_params=run_params, notes=notes
        )
        self._notes_said = 0
        self.sources: List[ExpectationSource] = build_sources(self.context)
        self.alert_counts: Dict[str, int] = {}

    # ---- the monitor's interface ----------------------------------------------------------
    @property
    def phase(self) -> str:
        return self.phases.phase

    def observe_metrics(
        self, step: int, tokens: Optional[int], lr: Optional[float], metrics: Dict[str, float]
    ) -> List[Alert]:
        if lr is None:
            lr = metrics.get(names.LR)
        self.phases.observe(step, tokens, lr)
        self.n_collect += 1
        findings = self.step_rules.observe(step, metrics, self.phase)
        if self.emit_expectations and self.step_rules.last_expectation is not None:
            self._exp_rows.append(dict(self.step_rules.last_expectation))
            self.step_rules.last_expectation = None
        return self._findings_to_alerts(findings, step, tokens, self.n_collect, scope="step")

    def observe_probe(
        self, round: ProbeRound, extra: Optional[Dict[str, float]] = None
    ) -> List[Alert]:
        step, tokens = int(round.step), round.tokens
        self.phases.observe(step, tokens, None)
        cols: Dict[str, list] = {
            k: [] for k in ("keys", "tasks", "metrics", "caps", "vals", "var", "chance")
        }
        for name, r in round.tasks.items():
            mets = dict(r.metrics)
            gl = round.gold_logprobs.get(name) if round.gold_logprobs else None
            if gl and GOLD_LOGPROB not in mets:
                mets[GOLD_LOGPROB] = float(np.mean(list(gl.values())))
            for metric, v in mets.items():
                if metric_kind(metric) is not None:
                    _add(
                        cols,
                        names.probe_key(name, metric),
                        name,
                        metric,
                        r.capability or capability_for(name),
                        float(v),
                        _probe_variance(r, metric, float(v)),
                        _probe_chance(r, name, metric),
                    )
        for series_key, v in round.capability_scores.items():
            key = names.capability_key(series_key)
            judged = names.capability_judged_as(key)
            if judged is None:  # headline / took_off switch meaning: recorded, not judged
                continue
            se = (getattr(round, "capability_stderr", None) or {}).get(series_key)
            var = float(se) ** 2 if se is not None and math.isfinite(se) and se > 0 else math.nan
            _add(cols, key, None, judged[1], judged[0], float(v), var, judged[3])
        alerts = self.observe_curves(
            step,
            tokens,
            cols["keys"],
            cols["tasks"],
            cols["metrics"],
            cols["caps"],
            cols["vals"],
            cols["var"],
            cols["chance"],
            paired=round.gold_logprobs or None,
        )
        if extra:
            alerts += self._findings_to_alerts(
                probe_extra_rules(self.cfg, extra), step, tokens, self.n_probe, scope="probe"
            )
        return alerts

    def pop_notes(self) -> List[str]:
        """What the engine's sources found wrong with their input since the last call (each
        said once: a reference ladder that shares no curve with the run, ...)."""
        new = self.context.notes[self._notes_said :]
        self._notes_said = len(self.context.notes)
        return list(new)

    def pop_phase_changes(self) -> List[Dict[str, Any]]:
        return self.phases.pop_changes()

    def pop_expectations(self) -> List[Dict[str, Any]]:
        out, self._exp_rows = self._exp_rows, []
        return out

    def observe_curves(
        self,
        step: int,
        tokens: Optional[float],
        keys: Sequence[str],
        tasks: Sequence[Optional[str]],
        metrics: Sequence[Optional[str]],
        caps: Sequence[Optional[str]],
        values: Sequence[float],
        var: Sequence[float],
        chance: Sequence[Optional[float]],
        *,
        paired: Optional[Dict[str, Dict[Any, float]]] = None,
    ) -> List[Alert]:
        """One live evaluation round of many curves: a table of one round, in the phase
        the tracker is in now. `var` is the known sampling variance of each value
        (stderr^2, binomial, or nan when unknown); `chance` the chance accuracy (None when
        unknown)."""
        n = len(keys)
        table = CurveTable(
            steps=[step],
            tokens=[tokens],
            phases=[self.phases.phase],
            segments=[self.phases.segment],
            keys=keys,
            tasks=tasks,
            metrics=metrics,
            capabilities=caps,
            chance=chance,
            pt_curve=np.arange(n),
            pt_round=np.zeros(n, np.int64),
            pt_value=np.asarray(values, dtype=np.float64),
            pt_var=np.asarray(var, dtype=np.float64),
            paired=[paired],
        )
        return self.observe_table(table)

    # ---- the one path: a block of rounds -------------------------------------------------
    def observe_table(self, table: CurveTable) -> List[Alert]:
        """Judge R rounds of C curves (see the module docstring); live rounds and whole
        tables alike. Rounds are numbered on from the engine's probe-round count."""
        R, n0 = len(table.steps), self.n_probe
        if R == 0:
            return []
        self.n_probe = n0 + R
        if len(table.keys) == 0:
            return []
        rows_c = self._curve_rows(table)
        blk, y, v = self._merge(table, rows_c)
        taken = self._takeoff(table, rows_c, blk, y, v)
        points = self._judge_block(table, rows_c, blk, y, v, taken)
        alerts = self._rounds(table, n0, blk, points)
        self._keep_trailing(blk)
        return alerts

    def _curve_rows(self, table: CurveTable) -> np.ndarray:
        rows = self.points.rows(table.keys)
        pos = {k: j for j, k in enumerate(table.keys)}
        while len(self.curves) < len(self.points):
            key = self.points.keys[len(self.curves)]
            self.curves.append(self._new_curve(key, pos[key], table))
        return rows

    @staticmethod
    def _new_curve(key: str, j: int, table: CurveTable) -> CurveState:
        task, metric = table.tasks[j], table.metrics[j]
        cap_key = names.split_capability_key(key) is not None
        kind = _capability_kind(key) if cap_key else metric_kind(metric or "capability")
        return CurveState(
            key=key,
            task=task,
            metric=metric,
            capability=table.capabilities[j],
            base_task=base_task(task) if task else key,
            kind=-1 if kind is None else kind,
            chance=table.chance[j],
            taken_off=kind != ACC,
        )

    def _merge(
        self, table: CurveTable, rows_c: np.ndarray
    ) -> Tuple[_Block, np.ndarray, np.ndarray]:
        """The table's points (sorted by curve, then round) after each curve's trailing
        points from earlier blocks. Returns the block and the new points' values and
        variances (sorted)."""
        order = np.lexsort((table.pt_round, table.pt_curve))
        pc, pr = np.asarray(table.pt_curve)[order], np.asarray(table.pt_round)[order]
        y = np.asarray(table.pt_value, dtype=float)[order]
        v = np.asarray(table.pt_var, dtype=float)[order]
        steps = np.asarray(table.steps, dtype=float)
        tok = np.array([np.nan if t is None else float(t) for t in table.tokens])
        x_r = np.where(np.isfinite(tok), np.log(np.nan_to_num(tok) + 1.0), np.log(steps + 1.0))
        fitx_r = np.where(np.isfinite(tok), tok > 0, steps > 0)
        seg_r = np.asarray(table.segments, dtype=np.int64)
        T = self.points
        cu = np.unique(pc)
        hist_rows = rows_c[cu]
        have = np.isfinite(T.x[hist_rows, 1:])  # the W-1 newest stored points
        hr, hs = np.nonzero(have)
        # merged order: by curve, stored points (seq < 0) before the table's (seq = round)
        curve_all = np.concatenate([cu[hr], pc])
        seq = np.concatenate([hs - T.width, pr])
        m = np.lexsort((seq, curve_all))
        hist = (hist_rows[hr], hs + 1)
        new_vals = {
            "x": x_r[pr],
            "y": y,
            "var": v,
            "usable": np.isfinite(y) & fitx_r[pr],
            "segment": seg_r[pr],
            "anchor": np.full(pc.size, -1, dtype=np.int64),
            "ref": self._reference_series(rows_c, pc, steps[pr], tok[pr]),
        }
        arrays = {f: np.concatenate([getattr(T, f)[hist], new_vals[f]])[m] for f in new_vals}
        row = np.concatenate([hist_rows[hr], rows_c[pc]])[m]
        at = np.empty(pc.size, dtype=np.int64)
        at[m[m >= hr.size] - hr.size] = np.flatnonzero(m >= hr.size)
        first = np.ones(row.size, dtype=bool)
        first[1:] = row[1:] != row[:-1]
        starts = np.maximum.accumulate(np.where(first, np.arange(row.size), 0))
        blk = _Block(row=row, starts=starts, at=at, curve=pc, rnd=pr, width=T.width, **arrays)
        self._mark_anchors(table, blk)
        return blk, y, v

    def _reference_series(
        self, rows_c: np.ndarray, pc: np.ndarray, steps: np.ndarray, tokens: np.ndarray
    ) -> np.ndarray:
        """A reference's value at every new point (kept with the point, so a later round's
        window has it), from the first source that gives one; nan elsewhere."""
        for s in self.sources:
            if s.gives_series:
                return s.series([self.curves[r] for r in rows_c[pc]], pc, steps, tokens)
        return np.full(pc.size, np.nan)

    def _mark_anchors(self, table: CurveTable, blk: _Block) -> None:
        """Where a curve enters a decay or anneal segment, its last `decay_anchors` usable
        points before it anchor the new segment's level."""
        decay_r = np.array([p in ("decay", "anneal") for p in table.phases])
        idx = blk.at
        prev_seg = np.where(
            idx > blk.starts[idx], blk.segment[np.maximum(idx - 1, 0)], blk.segment[idx]
        )
        n_anchor = self.params.decay_anchors
        if n_anchor == 0:
            return
        for p in idx[(blk.segment[idx] != prev_seg) & decay_r[blk.rnd]].tolist():
            c0 = int(blk.starts[p])
            cand = np.flatnonzero(blk.usable[c0:p])[-n_anchor:] + c0
            blk.anchor[cand] = blk.segment[p]

    def _takeoff(
        self, table: CurveTable, rows_c: np.ndarray, blk: _Block, y: np.ndarray, v: np.ndarray
    ) -> np.ndarray:
        """Whether each new point's curve has taken off by then (non-accuracy curves always
        have); updates the curves' take-off state."""
        pc = blk.curve
        P = pc.size
        curves = [self.curves[r] for r in rows_c]
        waiting = np.array([not c.taken_off for c in curves])
        if not waiting.any():
            return np.ones(P, dtype=bool)
        first = np.ones(P, dtype=bool)
        first[1:] = pc[1:] != pc[:-1]
        fin = np.isfinite(y)
        for p in np.flatnonzero(fin & waiting[pc]):
            c = curves[pc[p]]
            if c.takeoff_base is None:
                c.takeoff_base = max(c.chance, float(y[p])) if c.chance is not None else float(y[p])
        base = np.array([np.nan if c.takeoff_base is None else c.takeoff_base for c in curves])[pc]
        above = fin & (y > base + _takeoff_margin(base, v, self.params))
        prev = np.zeros(P, dtype=bool)
        prev[1:] = above[:-1] & ~first[1:]
        prev[first] = [curves[c].above_takeoff for c in pc[first]]
        hit = np.flatnonzero(above & prev & waiting[pc])
        tk_first = np.full(len(curves), P + 1)
        cu, at = np.unique(pc[hit], return_index=True)
        tk_first[cu] = hit[at]
        last = np.append(np.flatnonzero(first)[1:], P) - 1
        for p in last:
            curves[pc[p]].above_takeoff = bool(above[p])
        for c in np.flatnonzero(waiting & (tk_first <= P)):
            curves[c].taken_off = True
        return ~waiting[pc] | (np.arange(P) >= tk_first[pc])

    def _judge_block(
        self,
        table: CurveTable,
        rows_c: np.ndarray,
        blk: _Block,
        y: np.ndarray,
        v: np.ndarray,
        taken: np.ndarray,
    ) -> PointBlock:
        """The new points as one `PointBlock`: which are judged (taken off, a known
        direction, finite, outside warmup) and the windows of those."""
        kind = np.array([self.curves[r].kind for r in rows_c], dtype=np.int64)[blk.curve]
        warm = np.array([p == "warmup" for p in table.phases])[blk.rnd]
        judged = taken & (kind >= 0) & np.isfinite(y) & ~warm
        jm = blk.at[judged]
        seg = blk.segment[jm][:, None]
        U = blk.window("usable", jm, False) & (
            (blk.window("segment", jm, -2) == seg) | (blk.window("anchor", jm, -1) == seg)
        )
        sgn = np.where(kind[judged] == LOSS, -1.0, 1.0)
        windows = {
            "X": blk.window("x", jm, np.nan),
            "G": sgn[:, None] * blk.window("y", jm, np.nan),
            "V": blk.window("var", jm, np.nan),
            "U": U,
            "floor": _noise_floor(kind[judged], y[judged], self.params),
            "R": sgn[:, None] * blk.window("ref", jm, np.nan),
        }
        return PointBlock(
            curves=[self.curves[r] for r in rows_c[blk.curve]],
            y=y,
            var=v,
            kind=kind,
            taken=taken,
            eligible=judged,
            windows=windows,
        )

    def _rounds(self, table: CurveTable, n0: int, blk: _Block, points: PointBlock) -> List[Alert]:
        """Combine the sources' verdicts and fire, round by round, only where something
        can happen (a bad verdict, a condition to clear, a per-round source, a count)."""
        whole = self._whole_block(points)
        own = self.sources[0].name
        R = len(table.steps)
        by_round = np.argsort(blk.rnd, kind="stable")
        bounds = np.searchsorted(blk.rnd[by_round], np.arange(R + 1))
        busy = set(np.unique(blk.rnd[whole[own].bad]).tolist())
        for name, vd in whole.items():
            if name != own:
                busy |= set(np.unique(blk.rnd[vd.has]).tolist())
        per_round = [s for s in self.sources if s.per_round]
        alerts: List[Alert] = []
        for r in range(R):
            sel = by_round[bounds[r] : bounds[r + 1]]
            if sel.size == 0:
                continue
            header = _round_header(table, r)
            active = [s for s in per_round if s.active(header)]
            pending = any(c.single_point_run for c in self.curves)
            if not (self.emit_expectations or active or pending or self._dirty or r in busy):
                continue
            alerts += self._round(header, n0 + r + 1, sel, blk, points, whole, active)
        return alerts

    def _whole_block(self, points: PointBlock) -> Dict[str, Verdict]:
        """Verdicts of the sources that judge a whole block at once (the first of them, the
        own-run fit, is what the later ones see as `so_far`)."""
        out: Dict[str, Verdict] = {}
        base: Optional[Verdict] = None
        for s in self.sources:
            if s.per_round:
                continue
            out[s.name] = s.evaluate(
                points,
                base if base is not None else Verdict.empty(len(points)),
                np.ones(len(points), dtype=bool),
            )
            base = base if base is not None else out[s.name]
        return out

    def _round(
        self,
        header: PointBlock,
        round_no: int,
        sel: np.ndarray,
        blk: _Block,
        points: PointBlock,
        whole: Dict[str, Verdict],
        active: List[ExpectationSource],
    ) -> List[Alert]:
        """One round: combine the verdicts, single-point hysteresis, learn, fire."""
        rb = replace(
            header,
            curves=[points.curves[i] for i in sel],
            y=points.y[sel],
            var=points.var[sel],
            kind=points.kind[sel],
            taken=points.taken[sel],
            eligible=points.eligible[sel],
        )
        combined, shown_by, point_judged, point_bad = self._combine(rb, sel, whole, active)
        runs, sp_bad = single_point_hysteresis(
            np.array([c.single_point_run for c in rb.curves], dtype=np.int64),
            point_judged,
            point_bad,
            rb.eligible,
            self.hysteresis,
        )
        for c, n in zip(rb.curves, runs.tolist()):
            c.single_point_run = int(n)
        bad = combined.bad | sp_bad
        for s in self.sources:
            s.commit(rb, bad)
        if self.emit_expectations:
            for i in np.flatnonzero(np.isfinite(combined.expected)):
                self._exp_rows.append(
                    {
                        "name": rb.curves[i].key,
                        "expected": float(combined.expected[i]),
                        "low": float(combined.low[i]),
                        "high": float(combined.high[i]),
                    }
                )
        have = rb.eligible & np.isfinite(combined.expected)
        windows = blk.window("y", blk.at[sel], np.nan) if bad.any() else None
        return self._fire_round(round_no, rb, bad, have, combined, shown_by, windows)

    def _combine(
        self,
        rb: PointBlock,
        sel: np.ndarray,
        whole: Dict[str, Verdict],
        active: List[ExpectationSource],
    ):
        """Ask the sources in order. The first (sustained) source's verdict is the base; a
        later source's expected value and band replace it where it takes over, and the point
        is then closed to the sources after it; single-point verdicts are collected for the
        hysteresis count."""
        n = len(rb)
        combined: Optional[Verdict] = None
        shown_by = np.full(n, "", dtype=object)
        open_ = np.ones(n, dtype=bool)
        judged, bad = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        for s in self.sources:
            if combined is None:
                combined = whole[s.name].subset(sel)
                shown_by[:] = s.name
                continue
            if s.per_round and s not in active:
                continue
            vd = s.evaluate(rb, combined, open_) if s.per_round else whole[s.name].subset(sel)
            vd.has &= open_
            if s.sustained:
                combined.bad |= vd.bad & vd.has
            else:
                judged |= vd.has
                bad |= vd.bad & vd.has
            shown = vd.has & (
                (s.takes_over == "always")
                | ((s.takes_over == "where_missing") & ~np.isfinite(combined.expected))
            )
            if s.sustained:
                # a point an earlier source found bad keeps that source's expectation unless
                # this one finds it bad too (an alert shows the band the value left)
                shown &= ~combined.bad | (vd.bad & vd.has)
            for f in ("expected", "low", "high", "z"):
                getattr(combined, f)[shown] = getattr(vd, f)[shown]
            for f in ("lag", "noise", "gain", "level_last"):  # what the shown verdict was judged on
                mine, theirs = getattr(vd, f), getattr(combined, f)
                if mine is not None and theirs is not None:
                    theirs[shown] = mine[shown]
            shown_by[shown] = s.name
            open_ &= ~shown
        return combined, shown_by, judged, bad

    def _keep_trailing(self, blk: _Block) -> None:
        """Store each curve's newest `width` points for the next block."""
        T = self.points
        last = np.append(np.flatnonzero(np.diff(blk.row)) + 1, blk.row.size) - 1
        rows = blk.row[last]
        for f in T.FIELDS:
            fill = {
                "x": np.nan,
                "y": np.nan,
                "var": np.nan,
                "usable": False,
                "segment": -2,
                "anchor": -1,
                "ref": np.nan,
            }[f]
            getattr(T, f)[rows] = blk.window(f, last, fill)

    # ---- firing ----------------------------------------------------------------------------
    def _fire_round(
        self,
        round_no: int,
        rb: PointBlock,
        bad: np.ndarray,
        have: np.ndarray,
        verdict: Verdict,
        shown_by: np.ndarray,
        windows: Optional[np.ndarray],
    ) -> List[Alert]:
        """De-duplication, cooldown, sibling context and severity for one round's points.
        Aliases (identical value windows, `alias_groups`) alert once, naming both, and
        count as one sibling; conditions of points not bad this round are cleared."""
        curves = rb.curves
        canon, group_bad = self._aliases(rb, bad, have, windows)
        alerts: List[Alert] = []
        if bad.any():
            groups: Dict[Tuple[Any, Any], List[int]] = {}
            for i in np.flatnonzero((have | bad) & (canon == np.arange(len(rb)))):
                if curves[i].capability and curves[i].task is not None:
                    groups.setdefault((curves[i].capability, curves[i].metric), []).append(i)
            for i in np.flatnonzero(group_bad & (canon == np.arange(len(rb)))):
                alert = self._fire_group(
                    round_no, rb, int(i), canon, bad, group_bad, groups, verdict, shown_by
                )
                if alert is not None:
                    alerts.append(alert)
        if self._dirty:
            for i in np.flatnonzero(~group_bad):
                key = _condition(curves[i])
                if key in self._dirty:
                    self.book.update(
                        key,
                        False,
                        round_no,
                        hysteresis=1,
                        cooldown=self.cooldown,
                        severity="warning",
                    )
                    if self.book.settled(key):
                        self._dirty.discard(key)
        for i in np.flatnonzero(group_bad):
            self._dirty.add(_condition(curves[canon[i]]))
        return alerts

    def _aliases(
        self, rb: PointBlock, bad: np.ndarray, have: np.ndarray, windows: Optional[np.ndarray]
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Each point's alias group representative (the curve with the lowest engine row:
        a stable condition key round after round) and whether its group is bad (any
        name's verdict: their sources can differ, a reference known under one name only)."""
        n = len(rb)
        canon = np.arange(n)
        if bad.any() and windows is not None:
            order = np.array([self.points.index[c.key] for c in rb.curves])
            cand = np.flatnonzero(have | bad)
            cand = cand[np.argsort(order[cand], kind="stable")]
            canon[cand] = cand[
                alias_groups(
                    windows[cand], [rb.curves[i].metric for i in cand], self.params.alias_min_points
                )
            ]
        group_bad = np.zeros(n, dtype=bool)
        group_bad[canon[bad]] = True
        return canon, group_bad[canon]

    def _fire_group(
        self,
        round_no: int,
        rb: PointBlock,
        i: int,
        canon: np.ndarray,
        bad: np.ndarray,
        group_bad: np.ndarray,
        groups: Dict[Tuple[Any, Any], List[int]],
        verdict: Verdict,
        shown_by: np.ndarray,
    ) -> Optional[Alert]:
        curves, c = rb.curves, rb.curves[i]
        members = np.flatnonzero(canon == i)
        src = i if bad[i] else int(members[bad[members]][0])  # the name whose verdict is bad
        aka = [curves[j].task or curves[j].key for j in members if j != i]
        sib = [j for j in groups.get((c.capability, c.metric), []) if j != i]
        sib_bases = {curves[j].base_task for j in sib} - {c.base_task}
        bad_bases = {curves[j].base_task for j in sib if group_bad[j]} - {c.base_task}
        sgn = -1.0 if c.kind == LOSS else 1.0
        judgement = classify(
            observed_good=sgn * rb.y[src],
            noise=verdict.noise[src],
            gain=verdict.gain[src],
            level_last=verdict.level_last[src],
            z=verdict.z[src],
            band_sigma=self.band_sigma,
            n_siblings=len(sib_bases),
            n_siblings_bad=len(bad_bases),
            capability_wide=names.split_capability_key(c.key) is not None,
        )
        key = _condition(c)
        if not self.book.update(
            key, True, round_no, hysteresis=1, cooldown=self.cooldown, severity=judgement.severity
        ):
            return None
        self._dirty.add(key)
        self.alert_counts[judgement.rule] = self.alert_counts.get(judgement.rule, 0) + 1
        source = self._source(shown_by[src])
        return self._curve_alert(
            judgement.rule,
            judgement.severity,
            rb,
            c,
            src,
            verdict,
            source.describe(verdict, src),
            len(sib_bases),
            len(bad_bases),
            aka,
        )

    def _source(self, name: str) -> ExpectationSource:
        return next(s for s in self.sources if s.name == name)

    def _curve_alert(
        self,
        rule: str,
        severity: str,
        rb: PointBlock,
        c: CurveState,
        i: int,
        verdict: Verdict,
        source_text: str,
        n_sib: int,
        n_sib_bad: int,
        aka: Sequence[str],
    ) -> Alert:
        name = c.task or c.key
        what = f"{name} {c.metric}" if c.metric else name
        cap = c.capability or "unknown capability"
        obs, exp, low, high, z = (
            rb.y[i],
            verdict.expected[i],
            verdict.low[i],
            verdict.high[i],
            verdict.z[i],
        )
        lag = int(verdict.lag[i]) if verdict.lag is not None else 1
        look = LOOK_FIRST[rule].format(n_sib=n_sib, cap=cap)
        sib_txt = f"; {n_sib_bad}/{n_sib} sibling tasks also out of band" if n_sib else ""
        if source_text.startswith("ladder"):
            lead = (
                f"{what} ({cap}): expected from {source_text}: {exp:.4g}, observed {obs:.4g} (band "
                f"[{low:.4g}, {high:.4g}], {self.params.ladder_band_sigma:g} sigma of the residual from the "
                f"ladder; the last {lag} rounds average z={z:.1f})"
            )
        else:
            lead = (
                f"{what} ({cap}) is {obs:.4g}, expected {exp:.4g} from the {source_text} (band [{low:.4g}, "
                f"{high:.4g}], {self.band_sigma:g} sigma; the last {lag} rounds average z={z:.1f})"
            )
        msg = (
            f"{lead} in phase {rb.phase}{sib_txt}"
            + (f"; the same values are reported as {', '.join(aka)}" if aka else "")
            + f". Look first at: {look}."
        )
        tokens = rb.tokens
        return Alert(
            rule=rule,
            severity=severity,
            step=int(rb.step),
            tokens=None if tokens is None else int(tokens),
            run=self.run,
            source=self.source,
            model=self.model,
            capability=c.capability,
            task=c.task,
            metric=c.metric or c.key,
            observed=float(obs),
            expected=float(exp),
            band=[float(low), float(high)],
            phase=rb.phase,
            message=msg,
        )

    # ---- per-step and stability findings -> alerts ---------------------------------------
    def _findings_to_alerts(
        self, findings: List[Finding], step: int, tokens: Optional[int], round_no: int, scope: str
    ) -> List[Alert]:
        out: List[Alert] = []
        fired_keys = set()
        for f in findings:
            key = f"{scope}|{f.rule}|{f.key}"
            fired_keys.add(key)
            if not self.book.update(
                key, True, round_no, hysteresis=1, cooldown=self.cooldown, severity=f.severity
            ):
                continue
            band_txt = f", band [{f.band[0]:.4g}, {f.band[1]:.4g}]" if f.band else ""
            exp_txt = f", expected {f.expected:.4g}" if f.expected is not None else ""
            obs_txt = "nan" if f.observed is None else f"{f.observed:.4g}"
            msg = f"{f.metric} = {obs_txt}{exp_txt}{band_txt} in phase {self.phase}: {f.detail}"
            out.append(
                Alert(
                    rule=f.rule,
                    severity=f.severity,
                    step=int(step),
                    tokens=None if tokens is None else int(tokens),
                    run=self.run,
                    source=self.source,
                    model=self.model,
                    capability=None,
                    task=None,
                    metric=f.metric,
                    observed=f.observed,
                    expected=f.expected,
                    band=None if f.band is None else [float(b) for b in f.band],
                    phase=self.phase,
                    message=msg,
                )
            )
        # conditions of this scope that were not raised this time are cleared
        for key in [k for k in self.book.keys_with_prefix(scope + "|") if k not in fired_keys]:
            self.book.update(
                key, False, round_no, hysteresis=1, cooldown=self.cooldown, severity="warning"
            )
        for a in out:
            self.alert_counts[a.rule] = self.alert_counts.get(a.rule, 0) + 1
        return out

    # ---- state ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "run": self.run,
            "phases": self.phases.state_dict(),
            "step_rules": self.step_rules.state_dict(),
            "rules": self.book.state_dict(),
            "points": self.points.state_dict(),
            "curves": [asdict(c) for c in self.curves],
            "sources": {s.name: s.state_dict() for s in self.sources},
            "n_probe": self.n_probe,
            "n_collect": self.n_collect,
            "alert_counts": dict(self.alert_counts),
        }

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Loads state version 3 and version 2 (`_upgrade_v2`)."""
        if sd.get("version") == 2:
            sd = _upgrade_v2(sd)
        if sd.get("version") != STATE_VERSION:
            raise ValueError(
                f"alert engine state version {sd.get('version')!r} is not {STATE_VERSION} (or 2)"
            )
        self.phases.load_state_dict(sd["phases"])
        self.step_rules.load_state_dict(sd["step_rules"])
        self.book.load_state_dict(sd["rules"])
        self.curves = [CurveState(**c) for c in sd["curves"]]
        self.points = TrailingPoints.from_state(sd["points"])
        self.points.widen(
            self.params.window
        )  # a state saved with a narrower window keeps its points
        self._dirty = set(self.book.keys_with_prefix("curve|"))
        for s in self.sources:
            s.load_state_dict(sd.get("sources", {}).get(s.name, {}))
        self.n_probe = int(sd["n_probe"])
        self.n_collect = int(sd["n_collect"])
        self.alert_counts = dict(sd.get("alert_counts", {}))


def _upgrade_v2(sd: Dict[str, Any]) -> Dict[str, Any]:
    """State version 2 -> 3: curve metadata dicts become `CurveState`s, reference
    calibrations and paired anchors move to their sources, windows gain segments."""
    curves, calibration = [], {}
    for m in sd["meta"]:
        curves.append(
            asdict(
                CurveState(
                    key=m["key"],
                    task=m["task"],
                    metric=m["metric"],
                    capability=m["cap"],
                    base_task=m["base_task"],
                    kind=int(m["kind"]),
                    chance=m["lo"],
                    takeoff_base=m["base"],
                    above_takeoff=int(m["above"]) >= 1,
                    taken_off=bool(m["taken"]),
                    single_point_run=int(m.get("pb", 0)),
                )
            )
        )
        if m.get("calib") or m.get("offset") is not None:
            calibration[m["key"]] = {
                "residuals": list(m.get("calib") or []),
                "offset": m.get("offset"),
                "scatter": m.get("s_cal"),
                "reference_at_calibration": m.get("ref_cal_value"),
            }
    segments = [-1 if m["seg"] is None else int(m["seg"]) for m in sd["meta"]]
    points = TrailingPoints.from_state(
        sd["windows"], segments=segments[: len(sd["windows"]["keys"])]
    ).state_dict()
    return {
        "version": 3,
        "run": sd.get("run"),
        "phases": sd["phases"],
        "step_rules": sd["step_rules"],
        "rules": sd["book"],
        "points": points,
        "curves": curves,
        "sources": {
            "reference": {"calibration": calibration},
            "paired": {"anchors": sd.get("paired_anchor", {})},
        },
        "n_probe": sd["n_probe"],
        "n_collect": sd["n_collect"],
        "alert_counts": sd.get("alert_counts", {}),
    }


def _round_header(table: CurveTable, r: int) -> PointBlock:
    """Round r of a table as a `PointBlock` without points (what `active` reads)."""
    e = np.zeros(0)
    return PointBlock(
        curves=[],
        y=e,
        var=e,
        kind=e,
        taken=e,
        eligible=e,
        step=int(table.steps[r]),
        tokens=table.tokens[r],
        phase=table.phases[r],
        paired=table.paired[r] if table.paired else None,
    )


def _condition(c: CurveState) -> str:
    return f"curve|{c.key}"


def _add(
    cols: Dict[str, list],
    key: str,
    task: Optional[str],
    metric: Optional[str],
    cap: Optional[str],
    value: float,
    var: float,
    chance: Optional[float],
) -> None:
    for name, v in zip(
        ("keys", "tasks", "metrics", "caps", "vals", "var", "chance"),
        (key, task, metric, cap, value, var, chance),
    ):
        cols[name].append(v)


def _probe_variance(r: Any, metric: str, value: float) -> float:
    """A probe value's sampling variance: its stderr squared, else binomial on its
    documents for accuracies, else unknown (nan)."""
    se = r.stderr.get(metric) if r.stderr else None
    n = r.n_docs or 0
    if se is not None and math.isfinite(se) and se > 0:
        return float(se) ** 2
    if metric_kind(metric) == ACC and n > 0:
        p = min(max(value, 0.02), 0.98)
        return p * (1 - p) / n
    return math.nan


def _probe_chance(r: Any, name: str, metric: str) -> Optional[float]:
    """A probe's chance accuracy is 1/choices; a task where always giving the same answer
    scores more (yes/no tasks: BoolQ 0.62) has not taken off until it beats that (the
    probe's own documents, `constant_baseline`, or by name, `majority_for`)."""
    if metric_kind(metric) != ACC:
        return None
    if r.random_baseline > 0:
        return max(r.random_baseline, r.constant_baseline, majority_for(name) or 0.0)
    return chance_for(name)


__all__ = [
    "AlertEngine",
    "CurveState",
    "CurveTable",
    "RuleBook",
    "takeoff_index",
    "alias_groups",
    "ACC",
    "LOSS",
    "NEG",
]
