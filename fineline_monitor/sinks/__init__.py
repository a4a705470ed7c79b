"""Sinks: where metrics, probe rounds and alerts go. `build_sinks` reads SinkConfig.

A sink named in the config whose package is missing is an error at attach time (never
silently dropped): `pip install fineline-monitor[wandb]` / `[prometheus]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

from fineline_monitor.sinks.base import NullSink, Sink

__all__ = ["Sink", "NullSink", "build_sinks"]


def build_sinks(
    config: Any,
    out_dir: Path,
    run: str,
    on_error: Optional[Callable[[str, BaseException], None]] = None,
) -> Tuple[List[Any], Optional[Any]]:
    """The sinks of the logging rank, and the run store (or None when it is not enabled).

    Bad configuration (a sink's package missing, a required environment variable unset)
    raises: it must fail at attach time. A sink that fails to start for a runtime reason
    (a port taken, a read-only disk) is passed to `on_error(part, exc)` and left out,
    so the other sinks still run; without `on_error` it raises.
    """
    from fineline_monitor.core.config import ConfigError
    from fineline_monitor.sinks.console import AlertsFileSink, ConsoleSink

    sc = config.sinks
    sinks: List[Any] = []
    store = None
    out_dir = Path(out_dir)

    def attempt(part: str, build: Callable[[], Any]) -> Any:
        try:
            return build()
        except (ImportError, ConfigError):
            raise
        except Exception as e:  # noqa: BLE001 - isolated below, one sink at a time
            if on_error is None:
                raise
            on_error(part, e)
            return None

    if "store" in sc.enabled:
        from fineline_monitor.core.store import RunStore, StoreSink

        store = attempt("sink:store", lambda: RunStore(out_dir / "run.db", run))
        if store is not None:
            sinks.append(StoreSink(store))
        alerts_file = attempt("sink:alerts_file", lambda: AlertsFileSink(out_dir / "alerts.jsonl"))
        if alerts_file is not None:
            sinks.append(alerts_file)
    if "console" in sc.enabled:
        sinks.append(ConsoleSink(every=sc.console_every))
    for name in ("wandb", "prometheus", "webhook"):
        if name in sc.enabled:
            sink = attempt(
                f"sink:{name}", lambda name=name: _build_optional(name, config, out_dir, run)
            )
            if sink is not None:
                sinks.append(sink)
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
        raise ImportError(
            f"sink `{name}` is enabled in sinks.enabled but cannot be imported: {e}{hint}"
        ) from e
    return cls.from_config(config, out_dir=out_dir, run=run)
