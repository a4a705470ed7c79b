"""Optimization-state indicators: cheap per-step statistics next to the loss, and
probe-round statistics (attention logits, output logits, activations, optimizer state).

Importing this package imports torch (the monitor imports it lazily, only when
indicators are enabled). Metric names and costs: docs/indicators.md.
"""

from fineline_monitor.indicators.attention import max_attention_logit
from fineline_monitor.indicators.probe import ProbeContext
from fineline_monitor.indicators.step import StepIndicators

__all__ = ["StepIndicators", "ProbeContext", "max_attention_logit"]
