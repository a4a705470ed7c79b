"""What every framework wrapper forwards unchanged to its FineLineMonitor."""

from __future__ import annotations

from typing import Any, Dict


class MonitorPassThrough:
    """Mixin for adapters that hold a FineLineMonitor in `self.monitor`."""

    monitor: Any

    @property
    def should_stop(self) -> bool:
        return self.monitor.should_stop

    def probe_now(self, **kw: Any) -> Any:
        return self.monitor.probe_now(**kw)

    def state_dict(self) -> Dict[str, Any]:
        return self.monitor.state_dict()

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.monitor.load_state_dict(sd)

    def flush(self) -> None:
        self.monitor.flush()

    def close(self) -> None:
        self.monitor.close()
