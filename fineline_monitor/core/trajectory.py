"""Reading and validating trajectory tables: the `analyze` input and the reference runs.

Two inputs are accepted:

1. The trajectory CSV (docs/formats.md; plain or `.gz`), header exactly
   `source,model,params,step,tokens,task,metric,value,stderr` (any column order).
   A run is `(source, model)`; a curve is `(source, model, task, metric)`.
2. lm-eval-harness output: a folder (searched recursively) of `results_*.json` files, or
   one such file. How the step of each file is found, first match wins:
     a. `config.model_args` (string or dict) holding `revision=stepN` / `step=N`
        (Pythia/OLMo checkpoints live in revisions named `step1000`, `step1000-tokens4B`);
     b. the file's path, any component matching `step(\\d+)`, `global_step(\\d+)`,
        `checkpoint-(\\d+)` or `iter_(\\d+)` (the nearest folder wins);
     otherwise the file is rejected with an error naming it.
   Tokens come from `tokensNB|M|K|T` in the same places when present (else empty).
   source is `lm-eval`, model is `config.model_name` or the `pretrained=` argument with
   the revision removed; every `<metric>,<filter>` with a matching `<metric>_stderr,<filter>`
   becomes a row (metric names keep the filter only when it is not `none`).

Bad input and how it is handled (every error names the file, the line and the column):
- missing or extra columns: error (lists expected and found columns);
- non-numeric `params`, `step`, `tokens`, `value`, `stderr`; negative step/tokens/stderr:
  error. `params`, `tokens`, `stderr` may be empty; `value` may not;
- rows in any order: accepted, sorted by step (documented handling, not an error);
- duplicate `(source, model, task, metric, step)`: an exact repeat is dropped; two
  different values are an error naming both lines;
- tokens that go down while steps go up within a run: error;
- a single-point curve: kept and reported in the summary as `too_short` (no expectation
  can be formed from one point), never an error.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

COLUMNS = ("source", "model", "params", "step", "tokens", "task", "metric", "value", "stderr")
OPTIONAL_NUMERIC = ("params", "tokens", "stderr")


class TrajectoryError(ValueError):
    """Bad trajectory input; the message names file, line and column."""


@dataclass
class Curve:
    """One `(source, model, task, metric)` series, sorted by step."""

    source: str
    model: str
    task: str
    metric: str
    steps: np.ndarray  # int64
    tokens: np.ndarray  # float64, nan where unknown
    values: np.ndarray  # float64
    stderr: np.ndarray  # float64, nan where unknown
    params: Optional[float] = None

    @property
    def run(self) -> Tuple[str, str]:
        return (self.source, self.model)

    def __len__(self) -> int:
        return int(self.steps.shape[0])


@dataclass
class Trajectory:
    """A validated table, as columns sorted by (run, task, metric, step)."""

    path: str
    curves: List[Curve] = field(default_factory=list)

    def runs(self) -> Dict[Tuple[str, str], List[Curve]]:
        out: Dict[Tuple[str, str], List[Curve]] = {}
        for c in self.curves:
            out.setdefault(c.run, []).append(c)
        return out

    @property
    def n_rows(self) -> int:
        return int(sum(len(c) for c in self.curves))

    def select(self, spec: str) -> List[Curve]:
        """Curves of one run named `model` or `source/model` (for reference runs)."""
        hits = [c for c in self.curves if c.model == spec or f"{c.source}/{c.model}" == spec]
        if not hits:
            models = sorted({f"{c.source}/{c.model}" for c in self.curves})
            import difflib

            close = difflib.get_close_matches(spec, models + [c.model for c in self.curves], n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise TrajectoryError(
                f"{self.path}: no run `{spec}`{hint}; runs: {', '.join(models[:20])}"
                f"{' ...' if len(models) > 20 else ''}"
            )
        runs = {c.run for c in hits}
        if len(runs) > 1:
            raise TrajectoryError(
                f"{self.path}: `{spec}` names {len(runs)} runs "
                f"({', '.join('/'.join(r) for r in sorted(runs))}); give `source/model`"
            )
        return hits


# ---------------------------------------------------------------------------------------
def read_trajectory(path: str | os.PathLike) -> Trajectory:
    """Read a trajectory CSV (.csv / .csv.gz), an lm-eval results JSON, or a folder of them."""
    p = Path(path)
    if not p.exists():
        raise TrajectoryError(f"{p}: no such file or folder")
    if p.is_dir() or p.suffix == ".json":
        return _from_rows(str(p), _lm_eval_rows(p), header_line=None)
    opener = gzip.open if p.name.endswith(".gz") else open
    try:
        with opener(p, "rt", newline="") as fh:  # type: ignore[operator]
            reader = csv.reader(fh)
            try:
                header = next(reader)
            except StopIteration:
                raise TrajectoryError(
                    f"{p}:1: empty file; expected the header {','.join(COLUMNS)}"
                ) from None
            except csv.Error as e:
                raise TrajectoryError(f"{p}:1: not valid CSV: {e}") from None
            header = [h.strip() for h in header]
            missing = [c for c in COLUMNS if c not in header]
            extra = [c for c in header if c not in COLUMNS]
            if missing or extra:
                raise TrajectoryError(
                    f"{p}:1: bad header: missing columns {missing or 'none'}, unexpected columns "
                    f"{extra or 'none'}; expected exactly {','.join(COLUMNS)}"
                )
            if len(set(header)) != len(header):
                raise TrajectoryError(f"{p}:1: repeated column names in header {header}")
            try:
                rows = list(reader)
            except csv.Error as e:
                raise TrajectoryError(f"{p}:{reader.line_num}: not valid CSV: {e}") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise TrajectoryError(f"{p}: cannot read: {e}") from None
    except UnicodeDecodeError as e:
        raise TrajectoryError(f"{p}: not UTF-8 text: {e}") from None
    order = [header.index(c) for c in COLUMNS]
    ncol = len(header)
    for i, r in enumerate(rows):
        if len(r) != ncol:
            if not r:
                raise TrajectoryError(f"{p}:{i + 2}: empty line inside the table")
            raise TrajectoryError(f"{p}:{i + 2}: {len(r)} fields, the header has {ncol}")
    if order != list(range(len(COLUMNS))):
        rows = [[r[j] for j in order] for r in rows]
    return _from_rows(str(p), rows, header_line=1)


def _numeric_column(
    path: str,
    rows: List[List[str]],
    j: int,
    name: str,
    *,
    optional: bool,
    line_of,
    nonneg: bool = False,
    integer: bool = False,
    nonfinite: bool = False,
) -> np.ndarray:
    """`nonfinite`: `nan`, `inf` and `-inf` written out are values (a diverged run's loss),
    an empty cell is still an error."""
    raw = [r[j] for r in rows]
    if optional:
        raw = [s if s.strip() else "nan" for s in raw]
    try:
        arr = np.array(
            [s if s.strip() else "x" for s in raw] if nonfinite else raw, dtype=np.float64
        )
    except ValueError:
        arr = None
    if arr is not None:
        bad = np.zeros(arr.shape, dtype=bool) if nonfinite else ~np.isfinite(arr)
        if optional:  # empty cells became nan and are allowed; inf is not
            bad &= ~np.isnan(arr)
        if integer:
            bad |= np.isfinite(arr) & (arr != np.round(arr))
        if nonneg:
            bad |= arr < 0
        if not bad.any():
            return arr
        i = int(np.flatnonzero(bad)[0])
    else:
        i = next(k for k, s in enumerate(raw) if not _is_float(s))
    what = "a non-negative " if nonneg else "a "
    what += (
        "integer"
        if integer
        else ("number (nan/inf written out are allowed)" if nonfinite else "finite number")
    )
    if optional:
        what += " or empty"
    raise TrajectoryError(
        f"{path}:{line_of(i)}: column `{name}` must be {what}, got {rows[i][j]!r}"
    )


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _from_rows(path: str, rows: List[List[str]], header_line: Optional[int]) -> Trajectory:
    """Validate rows (already in COLUMNS order) and group them into sorted curves."""
    if not rows:
        raise TrajectoryError(f"{path}: no data rows")
    if header_line is None:  # lm-eval rows carry their file in a 10th field

        def line_of(i: int) -> str:
            return rows[i][9]
    else:

        def line_of(i: int) -> str:
            return str(i + 1 + header_line)

    # Integer codes for the string columns, then one lexsort: fast on 600k rows.
    src, src_names = _codes(rows, 0)
    mod, mod_names = _codes(rows, 1)
    tsk, tsk_names = _codes(rows, 5)
    met, met_names = _codes(rows, 6)
    _check_no_blank_names(
        path,
        (
            (src, src_names, "source"),
            (mod, mod_names, "model"),
            (tsk, tsk_names, "task"),
            (met, met_names, "metric"),
        ),
        line_of,
    )
    params, istep, tokens, values, stderr = _numeric_columns(path, rows, line_of)
    order = np.lexsort((istep, met, tsk, mod, src))
    key = np.stack([src[order], mod[order], tsk[order], met[order]], axis=1)
    s_sorted = istep[order]
    new_curve = np.ones(len(order), dtype=bool)
    new_curve[1:] = (key[1:] != key[:-1]).any(axis=1)
    dup = np.zeros(len(order), dtype=bool)
    dup[1:] = ~new_curve[1:] & (s_sorted[1:] == s_sorted[:-1])
    if dup.any():
        _check_duplicates_agree(path, rows, order, dup, s_sorted, values, stderr, line_of)
        order, new_curve, key = order[~dup], new_curve[~dup], key[~dup]
    names_of = (src_names, mod_names, tsk_names, met_names)
    columns = (params, istep, tokens, values, stderr)
    curves = _curves(order, new_curve, key, names_of, columns)
    _check_tokens_monotone(path, curves, rows, order, line_of)
    return Trajectory(path=path, curves=curves)


def _numeric_columns(path: str, rows: List[List[str]], line_of) -> Tuple[np.ndarray, ...]:
    """params, step (int64), tokens, value, stderr, validated (errors name file:line)."""
    params = _numeric_column(path, rows, 2, "params", optional=True, line_of=line_of, nonneg=True)
    steps = _numeric_column(
        path, rows, 3, "step", optional=False, line_of=line_of, nonneg=True, integer=True
    )
    tokens = _numeric_column(path, rows, 4, "tokens", optional=True, line_of=line_of, nonneg=True)
    values = _numeric_column(
        path, rows, 7, "value", optional=False, line_of=line_of, nonfinite=True
    )
    stderr = _numeric_column(path, rows, 8, "stderr", optional=True, line_of=line_of, nonneg=True)
    return params, steps.astype(np.int64), tokens, values, stderr


def _curves(
    order: np.ndarray, new_curve: np.ndarray, key: np.ndarray, names_of, columns
) -> List[Curve]:
    """One Curve per run of equal keys in the sorted order."""
    src_names, mod_names, tsk_names, met_names = names_of
    params, istep, tokens, values, stderr = columns
    starts = np.flatnonzero(new_curve)
    ends = np.append(starts[1:], len(order))
    curves: List[Curve] = []
    for a, b in zip(starts, ends):
        idx = order[a:b]
        k = key[a]
        pv = params[idx[0]]
        curves.append(
            Curve(
                source=src_names[k[0]],
                model=mod_names[k[1]],
                task=tsk_names[k[2]],
                metric=met_names[k[3]],
                steps=istep[idx],
                tokens=tokens[idx],
                values=values[idx],
                stderr=stderr[idx],
                params=None if math.isnan(pv) else float(pv),
            )
        )
    return curves


def _codes(rows: List[List[str]], j: int) -> Tuple[np.ndarray, List[str]]:
    """Integer codes of column j and the distinct values they stand for."""
    table: Dict[str, int] = {}
    out = np.fromiter(
        (table.setdefault(r[j], len(table)) for r in rows), dtype=np.int64, count=len(rows)
    )
    names = [""] * len(table)
    for k, v in table.items():
        names[v] = k
    return out, names


def _check_no_blank_names(path: str, columns, line_of) -> None:
    """Empty names, checked on the distinct values (a few hundred) rather than every row;
    the first row carrying one is the line reported."""
    first_bad = None
    for arr, names, name in columns:
        blank = [k for k, v in enumerate(names) if not v.strip()]
        if blank:
            i = int(np.flatnonzero(np.isin(arr, blank))[0])
            if first_bad is None or i < first_bad[0]:
                first_bad = (i, name)
    if first_bad is not None:
        raise TrajectoryError(f"{path}:{line_of(first_bad[0])}: column `{first_bad[1]}` is empty")


def _check_duplicates_agree(path, rows, order, dup, s_sorted, values, stderr, line_of) -> None:
    """A step repeated within a curve is dropped when it repeats the same value and stderr;
    a different value is an error naming both lines."""
    for k in np.flatnonzero(dup):
        a, b = order[k - 1], order[k]
        same = (values[a] == values[b] or (np.isnan(values[a]) and np.isnan(values[b]))) and (
            stderr[a] == stderr[b] or (np.isnan(stderr[a]) and np.isnan(stderr[b]))
        )
        if not same:
            la, lb = sorted([line_of(a), line_of(b)], key=lambda s: (len(s), s))
            raise TrajectoryError(
                f"{path}:{lb}: duplicate step {s_sorted[k]} for curve ({rows[b][0]}, {rows[b][1]}, "
                f"{rows[b][5]}, {rows[b][6]}) with a different value than line {la} "
                f"({values[a]!r} vs {values[b]!r}); one value per curve and step is allowed"
            )


def _check_tokens_monotone(path, curves, rows, order, line_of) -> None:
    """Within a run, more steps never means fewer tokens; a table that says so is mixed up."""
    by_run: Dict[Tuple[str, str], Dict[int, float]] = {}
    for c in curves:
        m = by_run.setdefault(c.run, {})
        ok = ~np.isnan(c.tokens)
        for s, t in zip(c.steps[ok].tolist(), c.tokens[ok].tolist()):
            prev = m.get(s)
            if prev is None:
                m[s] = t
            elif prev != t:
                raise TrajectoryError(
                    f"{path}: run ({c.source}, {c.model}) step {s} has two token counts "
                    f"({prev:.0f} and {t:.0f}) in different curves (task {c.task}, metric {c.metric})"
                )
    for run, m in by_run.items():
        if len(m) < 2:
            continue
        st = np.array(sorted(m))
        tk = np.array([m[s] for s in st])
        bad = np.flatnonzero(np.diff(tk) < 0)
        if bad.size:
            i = int(bad[0])
            raise TrajectoryError(
                f"{path}: run ({run[0]}, {run[1]}): tokens go down from {tk[i]:.0f} at step "
                f"{st[i]} to {tk[i + 1]:.0f} at step {st[i + 1]}; column `tokens` must not "
                "decrease as `step` increases"
            )


# ---- lm-eval-harness output ----------------------------------------------------------
_STEP_PATTERNS = [
    re.compile(p)
    for p in (
        r"(?:^|[^a-z])global_step[_-]?(\d+)",
        r"(?:^|[^a-z_])step[_-]?(\d+)",
        r"checkpoint-(\d+)",
        r"iter_(\d+)",
    )
]
_TOKENS_RE = re.compile(r"tokens?[_-]?(\d+(?:\.\d+)?)([KMBT]?)", re.I)
_UNIT = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def _find_step(text: str) -> Optional[int]:
    for pat in _STEP_PATTERNS:
        m = pat.search(text)
        if m:
            return int(m.group(1))
    return None


def _find_tokens(text: str) -> Optional[float]:
    m = _TOKENS_RE.search(text)
    if not m:
        return None
    return float(m.group(1)) * _UNIT[m.group(2).upper()]


def _lm_eval_rows(p: Path) -> List[List[str]]:
    files = sorted(p.rglob("results_*.json")) if p.is_dir() else [p]
    if not files:
        raise TrajectoryError(f"{p}: no lm-eval-harness `results_*.json` files in this folder")
    rows: List[List[str]] = []
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrajectoryError(f"{f}: not readable lm-eval results JSON: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
            raise TrajectoryError(
                f"{f}: no `results` mapping; is this an lm-eval-harness results file?"
            )
        margs_text, step, tokens = _lm_eval_step(p, f, doc)
        model = _lm_eval_model(doc, margs_text)
        rows += _lm_eval_metric_rows(f, doc, model, step, tokens)
    if not rows:
        raise TrajectoryError(f"{p}: lm-eval results files hold no numeric metrics")
    return rows


def _lm_eval_step(p: Path, f: Path, doc: Dict) -> Tuple[str, int, Optional[float]]:
    """(model_args as text, training step, tokens or None) of one lm-eval results file."""
    cfg = doc.get("config") or {}
    margs = cfg.get("model_args") or ""
    if isinstance(margs, dict):
        margs_text = ",".join(f"{k}={v}" for k, v in margs.items())
    else:
        margs_text = str(margs)
    rev = re.search(r"revision=([^,]+)", margs_text)
    step = _find_step(rev.group(1)) if rev else _find_step(margs_text)
    tokens = _find_tokens(rev.group(1)) if rev else None
    if step is None:
        rel = f.parent.relative_to(p) if p.is_dir() else f.parent
        for part in reversed([f.stem] + list(rel.parts)):
            step = _find_step(part)
            if step is not None:
                tokens = tokens if tokens is not None else _find_tokens(part)
                break
    if step is None:
        raise TrajectoryError(
            f"{f}: cannot tell the training step: put `revision=stepN` in model_args or name a folder "
            "`stepN` / `global_stepN` / `checkpoint-N` / `iter_N`"
        )
    return margs_text, step, tokens


def _lm_eval_model(doc: Dict, margs_text: str) -> str:
    cfg = doc.get("config") or {}
    model = cfg.get("model_name") or ""
    if not model:
        m = re.search(r"pretrained=([^,]+)", margs_text)
        model = m.group(1) if m else (str(cfg.get("model") or "model"))
    model = re.sub(r"[/_-]?(global_)?step[_-]?\d+.*$", "", model) or model
    return model


def _lm_eval_metric_rows(
    f: Path, doc: Dict, model: str, step: int, tokens: Optional[float]
) -> List[List[str]]:
    """Every `<metric>,<filter>` of the file with its `<metric>_stderr,<filter>`, as rows."""
    rows: List[List[str]] = []
    for task, res in sorted(doc["results"].items()):
        if not isinstance(res, dict):
            continue
        for key, val in res.items():
            if (
                "," not in key
                or "_stderr" in key
                or not isinstance(val, (int, float))
                or isinstance(val, bool)
            ):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}/{filt}"
            se = res.get(f"{metric}_stderr,{filt}")
            se_s = (
                "" if not isinstance(se, (int, float)) or isinstance(se, bool) else repr(float(se))
            )
            rows.append(
                [
                    "lm-eval",
                    model,
                    "",
                    str(step),
                    "" if tokens is None else repr(tokens),
                    task,
                    name,
                    repr(float(val)),
                    se_s,
                    f"{f}",
                ]
            )
    return rows


def write_trajectory_csv(path: str | os.PathLike, rows: Iterable[Dict[str, object]]) -> int:
    """Write rows (dicts with the COLUMNS keys) as a trajectory CSV; returns the count."""
    p = Path(path)
    opener = gzip.open if p.name.endswith(".gz") else open
    n = 0
    with opener(p, "wt", newline="") as fh:  # type: ignore[operator]
        w = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
            n += 1
    return n


def iter_rows(curves: Iterable[Curve]) -> Iterator[Dict[str, object]]:
    for c in curves:
        for s, t, v, e in zip(
            c.steps.tolist(), c.tokens.tolist(), c.values.tolist(), c.stderr.tolist()
        ):
            yield {
                "source": c.source,
                "model": c.model,
                "params": None if c.params is None else int(c.params),
                "step": s,
                "tokens": None if math.isnan(t) else int(t),
                "task": c.task,
                "metric": c.metric,
                "value": v,
                "stderr": None if math.isnan(e) else e,
            }


__all__ = [
    "COLUMNS",
    "Curve",
    "Trajectory",
    "TrajectoryError",
    "read_trajectory",
    "write_trajectory_csv",
    "iter_rows",
]
