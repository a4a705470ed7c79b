"""Hugging Face `Trainer` adapter: a `TrainerCallback`.

    from fineline_monitor.integrations.hf_trainer import FineLineCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[FineLineCallback(config=cfg, tokenizer=tok)])

The Trainer calls `on_step_end` after every optimizer step (gradient accumulation is
already folded in: `state.global_step` counts optimizer steps) and, on a logging step,
`on_log` right after it with that step's loss / grad_norm / learning_rate. So a step
whose `control.should_log` is set is handed to the monitor from `on_log`, with its own
values (set `logging_steps=1` for a per-step loss); other steps from `on_step_end`,
without a loss. The monitor is built on `on_train_begin` (the model and optimizer exist
then). Tokens come from `state.num_input_tokens_seen` when `include_num_input_tokens_seen`
is on. Ranks: the Trainer's torch.distributed group is plain data parallelism
(DistContext.detect()); rank 0 logs.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

try:  # the base class, when transformers is installed (it is a core dependency)
    from transformers import TrainerCallback as _Base
except Exception:  # pragma: no cover
    _Base = object  # type: ignore[misc,assignment]


class FineLineCallback(_Base):  # type: ignore[misc,valid-type]
    def __init__(
        self, config: Any = None, *, tokenizer: Any = None, scorer: Any = None, **monitor_kw: Any
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.scorer = scorer
        self.monitor_kw = monitor_kw
        self.monitor = None
        self._last: Dict[str, float] = {}
        self._pending: Optional[Tuple[int, Optional[int], bool]] = (
            None  # (step, tokens, skipped) awaiting on_log
        )

    def on_train_begin(
        self, args, state, control, model=None, optimizer=None, processing_class=None, **kw
    ):
        from fineline_monitor.monitor import FineLineMonitor

        tok = self.tokenizer or processing_class or kw.get("tokenizer")
        if self.monitor is None:
            self.monitor = FineLineMonitor(
                model=model,
                optimizer=optimizer,
                config=self.config,
                tokenizer=tok,
                scorer=self.scorer,
                run_meta={"framework": "hf-trainer"},
                **self.monitor_kw,
            )

    def on_log(self, args, state, control, logs: Optional[Dict[str, float]] = None, **kw):
        if not logs or "loss" not in logs:  # evaluation logs have eval_* keys only
            return
        for key in ("loss", "grad_norm", "learning_rate"):
            if key in logs:
                self._last[key] = float(logs[key])
        if self._pending is not None and self._pending[0] == state.global_step:
            step, tokens, skipped = self._pending
            self._pending = None
            self._step(
                control,
                step,
                tokens,
                skipped,
                loss=self._last.pop("loss", None),
                grad_norm=self._last.pop("grad_norm", None),
            )
        # else: a log after its step was handed over (logging_strategy="epoch" logs from
        # on_epoch_end): its values go with the next step, late rather than lost (the very
        # last one, after the last step, is not handed over)

    def on_step_end(self, args, state, control, **kw):
        if self.monitor is None:
            return
        self._flush_pending(control)
        tokens = getattr(state, "num_input_tokens_seen", None) or None
        # fp16 AMP: accelerate's optimizer says whether the GradScaler skipped this step
        # (its logged grad_norm is then inf, which is no fault)
        skipped = bool(getattr(kw.get("optimizer"), "step_was_skipped", False))
        if control.should_log:
            # the Trainer logs this step right after this callback: step the monitor from
            # on_log, with this step's loss (values here would be the previous log's)
            self._pending = (int(state.global_step), tokens, skipped)
            return
        gn = self._last.pop("grad_norm", None)
        if gn is not None and not math.isfinite(gn):
            gn = None  # a late value: whether its step was an AMP skip is not known any more
        self._step(
            control,
            int(state.global_step),
            tokens,
            skipped,
            loss=self._last.pop("loss", None),
            grad_norm=gn,
        )

    def _flush_pending(self, control) -> None:
        """A step announced for logging whose log never came (the Trainer skips a log
        when nothing new was accumulated): step it without values."""
        if self._pending is not None:
            (step, tokens, skipped), self._pending = self._pending, None
            self._step(control, step, tokens, skipped)

    def _step(
        self,
        control,
        step: int,
        tokens: Optional[int],
        skipped: bool,
        *,
        loss: Any = None,
        grad_norm: Any = None,
    ) -> None:
        self.monitor.step(
            step=step,
            loss=loss,
            tokens=tokens,
            lr=self._last.get("learning_rate"),
            grad_norm=grad_norm,
            skipped=skipped,
        )
        if self.monitor.should_stop:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kw):
        if self.monitor is not None:
            self._flush_pending(control)
            self.monitor.close()
