"""fineline_monitor: a live training monitor for LLM pretraining.

Importing this package is cheap and imports no framework (no deepspeed, megatron,
wandb or prometheus_client); those load when the matching adapter or sink is used.
"""

from fineline_monitor.core.config import ConfigError, MonitorConfig
from fineline_monitor.core.types import Alert, ProbeRound, RequestScore, TaskResult
from fineline_monitor.monitor import FineLineMonitor

__version__ = "0.1.0"
__all__ = [
    "FineLineMonitor",
    "MonitorConfig",
    "ConfigError",
    "Alert",
    "ProbeRound",
    "RequestScore",
    "TaskResult",
    "__version__",
]
