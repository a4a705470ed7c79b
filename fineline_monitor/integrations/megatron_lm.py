"""Megatron-LM hook: attach the monitor to `pretrain()` without a callback API.

Megatron-LM's loop (megatron/training/training.py, `train()`) calls two module-level
functions every iteration, looked up at call time:

    train_step(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config, ...)
        -> (loss_dict, skipped_iter, should_checkpoint, should_exit, exit_code, grad_norm, ...)
    training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale,
                 report_memory_flag, skipped_iter, grad_norm, params_norm, ...)

`install()` wraps both in that module (two lines in pretrain_gpt.py, before `pretrain(...)`):

* the `train_step` wrapper sees `model` (the list of DDP-wrapped chunks) and `optimizer`
  on the first call and builds a `MegatronMonitor` from them (megatron's parallel
  state, the TP-safe scorer, the forward-only schedule under PP);
* the `training_log` wrapper runs after Megatron's own logging, on every rank, with the
  iteration already incremented, and calls `monitor.step(step=iteration, loss=lm loss
  (last stage), tokens=consumed_train_samples * seq_length, lr, grad_norm (from the
  optimizer, global), loss_scale, skipped)`. A probe round therefore runs between
  iterations, like Megatron's own evaluation; with `--overlap-param-gather` the forward
  pre-hooks are disabled around it exactly as `evaluate()` does.

Arguments are bound by name (`inspect.signature`), so the wrappers survive reordering of
positional parameters between Megatron-LM versions. `uninstall()` restores the originals and
closes the monitor; without it the monitor is closed when the interpreter exits.
Megatron-LM itself is not on PyPI; the wrapping logic is tested against megatron-core
with stand-ins for these two functions that have Megatron-LM's signatures
(tests/integration/test_megatron_lm_hook.py).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import inspect
import logging
import sys
from typing import Any, Callable, Dict, Optional

log = logging.getLogger("fineline_monitor")


class MegatronLMHook:
    def __init__(
        self,
        config: Any = None,
        *,
        tokenizer: Any = None,
        training_module: Any = None,
        **monitor_kw: Any,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.mod = training_module
        self.monitor_kw = monitor_kw
        self.monitor = None
        self._orig: Dict[str, Callable] = {}

    # ---- install / uninstall ---------------------------------------------------------------
    def install(self) -> "MegatronLMHook":
        mod = self.mod or importlib.import_module("megatron.training.training")
        self.mod = mod
        for name in ("train_step", "training_log"):
            fn = getattr(mod, name, None)
            if fn is None:
                raise AttributeError(
                    f"{mod.__name__}.{name} not found: this Megatron-LM version is not supported "
                    "by fineline_monitor's hook (it wraps train_step and training_log)"
                )
            self._orig[name] = fn
        mod.train_step = self._wrap_train_step(self._orig["train_step"])
        mod.training_log = self._wrap_training_log(self._orig["training_log"])
        # pretrain() returns (or sys.exit()s) without telling us: close the monitor when the
        # interpreter exits, or `fineline_run_finished` never turns 1 and the textfile /
        # push-gateway "training stalled" alert fires after a normal end. close() only
        # flushes sinks (no collective), so it is safe that late.
        atexit.register(self._at_exit)
        return self

    def uninstall(self) -> None:
        for name, fn in self._orig.items():
            setattr(self.mod, name, fn)
        if self.monitor is not None:
            self.monitor.close()
        atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        if self.monitor is None:
            return
        try:
            if (
                getattr(sys, "last_exc", None) is not None
                or getattr(sys, "last_value", None) is not None
            ):
                # the script died of an uncaught exception (Python sets sys.last_* before
                # atexit runs): keep what was logged, but do not say the run finished, so the
                # stalled-training alert still pages for the dead job
                self.monitor.flush()
            else:
                self.monitor.close()
        except Exception:  # noqa: BLE001 - at exit there is nobody left to tell but the log
            log.exception("fineline_monitor: closing the monitor at exit failed")

    # ---- wrappers ----------------------------------------------------------------------------
    def _wrap_train_step(self, orig: Callable) -> Callable:
        sig = inspect.signature(orig)

        def train_step(*args: Any, **kwargs: Any) -> Any:
            if self.monitor is None:
                a = sig.bind_partial(*args, **kwargs).arguments
                self._build(a.get("model"), a.get("optimizer"))
            return orig(*args, **kwargs)

        train_step.__wrapped__ = orig  # type: ignore[attr-defined]
        return train_step

    def _wrap_training_log(self, orig: Callable) -> Callable:
        sig = inspect.signature(orig)

        def training_log(*args: Any, **kwargs: Any) -> Any:
            result = orig(*args, **kwargs)
            if self.monitor is not None:
                a = sig.bind_partial(*args, **kwargs).arguments
                self.monitor.step(
                    step=int(a["iteration"]),
                    loss=_lm_loss(a.get("loss_dict")),
                    tokens=_tokens_seen(),
                    lr=a.get("learning_rate"),
                    grad_norm=a.get("grad_norm"),
                    loss_scale=_float(a.get("loss_scale")),
                    skipped=bool(a.get("skipped_iter")),
                )
            return result

        training_log.__wrapped__ = orig  # type: ignore[attr-defined]
        return training_log

    def _build(self, model: Any, optimizer: Any) -> None:
        from fineline_monitor.integrations.megatron import MegatronMonitor

        tok = self.tokenizer if self.tokenizer is not None else _megatron_tokenizer()
        self.monitor = MegatronMonitor(
            model,
            optimizer,
            config=self.config,
            tokenizer=tok,
            around_forward=lambda: _pre_hooks_disabled(model),
            run_meta={"framework": "megatron-lm"},
            **self.monitor_kw,
        )


def install(
    config: Any = None, *, tokenizer: Any = None, training_module: Any = None, **monitor_kw: Any
) -> MegatronLMHook:
    """Wrap Megatron-LM's train_step and training_log; call before `pretrain(...)`."""
    return MegatronLMHook(
        config, tokenizer=tokenizer, training_module=training_module, **monitor_kw
    ).install()


# ---- helpers --------------------------------------------------------------------------------


def _lm_loss(loss_dict: Any) -> Any:
    """'lm loss' of the reduced loss dict (last pipeline stage only; None elsewhere)."""
    if not loss_dict:
        return None
    v = loss_dict.get("lm loss")
    if v is None:
        return None
    if hasattr(v, "numel") and v.numel() == 2:  # [sum, count] in some versions
        return v[0] / v[1].clamp(min=1)
    return v


def _tokens_seen() -> Optional[int]:
    try:
        from megatron.training import get_args

        args = get_args()
        return int(args.consumed_train_samples) * int(args.seq_length)
    except Exception:  # noqa: BLE001 - stand-ins in tests, other versions
        return None


def _float(x: Any) -> Optional[float]:
    if x is None:
        return None
    try:
        return float(x.item() if hasattr(x, "item") else x)
    except Exception:  # noqa: BLE001
        return None


def _megatron_tokenizer() -> Any:
    """Megatron-LM's tokenizer as `str -> list[int]` (it has `tokenize`, not `encode`)."""
    from megatron.training import get_tokenizer

    tok = get_tokenizer()
    return lambda text: list(tok.tokenize(text))


@contextlib.contextmanager
def _pre_hooks_disabled(model: Any):
    """Megatron-LM's evaluate(): with overlapped param gather, DDP forward pre-hooks are
    disabled around non-training forwards and re-enabled after."""
    try:
        from megatron.training import get_args
        from megatron.training.training import (
            disable_forward_pre_hook,
            enable_forward_pre_hook,
            should_disable_forward_pre_hook,
        )

        needed = should_disable_forward_pre_hook(get_args())
    except Exception:  # noqa: BLE001 - not Megatron-LM (tests, megatron-core only)
        needed = False
    if needed:
        disable_forward_pre_hook(model)
    try:
        yield
    finally:
        if needed:
            enable_forward_pre_hook(model)
