"""Alert quality on real pretraining trajectories with injected faults.

    .venv/bin/python benchmarks/alert_quality.py --data ../shared/reference-trajectories/dev.csv.gz

Everything goes through `fineline_monitor.analyze.replay_run`, i.e. the live AlertEngine
with default AlertConfig (no benchmark-specific settings).

Hold-out split (deterministic, by model size, so no run of a held-out size was looked at
while tuning): HELD OUT = OLMo ladder 370M, 1B and 3B runs (final, const and decay) and
Pythia 410m and 1.4b (standard, deduped, batch-size variants); TUNE = everything else
(OLMo 190M, 600M, 760M; Pythia 70m, 160m, 1b). Figures are reported for `--split heldout`;
`--split tune` shows the tuning side. The default, `--split auto`, is `heldout` on a table
that holds runs we tuned on (a tune-split model of one of the dev table's sources) and
`all` otherwise: every run of a table nobody here has seen is held out, and a size filter
made for the dev table would drop most of it (or all: a 7B-only table has no held-out size).

Healthy figures: every run of the split replayed as is.
- criticals on healthy runs (target 0);
- warnings per 50 healthy rounds, counted two ways: per run-round (one checkpoint
  evaluation of a whole run, all its ~90-200 curves at once: what a person on call sees,
  and the unit the issue's target is judged in here) and per curve-round (one evaluation
  of one (task, metric) curve; the unit faults are injected into; ~100-200x more lenient).

Injected faults (one per selected curve and kind, applied from round t0 on, on the
bad side: accuracy down, bpb/ppl up). Magnitudes are relative to the curve's own noise
and range, because a fault smaller than the noise is detectable by nobody:
- sigma = 1.4826 * MAD(first differences) / sqrt(2): the round-to-round noise of the
  healthy curve (differences cancel the trend);
- R = the 5-95% range of the curve after a running median of 5 (its real movement);
- drop:  a sustained offset of max(8 sigma, 0.10 R) from t0 on;
- drift: a deficit growing linearly, reaching max(10 sigma, 0.15 R) at round t0+2 and
  continuing at the same rate;
- stall: the curve holds its smoothed level of round t0-1 (its noise kept) while the
  healthy curve would have improved; only injected where the healthy smoothed curve
  gains at least 8 sigma over rounds t0-1..t0+2 (a stall that cannot be told from noise
  in three rounds is not counted) AND had gained at least 8 sigma over rounds t0-4..t0-1
  (growth was expected: "stall while growth is expected" is what the rule is for; without
  this, some stalls fell where a flat, wandering curve happened to jump afterwards, which
  nothing that sees only the past can expect; on tune 10 of 112 stalls drawn, with
  `--sizing local` 45 of 85). `--stall-without-past-growth`
  drops that condition (how stalls were drawn before).
Each faulted curve is replayed together with its run's other curves (and per-step rows)
truncated at the faulted curve's last step (`with_run`; `--replay alone` replays it by
itself, as before): the engine sees the round as it would live, siblings included, so a
detector that uses the other curves of the run is scored fairly, and only alerts on the
faulted curve count. The healthy figures are unaffected.
Recall is also printed within 2 rounds (t0, t0+1), the stricter reading of the target;
the issue's acceptance criterion (#5) says 3; with hysteresis 2 a fault can be flagged at
t0+1 at the earliest.
Curves eligible: metric with a direction (acc, acc_norm, len_norm, bpb, ppl), >= 12
points; t0 is drawn (seeded) after the engine's take-off rule judges the curve
(`alerts.takeoff_index`: accuracy 3 binomial sigma above chance twice) and after the curve left chance level (accuracy smoothed above
max(its start, the task's chance accuracy) by 3 sigma) plus 8 rounds, with at least 3 rounds left. Recall: an alert of any
severity on the faulted curve within 3 rounds (t0, t0+1, t0+2); delay in rounds from t0.
Each kind's recall is also printed by the fault's size where it landed (`local_size`: the
deficit at round t0+2 in local noise sigmas, rounds t0-10..t0+2): the whole-curve sizing
makes early faults (where curves are 2-4x noisier) a few local sigmas and late ones many,
and the split tells faults no 3-round test can see from faults the detector missed.
`--scale 0.75` multiplies every magnitude (sensitivity: how recall falls for smaller faults).
Why 8 sigma: the band is band_sigma=4 prediction sigmas wide below the expectation, a
one-step-ahead prediction sigma is ~1.2-1.5x the round-to-round noise (fit uncertainty),
and hysteresis needs 2 rounds out of band, so a fault must clear ~6 noise sigmas on two
draws; 8 sigma is the smallest round number that would do so if curves were trend plus
independent noise. They are not (measured on the tune split): healthy curves leave a trend
frozen 2-3 rounds earlier by much more than their round-to-round noise says (with that
noise as sigma and no misfit floor the detector would page ~20 times per 50 run-rounds),
so 8-sigma faults sit partly inside the healthy wander. `--scale 2` shows how recall
grows with the fault size (docs/alert-quality.md).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fineline_monitor.analyze import replay_run  # noqa: E402
from fineline_monitor.core.alerts import takeoff_index  # noqa: E402
from fineline_monitor.core.config import AlertConfig  # noqa: E402
from fineline_monitor.core.expectations import ACC, LOSS, chance_for, metric_kind  # noqa: E402
from fineline_monitor.core.trajectory import Curve, read_trajectory  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_json  # noqa: E402

HELDOUT_SIZES = {"370M", "1B", "3B", "410m", "1.4b"}
DEFAULT_DATA = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "reference-trajectories" / "dev.csv.gz"
)


def model_size(model: str) -> str:
    m = re.search(r"-(\d+(?:\.\d+)?[MmBb])(?:-|$)", model)
    return m.group(1) if m else ""


def split_of(model: str) -> str:
    return "heldout" if model_size(model) in HELDOUT_SIZES else "tune"


# the sources of ../shared/reference-trajectories/dev.csv.gz: runs of these with a tune-split
# size were looked at while tuning
DEV_SOURCES = (
    "allenai/OLMo@ladder-1xC:peteish-final-new",
    "allenai/OLMo@ladder-1xC:peteish-moreeval-const",
    "allenai/OLMo@ladder-1xC:peteish-moreeval-decay",
    "pythia-v1/0shot",
    "pythia-v1/5shot",
)


def resolve_split(split: str, run_keys) -> str:
    """`auto`: `heldout` when the table holds a run we tuned on, else `all`."""
    if split != "auto":
        return split
    seen = any(src in DEV_SOURCES and split_of(model) == "tune" for src, model in run_keys)
    return "heldout" if seen else "all"


def running_median(y: np.ndarray, k: int = 5) -> np.ndarray:
    h = k // 2
    pad = np.concatenate([np.full(h, y[0]), y, np.full(h, y[-1])])
    win = np.lib.stride_tricks.sliding_window_view(pad, k)
    return np.median(win, axis=1)


def curve_noise(y: np.ndarray) -> float:
    d = np.diff(y)
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2))


LOCAL_BEFORE, LOCAL_AFTER = 10, 2


def local_noise(y: np.ndarray, t0: int) -> float:
    """Round-to-round noise of the healthy curve around round t0 (rounds t0-10 .. t0+2):
    second differences cancel a locally straight trend, var(d2) = 6 sigma^2."""
    w = y[max(0, t0 - LOCAL_BEFORE) : t0 + LOCAL_AFTER + 1]
    d2 = np.diff(w, 2)
    return float(1.4826 * np.median(np.abs(d2 - np.median(d2))) / math.sqrt(6))


def _judgeable(c: Curve) -> Optional[Tuple[int, np.ndarray, float, np.ndarray]]:
    """(metric kind, values, noise sigma, running median) of a curve faults can be put in: a
    metric with a direction, >= 12 points, a finite positive noise; else None."""
    k = metric_kind(c.metric)
    if k not in (ACC, LOSS) or len(c) < 12:
        return None
    y = c.values.astype(float)
    sig = curve_noise(y)
    if not np.isfinite(sig) or sig <= 0:
        return None
    return k, y, sig, running_median(y)


def inject(
    c: Curve,
    kind: str,
    rng: random.Random,
    scale: float = 1.0,
    sizing: str = "global",
    stall_past: bool = True,
) -> Optional[Tuple[Curve, int]]:
    """Return (faulted curve truncated at t0+2, t0) or None when the curve is not eligible."""
    got = _judgeable(c)
    if got is None:
        return None
    k, y, sig, sm = got
    R = float(np.percentile(sm, 95) - np.percentile(sm, 5))
    bad = -1.0 if k == ACC else 1.0
    start = 0
    if k == ACC:
        ch = chance_for(c.task)
        base = max(sm[:3].mean(), ch if ch is not None else -np.inf)
        above = np.flatnonzero(sm > base + 3 * sig)
        if not above.size:
            return None
        start = int(above[0])
        # and after the engine's own take-off rule: a curve within 3 binomial sigma of chance
        # is not judged by design ("no alert at chance"), so a fault there is not scored
        tk = takeoff_index(y, c.stderr * c.stderr, ch)
        if tk is None:
            return None
        start = max(start, tk)
    lo_t0 = max(start + 8, 8)
    hi_t0 = len(y) - 3
    cands = list(range(lo_t0, hi_t0 + 1))
    # "sigma" of a fault at t0: the whole curve's noise, or the noise around t0 (curves are
    # 2-4x noisier early than late, so a whole-curve sigma makes early faults a few local
    # sigmas and late ones many)
    sig_at = {t: sig if sizing == "global" else local_noise(y, t) for t in cands}
    cands = [t for t in cands if np.isfinite(sig_at[t]) and sig_at[t] > 0]
    if kind == "stall":
        gain = lambda t: -bad * (sm[t + 2] - sm[t - 1])  # noqa: E731 - improvement in the good direction
        cands = [t for t in cands if gain(t) >= 8 * scale * sig_at[t]]
        if stall_past:
            # growth was expected: the curve had been climbing at least as fast just before
            past = lambda t: -bad * (sm[t - 1] - sm[t - 4])  # noqa: E731
            cands = [t for t in cands if past(t) >= 8 * scale * sig_at[t]]
    if not cands:
        return None
    t0 = rng.choice(cands)
    sig = sig_at[t0]
    yf = y.copy()
    if kind == "drop":
        yf[t0:] += bad * scale * max(8 * sig, 0.10 * R)
    elif kind == "drift":
        D = scale * max(10 * sig, 0.15 * R)
        j = np.arange(len(y) - t0)
        yf[t0:] += bad * D * (j + 1) / 3.0
    elif kind == "stall":
        yf[t0:] = sm[t0 - 1] + (y[t0:] - sm[t0:])
    if k == ACC:
        yf = np.clip(yf, 0.0, 1.0)
    n = t0 + 3
    fc = head(c, n, values=yf)
    return fc, t0


SIZE_EDGES = (4.0, 8.0, 16.0)
SIZE_LABELS = ("< 4", "4-8", "8-16", ">= 16")


def local_size(c: Curve, fc: Curve, t0: int) -> float:
    """A fault's size where it landed: its deficit at round t0+2 (the last judged round) in
    units of the healthy curve's local noise around t0 (`local_noise`). Faults are sized by
    the whole-curve sigma (comparable across versions), but curves are 2-4x noisier early
    than late, so this says how visible each fault really was; the recall per size bin
    tells a detector limit (small local faults) from a detector miss (large ones)."""
    y = c.values.astype(float)
    s = local_noise(y, t0)
    d = abs(float(fc.values[t0 + 2]) - float(y[t0 + 2]))
    return d / s if np.isfinite(s) and s > 0 else math.inf


def size_bin(size: float) -> int:
    return int(np.searchsorted(SIZE_EDGES, size, side="right"))


def head(c: Curve, n: int, values: Optional[np.ndarray] = None) -> Curve:
    """The curve's first n points (with `values` in place of its own, if given)."""
    v = c.values if values is None else values
    return replace(c, steps=c.steps[:n], tokens=c.tokens[:n], values=v[:n], stderr=c.stderr[:n])


def rounds_after_fault(alerts, fc: Curve, t0: int) -> List[int]:
    """For each alert on the faulted curve at or after round t0, its round minus t0."""
    steps = fc.steps.tolist()
    return [
        steps.index(a.step) - t0
        for a in alerts
        if a.step in steps
        and steps.index(a.step) >= t0
        and a.task == fc.task
        and a.metric == fc.metric
    ]


def with_run(run_curves: List[Curve], fc: Curve) -> List[Curve]:
    """The faulted curve in place of its healthy original, with the run's other curves (and
    per-step rows: the LR that drives the phases) truncated at the faulted curve's last step:
    the engine sees what it would see live at that round (the siblings of the faulted task
    included), and nothing from later rounds."""
    last = fc.steps[-1]
    out = []
    for c in run_curves:
        if c.task == fc.task and c.metric == fc.metric:
            out.append(fc)
            continue
        n = int(np.searchsorted(c.steps, last, side="right"))
        if n == len(c):
            out.append(c)
        elif n > 0:
            out.append(head(c, n))
    return out


# ---- issue: the ladder of smaller runs as the expected trajectory (`--reference ladder`) ----
LADDER_SIZE_EDGES = (6.0, 10.0)
LADDER_SIZE_LABELS = ("< 6", "6-10", ">= 10")
LADDER_CALIB_POINTS = 5  # as the ladder source: the first judged points fix its level
POSITIONS = (0.25, 0.5, 0.75, 1.0)


def _variant(model: str) -> str:
    """Pythia runs of one recipe: standard, deduped, or one batch-size variant."""
    if "deduped" in model:
        return "deduped"
    m = re.search(r"[\d.]+MtokBS", model)
    return m.group(0) if m else ""


def _schedule(model: str) -> str:
    """OLMo ladder runs of one schedule: the model name without its size."""
    return re.sub(r"-\d+(?:\.\d+)?[MB]-", "-*-", model)


def family_ladder(
    run_key: Tuple[str, str], curves: List[Curve], all_runs: Dict[Tuple[str, str], List[Curve]]
):
    """The smaller runs of the same family (Pythia: same source and variant; OLMo ladder: same
    source and schedule), or [] when there are none."""
    src, model = run_key
    params = curves[0].params
    if not params:
        return []
    same = _variant if "pythia" in model else _schedule
    return [
        k
        for k, cs in sorted(all_runs.items())
        if k[0] == src
        and k != run_key
        and same(k[1]) == same(model)
        and cs[0].params
        and cs[0].params < params
    ]


def build_ladders(runs, all_runs) -> Dict[Tuple[str, str], Any]:
    from fineline_monitor.core.ladder import Ladder, runs_from_curves

    out = {}
    for key, curves in runs.items():
        members = family_ladder(key, curves, all_runs)
        if not members:
            continue
        total = max(float(np.nanmax(c.tokens)) for c in curves if np.isfinite(c.tokens).any())
        refs = runs_from_curves(c for m in members for c in all_runs[m])
        out[key] = Ladder(refs, align="auto", target_total_tokens=total)
    return out


def _calibration_start(c: Curve) -> Optional[int]:
    if metric_kind(c.metric) == ACC:
        return takeoff_index(c.values.astype(float), c.stderr * c.stderr, chance_for(c.task))
    return 0


def prediction_errors(runs, ladders) -> Dict[Tuple[str, float, str], List[float]]:
    """|predicted - observed| at 25/50/75/100% of each run with a ladder, per metric kind, for
    the level-calibrated ladder and for the own-run extrapolation (a straight line in log
    tokens through the same calibration points): accuracy in points, bpb/ppl in % of value."""
    errs: Dict[Tuple[str, float, str], List[float]] = {}
    for key, lad in ladders.items():
        for c in runs[key]:
            k = metric_kind(c.metric)
            if k not in (ACC, LOSS) or len(c) < 12:
                continue
            start = _calibration_start(c)
            if start is None:
                continue
            y = c.values.astype(float)
            pred = lad.predict(c.task, c.metric, steps=c.steps, tokens=c.tokens, params=c.params)
            with np.errstate(divide="ignore"):
                x = np.log(np.where(np.isfinite(c.tokens), c.tokens, c.steps.astype(float)))
            cal = [i for i in range(start, len(y)) if np.isfinite(pred[i]) and np.isfinite(x[i])]
            cal = cal[:LADDER_CALIB_POINTS]
            if len(cal) < LADDER_CALIB_POINTS:
                continue
            offset = float(np.median(y[cal] - pred[cal]))
            slope, icpt = np.polyfit(x[cal], y[cal], 1)
            for q in POSITIONS:
                i = int(round(q * (len(y) - 1)))
                if i <= cal[-1] or not np.isfinite(pred[i]):
                    continue
                scale = 100.0 if k == ACC else 100.0 / abs(y[i])
                name = "accuracy (points)" if k == ACC else "bpb/ppl (% of value)"
                errs.setdefault((name, q, "ladder"), []).append(
                    abs(y[i] - pred[i] - offset) * scale
                )
                errs.setdefault((name, q, "own-run"), []).append(
                    abs(y[i] - (icpt + slope * x[i])) * scale
                )
    return errs


def print_prediction_errors(errs) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    print(
        "trajectory prediction error, median |predicted - observed| (n curves), calibrated on the first "
        f"{LADDER_CALIB_POINTS} judged points (accuracy: after take-off):"
    )
    for name in sorted({k[0] for k in errs}):
        for how in ("ladder", "own-run"):
            cells = []
            for q in POSITIONS:
                e = errs.get((name, q, how), [])
                med = float(np.median(e)) if e else math.nan
                out.setdefault(name, {}).setdefault(how, {})[f"{int(q * 100)}%"] = {
                    "median": med,
                    "n": len(e),
                }
                cells.append(f"{int(q * 100)}%: {med:.2f} ({len(e)})")
            print(f"  {name:22s} {how:8s} " + "; ".join(cells))
    return out


def inject_sized(c: Curve, kind: str, rng: random.Random) -> Optional[Tuple[Curve, int, float]]:
    """A fault of a drawn size (uniform 3-20 noise sigmas, sigma = the curve's round-to-round
    noise) from round t0 on, on the bad side: drop (an offset of that size), drift (a deficit
    reaching that size at t0+2 and growing on), stall (the level of t0-1 held where the healthy
    curve gains >= 6 sigmas over t0-1..t0+2; its size is that gain). Returns the faulted curve
    truncated at t0+2, t0 and the size in sigmas; None when not eligible."""
    got = _judgeable(c)
    if got is None:
        return None
    k, y, sig, sm = got
    bad = -1.0 if k == ACC else 1.0
    start = 0
    if k == ACC:
        tk = takeoff_index(y, c.stderr * c.stderr, chance_for(c.task))
        if tk is None:
            return None
        start = tk
    cands = list(range(max(start + 8, 8), len(y) - 2))
    if kind == "stall":
        cands = [t for t in cands if -bad * (sm[t + 2] - sm[t - 1]) >= 6 * sig]
    if not cands:
        return None
    t0 = rng.choice(cands)
    yf = y.copy()
    if kind == "stall":
        size = -bad * (sm[t0 + 2] - sm[t0 - 1]) / sig
        yf[t0:] = sm[t0 - 1] + (y[t0:] - sm[t0:])
    else:
        size = rng.uniform(3.0, 20.0)
        j = np.arange(len(y) - t0)
        yf[t0:] += bad * size * sig * (np.ones_like(j) if kind == "drop" else (j + 1) / 3.0)
    if k == ACC:
        yf = np.clip(yf, 0.0, 1.0)
    return head(c, t0 + 3, values=yf), t0, float(size)


def ladder_quality(runs, ladders, cfg, n_per_kind: int, seed: int) -> Dict[str, Any]:
    """Healthy warnings and fault recall with the ladder off and on (same faults)."""
    out: Dict[str, Any] = {}
    for mode in ("off", "on"):
        n_warn = n_crit = run_rounds = 0
        for key, curves in runs.items():
            ref = ladders.get(key) if mode == "on" else None
            alerts, summ = replay_run(curves, cfg, ladder=ref)
            run_rounds += summ["rounds"]
            n_crit += sum(a.severity == "critical" for a in alerts)
            n_warn += sum(a.severity == "warning" for a in alerts)
        out[mode] = {
            "healthy": {
                "run_rounds": run_rounds,
                "criticals": n_crit,
                "warnings": n_warn,
                "warnings_per_50_run_rounds": 50 * n_warn / max(run_rounds, 1),
            }
        }
        print(
            f"ladder {mode:3s} healthy: {run_rounds} run-rounds, criticals {n_crit}, warnings {n_warn} "
            f"({50 * n_warn / max(run_rounds, 1):.3f} per 50 run-rounds)"
        )
    curves = sorted(
        (
            c
            for cs in runs.values()
            for c in cs
            if metric_kind(c.metric) in (ACC, LOSS) and len(c) >= 12
        ),
        key=lambda c: (c.source, c.model, c.task, c.metric),
    )
    for kind in ("drop", "drift", "stall"):
        rng = random.Random(f"{seed}-ladder-{kind}")
        order = list(range(len(curves)))
        rng.shuffle(order)
        table: Dict[str, Dict[int, List[int]]] = {"off": {}, "on": {}}
        n = 0
        for idx in order:
            if n >= n_per_kind:
                break
            got = inject_sized(curves[idx], kind, rng)
            if got is None:
                continue
            fc, t0i, size = got
            n += 1
            key = (fc.source, fc.model)
            b = int(np.searchsorted(LADDER_SIZE_EDGES, size, side="right"))
            for mode in ("off", "on"):
                ref = ladders.get(key) if mode == "on" else None
                alerts, _ = replay_run(with_run(runs[key], fc), cfg, ladder=ref)
                hit = rounds_after_fault(alerts, fc, t0i)
                cell = table[mode].setdefault(b, [0, 0])
                cell[0] += bool(hit and min(hit) <= 2)
                cell[1] += 1
        for mode in ("off", "on"):
            tot = [sum(v[0] for v in table[mode].values()), sum(v[1] for v in table[mode].values())]
            bins = {
                LADDER_SIZE_LABELS[b]: {"caught": v[0], "n": v[1], "recall": v[0] / max(v[1], 1)}
                for b, v in sorted(table[mode].items())
            }
            out[mode][kind] = {
                "caught": tot[0],
                "n": tot[1],
                "recall": tot[0] / max(tot[1], 1),
                "by_size": bins,
            }
            print(
                f"ladder {mode:3s} {kind:5s}: recall within 3 rounds {tot[0] / max(tot[1], 1):.3f} "
                f"({tot[0]}/{tot[1]}); by size in noise sigmas: "
                + "; ".join(
                    f"{lab}: {c['recall']:.2f} ({c['caught']}/{c['n']})" for lab, c in bins.items()
                )
            )
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--data", default=os.environ.get("FINELINE_DEV_TRAJECTORIES", str(DEFAULT_DATA))
    )
    ap.add_argument(
        "--split",
        choices=("auto", "heldout", "tune", "all"),
        default="auto",
        help="auto (default): heldout on a table with runs we tuned on (the dev table), else all runs",
    )
    ap.add_argument("--faults-per-kind", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every fault magnitude")
    ap.add_argument(
        "--sizing",
        choices=("local", "global"),
        default="global",
        help="fault sigma: the healthy curve's noise around t0 (local) or over the whole curve (global)",
    )
    ap.add_argument(
        "--replay",
        choices=("run", "alone"),
        default="run",
        help="replay a faulted curve with its run's other curves truncated at the same step (run, "
        "default: what the engine sees live) or alone (how faults were replayed before)",
    )
    ap.add_argument(
        "--stall-without-past-growth",
        action="store_true",
        help="draw stalls without requiring growth before t0 (the older definition)",
    )
    ap.add_argument(
        "--reference",
        choices=("none", "ladder"),
        default="none",
        help="ladder: judge each run with the smaller runs of its family as its reference ladder; "
        "prints the prediction error and the recall by fault size with the ladder off and on",
    )
    bench_json.add_json_argument(ap, "alert-quality")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a detector setting (alerts.detector.NAME) other than its default, for sensitivity runs",
    )
    args = ap.parse_args(argv)
    if not Path(args.data).exists():
        print(
            f"SKIP: trajectory data not found at {args.data} (pass --data or set FINELINE_DEV_TRAJECTORIES)"
        )
        return 0
    t0 = time.perf_counter()
    traj = read_trajectory(args.data)
    cfg = AlertConfig()
    if args.set:
        sets = {}
        for kv in args.set:
            k, _, v = kv.partition("=")
            sets[k] = type(getattr(cfg.detector, k))(v)
        cfg = replace(cfg, detector=replace(cfg.detector, **sets))
    all_runs = traj.runs()
    split = resolve_split(args.split, all_runs)
    runs = {k: v for k, v in all_runs.items() if split == "all" or split_of(k[1]) == split}
    print(
        f"split={split}"
        + (" (auto)" if args.split == "auto" else "")
        + f": {len(runs)} of {len(all_runs)} runs: {sorted({model_size(m) or m for _, m in runs})} sizes"
    )
    if not runs:
        print(
            f"error: no run of {args.data} is in split {split!r} (the held-out split is by dev-table model "
            f"size: {sorted(HELDOUT_SIZES)}); pass --split all",
            file=sys.stderr,
        )
        return 2

    if args.reference == "ladder":
        ladders = build_ladders(runs, all_runs)
        print(
            f"ladders: {len(ladders)} of {len(runs)} runs have smaller runs of their family "
            f"(the others are judged as without a ladder)"
        )
        errs = print_prediction_errors(prediction_errors(runs, ladders))
        qual = ladder_quality(runs, ladders, cfg, args.faults_per_kind, args.seed)
        seconds = time.perf_counter() - t0
        print(f"seconds: {seconds:.1f}")
        out = args.json
        if out == str(bench_json.DATA_DIR / "bench-alert-quality.json"):
            out = str(bench_json.DATA_DIR / "bench-alert-quality-ladder.json")
        bench_json.write(
            out,
            "alert-quality-ladder",
            {
                "split": split,
                "runs": len(runs),
                "runs_with_ladder": len(ladders),
                "ladders": {
                    f"{k[0]}/{k[1]}": {"runs": v.names, "align": v.align}
                    for k, v in ladders.items()
                },
                "prediction_error": errs,
                "quality": qual,
                "faults_per_kind": args.faults_per_kind,
                "settings": dict(kv.partition("=")[::2] for kv in args.set),
                "seconds": seconds,
            },
            size=f"{args.faults_per_kind} faults per kind",
            argv=[__file__, *(sys.argv[1:] if argv is None else argv)],
        )
        return 0

    # ---- healthy runs ----
    n_warn = n_crit = curve_rounds = run_rounds = 0
    crit_examples = []
    warn_by_rule: Dict[str, int] = {}
    for (_src, model), curves in runs.items():
        alerts, summ = replay_run(curves, cfg)
        run_rounds += summ["rounds"]
        curve_rounds += summ["points"]
        for a in alerts:
            if a.severity == "critical":
                n_crit += 1
                crit_examples.append(f"{model} step {a.step} {a.rule} {a.task}/{a.metric}")
            elif a.severity == "warning":
                n_warn += 1
                warn_by_rule[a.rule] = warn_by_rule.get(a.rule, 0) + 1
    print(f"healthy: {run_rounds} run-rounds, {curve_rounds} curve-rounds")
    print(
        f"  criticals on healthy runs: {n_crit}"
        + (f" e.g. {crit_examples[:3]}" if crit_examples else "")
    )
    print(
        f"  warnings: {n_warn} ({warn_by_rule}); per 50 curve-rounds: {50 * n_warn / max(curve_rounds, 1):.4f}; "
        f"per 50 run-rounds: {50 * n_warn / max(run_rounds, 1):.3f}"
    )

    # ---- injected faults ----
    rng = random.Random(args.seed)
    curves = [
        c
        for cs in runs.values()
        for c in cs
        if metric_kind(c.metric) in (ACC, LOSS) and len(c) >= 12
    ]
    curves.sort(key=lambda c: (c.source, c.model, c.task, c.metric))
    t_faults = time.perf_counter()
    results = {}
    fault_figures: Dict[str, Dict] = {}
    for kind in ("drop", "drift", "stall"):
        order = list(range(len(curves)))
        random.Random(f"{args.seed}-{kind}").shuffle(order)
        caught, delays, n, n_inel = 0, [], 0, 0
        by_size: Dict[int, List[int]] = {}
        for idx in order:
            if n >= args.faults_per_kind:
                break
            got = inject(
                curves[idx],
                kind,
                rng,
                args.scale,
                args.sizing,
                stall_past=not args.stall_without_past_growth,
            )
            if got is None:
                n_inel += 1
                continue
            fc, t0i = got
            n += 1
            if args.replay == "alone":
                alerts, _ = replay_run([fc], cfg)
            else:
                alerts, _ = replay_run(with_run(runs[(fc.source, fc.model)], fc), cfg)
            hit = rounds_after_fault(alerts, fc, t0i)
            got_it = bool(hit and min(hit) <= 2)
            if got_it:
                caught += 1
                delays.append(min(hit))
            b = size_bin(local_size(curves[idx], fc, t0i))
            by_size.setdefault(b, [0, 0])[0] += got_it
            by_size[b][1] += 1
        results[kind] = (caught, n, delays, n_inel)
        rec = caught / max(n, 1)
        dl = (f"{np.mean(delays):.2f}, median {np.median(delays):.0f}") if delays else "n/a"
        in2 = sum(1 for d in delays if d <= 1)
        print(
            f"fault {kind:5s}: recall within 3 rounds {rec:.3f} ({caught}/{n}); within 2 rounds "
            f"{in2 / max(n, 1):.3f}; delay rounds mean {dl}; curves not eligible: {n_inel}"
        )
        print(
            "      by size at t0+2 in local noise sigmas: "
            + "; ".join(
                f"{SIZE_LABELS[b]}: {by_size[b][0] / by_size[b][1]:.2f} ({by_size[b][0]}/{by_size[b][1]})"
                for b in sorted(by_size)
            )
        )
        fault_figures[kind] = {
            "caught": caught,
            "injected": n,
            "recall_3_rounds": rec,
            "recall_2_rounds": in2 / max(n, 1),
            "not_eligible": n_inel,
            "median_delay_rounds": float(np.median(delays)) if delays else None,
            "by_local_size": {
                SIZE_LABELS[b]: {"caught": by_size[b][0], "injected": by_size[b][1]}
                for b in sorted(by_size)
            },
        }
    tot_c = sum(r[0] for r in results.values())
    tot_n = sum(r[1] for r in results.values())
    tot_2 = sum(sum(1 for d in r[2] if d <= 1) for r in results.values())
    print(
        f"all faults: recall within 3 rounds {tot_c / max(tot_n, 1):.3f} ({tot_c}/{tot_n}); within 2 rounds "
        f"(the stricter reading; the issue's criterion is 3) {tot_2 / max(tot_n, 1):.3f}"
    )
    seconds = time.perf_counter() - t0
    print(
        f"seconds: {seconds:.1f} (faults {time.perf_counter() - t_faults:.1f}, replay {args.replay})"
    )
    bench_json.write(
        args.json,
        "alert-quality",
        {
            "split": split,
            "runs": len(runs),
            "run_rounds": run_rounds,
            "curve_rounds": curve_rounds,
            "criticals_healthy": n_crit,
            "warnings_healthy": n_warn,
            "warnings_by_rule": warn_by_rule,
            "warnings_per_50_run_rounds": 50 * n_warn / max(run_rounds, 1),
            "warnings_per_50_curve_rounds": 50 * n_warn / max(curve_rounds, 1),
            "faults": fault_figures,
            "recall_3_rounds_all": tot_c / max(tot_n, 1),
            "recall_2_rounds_all": tot_2 / max(tot_n, 1),
            "faults_per_kind": args.faults_per_kind,
            "scale": args.scale,
            "sizing": args.sizing,
            "replay": args.replay,
            "seconds": seconds,
        },
        size=f"{args.faults_per_kind} faults per kind"
        + (f", faults x{args.scale}" if args.scale != 1 else ""),
        argv=[__file__, *(sys.argv[1:] if argv is None else argv)],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
