"""The run store: one SQLite database per run, the embedded default sink.

Why SQLite: one file per run that a report, a notebook or `sqlite3` opens with no
server, and transactions that survive a SIGKILL. WAL mode lets a reader (the report,
a dashboard script) read while training writes.

Idempotency: every table's primary key is the identity of the fact, e.g.
(run, step, name) for a metric, and writes are INSERT OR REPLACE. A run resumed from a
checkpoint re-logs the steps after that checkpoint and ends with exactly one row per
fact: nothing duplicated, nothing lost (each logging call is its own committed
transaction, and `flush()` is called when the training checkpoint is taken).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from fineline_monitor.core.types import Alert, ProbeRound

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run TEXT PRIMARY KEY, created REAL, config TEXT, meta TEXT);
CREATE TABLE IF NOT EXISTS metrics (
    run TEXT, step INTEGER, name TEXT, value REAL, tokens INTEGER,
    PRIMARY KEY (run, step, name));
CREATE TABLE IF NOT EXISTS probe_results (
    run TEXT, step INTEGER, tokens INTEGER, capability TEXT, task TEXT, metric TEXT,
    value REAL, stderr REAL, n_docs INTEGER,
    PRIMARY KEY (run, step, task, metric));
CREATE TABLE IF NOT EXISTS probe_rounds (
    run TEXT, step INTEGER, tokens INTEGER, seconds REAL, tokens_scored INTEGER,
    n_truncated INTEGER, capabilities TEXT,
    PRIMARY KEY (run, step));
CREATE TABLE IF NOT EXISTS probe_docs (
    run TEXT, step INTEGER, task TEXT, doc_id INTEGER, choice INTEGER, logprob REAL,
    n_tokens INTEGER, n_bytes INTEGER, is_greedy INTEGER,
    PRIMARY KEY (run, step, task, doc_id, choice));
CREATE TABLE IF NOT EXISTS alerts (
    run TEXT, step INTEGER, rule TEXT, key TEXT, severity TEXT, body TEXT,
    PRIMARY KEY (run, step, rule, key));
CREATE TABLE IF NOT EXISTS phases (
    run TEXT, step INTEGER, tokens INTEGER, phase TEXT, previous TEXT,
    PRIMARY KEY (run, step));
CREATE TABLE IF NOT EXISTS expectations (
    run TEXT, step INTEGER, name TEXT, expected REAL, low REAL, high REAL,
    PRIMARY KEY (run, step, name));
CREATE TABLE IF NOT EXISTS events (
    run TEXT, step INTEGER, kind TEXT, key TEXT, message TEXT,
    PRIMARY KEY (run, step, kind, key));
"""


def _num(x: Any) -> Optional[float]:
    """SQLite stores NaN as NULL; keep infinities as they are (they are information)."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


class RunStore:
    """SQLite store of one or more runs. Thread-safe: one connection, one lock."""

    def __init__(
        self, path: str | os.PathLike, run: Optional[str] = None, *, readonly: bool = False
    ):
        self.path = Path(path)
        self.run = run
        self._lock = threading.Lock()
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"{self.path}: no run store here")
            self._db = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, check_same_thread=False
            )
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed transaction survives a process crash
            # (SIGKILL); only a power loss may lose the last ones.
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._db:
                self._db.executescript(SCHEMA)
                self._db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )

    # ---- writing ---------------------------------------------------------------------
    def _write(self, sql: str, rows: Iterable[Tuple]) -> None:
        rows = list(rows)
        if not rows:
            return
        with self._lock, self._db:
            self._db.executemany(sql, rows)

    def start_run(self, run: str, config: Dict[str, Any], meta: Dict[str, Any]) -> None:
        self.run = run
        with self._lock, self._db:
            # Keep the first creation time across resumes; refresh config and metadata.
            row = self._db.execute("SELECT created FROM runs WHERE run=?", (run,)).fetchone()
            created = row[0] if row else time.time()
            self._db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?,?,?,?)",
                (run, created, json.dumps(config, default=str), json.dumps(meta, default=str)),
            )

    def log_metrics(self, step: int, tokens: Optional[int], metrics: Dict[str, float]) -> None:
        self._write(
            "INSERT OR REPLACE INTO metrics VALUES (?,?,?,?,?)",
            ((self.run, int(step), k, _num(v), tokens) for k, v in metrics.items()),
        )

    def log_probe(self, round: ProbeRound) -> None:
        run, step, tokens = self.run, int(round.step), round.tokens
        results = []
        for name, r in round.tasks.items():
            for metric, value in r.metrics.items():
                results.append(
                    (
                        run,
                        step,
                        tokens,
                        r.capability,
                        name,
                        metric,
                        _num(value),
                        _num(r.stderr.get(metric)),
                        r.n_docs,
                    )
                )
        docs = [
            (
                run,
                step,
                q.task,
                q.doc_id,
                q.choice,
                _num(q.logprob),
                q.n_tokens,
                q.n_bytes,
                int(q.is_greedy),
            )
            for q in round.requests
        ]
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO probe_results VALUES (?,?,?,?,?,?,?,?,?)", results
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO probe_docs VALUES (?,?,?,?,?,?,?,?,?)", docs
            )
            self._db.execute(
                "INSERT OR REPLACE INTO probe_rounds VALUES (?,?,?,?,?,?,?)",
                (
                    run,
                    step,
                    tokens,
                    round.seconds,
                    round.tokens_scored,
                    round.n_truncated,
                    json.dumps(round.capability_scores),
                ),
            )

    def log_alert(self, alert: Alert) -> None:
        self._write(
            "INSERT OR REPLACE INTO alerts VALUES (?,?,?,?,?,?)",
            [
                (
                    self.run,
                    int(alert.step),
                    alert.rule,
                    alert.dedup_key,
                    alert.severity,
                    alert.to_jsonl(),
                )
            ],
        )

    def log_phase(
        self, step: int, tokens: Optional[int], phase: str, previous: Optional[str]
    ) -> None:
        self._write(
            "INSERT OR REPLACE INTO phases VALUES (?,?,?,?,?)",
            [(self.run, int(step), tokens, phase, previous)],
        )

    def log_expectations(self, step: int, rows: list) -> None:
        self._write(
            "INSERT OR REPLACE INTO expectations VALUES (?,?,?,?,?,?)",
            (
                (
                    self.run,
                    int(step),
                    r["name"],
                    _num(r.get("expected")),
                    _num(r.get("low")),
                    _num(r.get("high")),
                )
                for r in rows
            ),
        )

    def log_event(self, step: int, kind: str, key: str, message: str) -> None:
        self._write(
            "INSERT OR REPLACE INTO events VALUES (?,?,?,?,?)",
            [(self.run, int(step), kind, key, message)],
        )

    def flush(self) -> None:
        with self._lock:
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            try:
                self._db.commit()
                self._db.close()
            except sqlite3.ProgrammingError:
                pass  # already closed

    # ---- reading ---------------------------------------------------------------------
    def query(self, sql: str, params: Tuple = ()) -> List[Tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def runs(self) -> List[str]:
        return [r[0] for r in self.query("SELECT run FROM runs ORDER BY created")]

    def run_info(self, run: Optional[str] = None) -> Dict[str, Any]:
        row = self.query(
            "SELECT run, created, config, meta FROM runs WHERE run=?", (run or self.run,)
        )
        if not row:
            return {}
        r = row[0]
        return {"run": r[0], "created": r[1], "config": json.loads(r[2]), "meta": json.loads(r[3])}

    def metric_names(self, run: Optional[str] = None) -> List[str]:
        return [
            r[0]
            for r in self.query(
                "SELECT DISTINCT name FROM metrics WHERE run=? ORDER BY name", (run or self.run,)
            )
        ]

    def series(
        self, name: str, run: Optional[str] = None
    ) -> List[Tuple[int, Optional[int], Optional[float]]]:
        return self.query(
            "SELECT step, tokens, value FROM metrics WHERE run=? AND name=? ORDER BY step",
            (run or self.run, name),
        )

    def probe_results(self, run: Optional[str] = None) -> List[Dict[str, Any]]:
        cols = ("step", "tokens", "capability", "task", "metric", "value", "stderr", "n_docs")
        rows = self.query(
            f"SELECT {','.join(cols)} FROM probe_results WHERE run=? ORDER BY task, metric, step",
            (run or self.run,),
        )
        return [dict(zip(cols, r)) for r in rows]

    def probe_rounds(self, run: Optional[str] = None) -> List[Dict[str, Any]]:
        cols = ("step", "tokens", "seconds", "tokens_scored", "n_truncated", "capabilities")
        rows = self.query(
            f"SELECT {','.join(cols)} FROM probe_rounds WHERE run=? ORDER BY step",
            (run or self.run,),
        )
        out = [dict(zip(cols, r)) for r in rows]
        for d in out:
            d["capabilities"] = json.loads(d["capabilities"] or "{}")
        return out

    def alerts(self, run: Optional[str] = None) -> List[Dict[str, Any]]:
        rows = self.query(
            "SELECT body FROM alerts WHERE run=? ORDER BY step, rule", (run or self.run,)
        )
        return [json.loads(r[0]) for r in rows]

    def phases(self, run: Optional[str] = None) -> List[Dict[str, Any]]:
        rows = self.query(
            "SELECT step, tokens, phase, previous FROM phases WHERE run=? ORDER BY step",
            (run or self.run,),
        )
        return [dict(zip(("step", "tokens", "phase", "previous"), r)) for r in rows]

    def expectations(self, run: Optional[str] = None) -> List[Dict[str, Any]]:
        rows = self.query(
            "SELECT step, name, expected, low, high FROM expectations WHERE run=? ORDER BY name, step",
            (run or self.run,),
        )
        return [dict(zip(("step", "name", "expected", "low", "high"), r)) for r in rows]

    def events(self, run: Optional[str] = None) -> List[Dict[str, Any]]:
        rows = self.query(
            "SELECT step, kind, key, message FROM events WHERE run=? ORDER BY step",
            (run or self.run,),
        )
        return [dict(zip(("step", "kind", "key", "message"), r)) for r in rows]

    def row_counts(self, run: Optional[str] = None) -> Dict[str, int]:
        out = {}
        for table in (
            "metrics",
            "probe_results",
            "probe_docs",
            "alerts",
            "phases",
            "expectations",
            "events",
        ):
            out[table] = self.query(
                f"SELECT COUNT(*) FROM {table} WHERE run=?", (run or self.run,)
            )[0][0]
        return out

    # ---- export ----------------------------------------------------------------------
    def iter_trajectory_rows(
        self, run: Optional[str] = None, *, source: str = "fineline", params: Optional[int] = None
    ) -> Iterator[Dict[str, Any]]:
        """Probe results as rows of the trajectory CSV (docs/formats.md; a run is (source, model))."""
        run = run or self.run
        if params is None:
            params = self.run_info(run).get("meta", {}).get("params")
        for r in self.probe_results(run):
            yield {
                "source": source,
                "model": run,
                "params": params,
                "step": r["step"],
                "tokens": r["tokens"],
                "task": r["task"],
                "metric": r["metric"],
                "value": r["value"],
                "stderr": r["stderr"],
            }

    def export_trajectory_csv(
        self,
        out: str | os.PathLike | io.TextIOBase,
        run: Optional[str] = None,
        *,
        source: str = "fineline",
        all_runs: bool = False,
    ) -> int:
        """Write the trajectory CSV of `run` (default: this store's run; `all_runs`: every run
        in the store) to a path or an open text file; returns the number of rows. The store
        keeps NaN as NULL; a value is never an empty cell in the CSV (`analyze` refuses
        that), so a NULL value is written `nan`; other NULLs (tokens, stderr) stay empty."""
        cols = ["source", "model", "params", "step", "tokens", "task", "metric", "value", "stderr"]
        own = isinstance(out, (str, os.PathLike))
        fh = open(out, "w", newline="") if own else out
        try:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            n = 0
            for r in self.runs() if all_runs else [run]:
                for row in self.iter_trajectory_rows(r, source=source):
                    w.writerow(
                        {
                            k: (("nan" if k == "value" else "") if v is None else v)
                            for k, v in row.items()
                        }
                    )
                    n += 1
            return n
        finally:
            if own:
                fh.close()


class StoreSink:
    """Adapter making RunStore a Sink (kept separate so the store stays usable read-only)."""

    name = "store"

    def __init__(self, store: RunStore):
        self.store = store

    def start_run(self, run: str, config: Dict[str, Any], meta: Dict[str, Any]) -> None:
        self.store.start_run(run, config, meta)

    def log_metrics(self, step: int, tokens: Optional[int], metrics: Dict[str, float]) -> None:
        self.store.log_metrics(step, tokens, metrics)

    def log_probe(self, round: ProbeRound) -> None:
        self.store.log_probe(round)

    def log_alert(self, alert: Alert) -> None:
        self.store.log_alert(alert)

    def log_phase(
        self, step: int, tokens: Optional[int], phase: str, previous: Optional[str]
    ) -> None:
        self.store.log_phase(step, tokens, phase, previous)

    def log_expectations(self, step: int, rows: list) -> None:
        self.store.log_expectations(step, rows)

    def flush(self) -> None:
        self.store.flush()

    def close(self) -> None:
        self.store.close()
