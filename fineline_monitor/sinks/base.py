"""The sink interface: where metrics, probe rounds and alerts go.

A sink must never block or take down the training step. Sinks that talk to the network
wrap themselves in `fineline_monitor.sinks.background.BackgroundSink` (bounded queue,
counted drops); local ones (the store, the console) write inline.
Non-logging ranks get `NullSink` instead of `if rank == 0` everywhere.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from fineline_monitor.core.types import Alert, ProbeRound


class Sink:
    """Base class: every hook is optional, the default does nothing."""

    name = "sink"

    def start_run(self, run: str, config: Dict[str, Any], meta: Dict[str, Any]) -> None:
        """Called once on attach with the run name, the config as a dict and metadata."""

    def log_metrics(self, step: int, tokens: Optional[int], metrics: Dict[str, float]) -> None:
        """Scalar metrics (indicators, loss) at a collection step."""

    def log_probe(self, round: ProbeRound) -> None:
        """A completed probe round."""

    def log_alert(self, alert: Alert) -> None:
        """An alert that fired (already de-duplicated and past hysteresis)."""

    def log_phase(
        self, step: int, tokens: Optional[int], phase: str, previous: Optional[str]
    ) -> None:
        """A training-phase transition."""

    def log_expectations(self, step: int, rows: list) -> None:
        """Expected values and bands per curve: rows of dicts with name, expected, low, high."""

    def flush(self) -> None:
        """Push anything buffered; may be a no-op."""

    def close(self) -> None:
        """Flush and release resources."""


class NullSink(Sink):
    """The do-nothing sink of ranks that do not own the loss."""

    name = "null"
