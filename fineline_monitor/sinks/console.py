"""Console sink: a progress line every N steps, probe summaries and alerts, to stderr."""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, TextIO

from fineline_monitor import metric_names as names
from fineline_monitor.core.types import Alert, ProbeRound
from fineline_monitor.sinks.base import Sink


class ConsoleSink(Sink):
    name = "console"

    def __init__(self, every: int = 50, stream: Optional[TextIO] = None):
        self.every = every
        self.stream = stream or sys.stderr
        self._last_printed: Optional[int] = None

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def log_metrics(self, step: int, tokens: Optional[int], metrics: Dict[str, float]) -> None:
        if names.LOSS not in metrics:
            return
        if self._last_printed is not None and step - self._last_printed < self.every:
            return
        self._last_printed = step
        parts = [f"step {step:>7d}"]
        for key, fmt in (
            (names.LOSS, "loss {:.4f}"),
            (names.LR, "lr {:.2e}"),
            (names.GRAD_NORM, "gnorm {:.3f}"),
            (names.TOKENS_PER_S, "{:,.0f} tok/s"),
        ):
            if key in metrics and metrics[key] is not None:
                parts.append(fmt.format(metrics[key]))
        self._print("[fineline] " + " | ".join(parts))

    def log_probe(self, round: ProbeRound) -> None:
        caps = capability_line(round.capability_scores)
        self._print(
            f"[fineline] probe step {round.step}: {len(round.tasks)} tasks, "
            f"{round.tokens_scored:,} tokens in {round.seconds:.1f}s  {caps}"
        )

    def log_alert(self, alert: Alert) -> None:
        self._print(
            f"[fineline] {alert.severity.upper()} {alert.rule} at step {alert.step}: {alert.message}"
        )

    def log_phase(
        self, step: int, tokens: Optional[int], phase: str, previous: Optional[str]
    ) -> None:
        self._print(f"[fineline] phase {previous or '-'} -> {phase} at step {step}")


class AlertsFileSink(Sink):
    """Appends each alert to OUT/alerts.jsonl (the alerts JSONL of docs/formats.md).

    Idempotent across restarts: alerts already in the file (same step, rule and key)
    are not written again, so a resumed run does not duplicate lines.
    """

    name = "alerts_file"

    def __init__(self, path):
        import json
        from pathlib import Path

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seen = set()
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    d = json.loads(line)
                except ValueError:
                    continue  # a torn last line from a killed process
                self._seen.add(self._key(Alert.from_json(d)))
        self._fh = open(self.path, "a")

    @staticmethod
    def _key(a: Alert) -> Any:
        return (a.step, a.rule, a.dedup_key)

    def log_alert(self, alert: Alert) -> None:
        k = self._key(alert)
        if k in self._seen:
            return
        self._seen.add(k)
        self._fh.write(alert.to_jsonl() + "\n")
        self._fh.flush()

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def capability_line(scores: Dict[str, float]) -> str:
    """Each capability's headline with its unit: bits per byte until it has taken off, then
    accuracy above chance (probes/metrics.py)."""
    heads: Dict[str, List[str]] = {names.CAP_BPB: [], names.CAP_ACC: []}
    for key in sorted(scores):
        cap, _, series = key.rpartition("/")
        if series != names.CAP_HEADLINE:
            continue
        took = scores.get(f"{cap}/{names.CAP_TOOK_OFF}", 0.0) >= 0.5
        heads[names.CAP_ACC if took else names.CAP_BPB].append(f"{cap}={scores[key]:.3f}")
    parts = [f"{names.describe_capability_series(s)}: {' '.join(v)}" for s, v in heads.items() if v]
    if not parts:  # scores without the capability series
        return " ".join(f"{c}={v:+.3f}" for c, v in sorted(scores.items()))
    return "; ".join(parts)
