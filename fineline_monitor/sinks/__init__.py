"""Sinks: where metrics, probe rounds and alerts go. `build_sinks` reads SinkConfig.

A sink named in the config whose package is missing is an error at attach time (never
silently dropped): `pip install fineline-monitor[wandb]` / `[prometheus]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Tuple

from fineline_monitor.sinks.base import NullSink, Sink

__all__ = ["Sink", "NullSink", "build_sinks"]


def build_sinks(config: Any, out_dir: Path, run: str) -> Tuple[List[Any], Optional[Any]]:
    """The sinks of the logging rank, and the run store (or None when it is not enabled)."""
    from fineline_monitor.sinks.console import AlertsFileSink, ConsoleSink

    sc = config.sinks
    sinks: List[Any] = []
    store = None
    out_dir = Path(out_dir)
    if "store" in sc.enabled:
        from fineline_monitor.core.store import RunStore, StoreSink

        store = RunStore(out_dir / "run.db", run)
        sinks.append(StoreSink(store))
        sinks.append(AlertsFileSink(out_dir / "alerts.jsonl"))
    if "console" in sc.enabled:
        sinks.append(ConsoleSink(every=sc.console_every))
    for name in ("wandb", "prometheus", "webhook"):
        if name in sc.enabled:
            sinks.append(_build_optional(name, config, out_dir, run))
    return sinks, store


def _build_optional(name: str, config: Any, out_dir: Path, run: str) -> Any:
    extra = {"wandb": "wandb", "prometheus": "prometheus", "webhook": None}[name]
    try:
        if name == "wandb":
            from fineline_monitor.sinks.wandb_sink import WandbSink as cls
        elif name == "prometheus":
            from fineline_monitor.sinks.prometheus import PrometheusSink as cls
        else:
            from fineline_monitor.sinks.webhook import WebhookSink as cls
    except ImportError as e:
        hint = f" (pip install 'fineline-monitor[{extra}]')" if extra else ""
        raise ImportError(f"sink `{name}` is enabled in sinks.enabled but cannot be imported: {e}{hint}") from e
    return cls.from_config(config, out_dir=out_dir, run=run)
