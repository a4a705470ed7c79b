"""Hugging Face `Trainer` adapter: a `TrainerCallback`.

    from fineline_monitor.integrations.hf_trainer import FineLineCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[FineLineCallback(config=cfg, tokenizer=tok)])

The Trainer calls `on_log` with the logged loss / grad_norm / learning_rate every
`logging_steps`, and `on_step_end` after every optimizer step (gradient accumulation is
already folded in: `state.global_step` counts optimizer steps). The monitor is built on
`on_train_begin` (the model and optimizer exist then) and stepped on `on_step_end`, with
the most recent logged values (set `logging_steps=1` for a per-step loss). Tokens come
from `state.num_input_tokens_seen` when `include_num_input_tokens_seen` is on. Ranks:
the Trainer's torch.distributed group is plain data parallelism (DistContext.detect());
rank 0 logs.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

try:  # the base class, when transformers is installed (it is a core dependency)
    from transformers import TrainerCallback as _Base
except Exception:  # pragma: no cover
    _Base = object  # type: ignore[misc,assignment]


class FineLineCallback(_Base):  # type: ignore[misc,valid-type]
    def __init__(self, config: Any = None, *, tokenizer: Any = None, scorer: Any = None, **monitor_kw: Any):
        self.config = config
        self.tokenizer = tokenizer
        self.scorer = scorer
        self.monitor_kw = monitor_kw
        self.monitor = None
        self._last: Dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, processing_class=None, **kw):
        from fineline_monitor.monitor import FineLineMonitor

        tok = self.tokenizer or processing_class or kw.get("tokenizer")
        if self.monitor is None:
            self.monitor = FineLineMonitor(model=model, optimizer=optimizer, config=self.config, tokenizer=tok,
                                           scorer=self.scorer, run_meta={"framework": "hf-trainer"},
                                           **self.monitor_kw)

    def on_log(self, args, state, control, logs: Optional[Dict[str, float]] = None, **kw):
        for key in ("loss", "grad_norm", "learning_rate"):
            if logs and key in logs:
                self._last[key] = float(logs[key])

    def on_step_end(self, args, state, control, **kw):
        if self.monitor is None:
            return
        tokens = getattr(state, "num_input_tokens_seen", None) or None
        self.monitor.step(step=int(state.global_step), loss=self._last.pop("loss", None), tokens=tokens,
                          lr=self._last.get("learning_rate"), grad_norm=self._last.pop("grad_norm", None))
        if self.monitor.should_stop:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kw):
        if self.monitor is not None:
            self.monitor.close()
