"""Lightning adapter: a `Callback`.

    from fineline_monitor.integrations.lightning import FineLineLightningCallback
    trainer = L.Trainer(callbacks=[FineLineLightningCallback(config=cfg, tokenizer=tok)], ...)

`on_train_batch_end` runs after every batch; with gradient accumulation the optimizer
steps only when `trainer.global_step` advances, so the monitor steps once per optimizer
step, with the mean of that step's batch losses (`outputs["loss"]`). The learning rate
comes from the first optimizer's first param group. Ranks: Lightning's DDP strategies are
plain data parallelism (DistContext.detect() after the process group exists); rank 0
logs. The Lightning import is lazy (this module is importable without it).
"""

from __future__ import annotations

from typing import Any, Optional


def _base():
    try:
        from lightning.pytorch import Callback

        return Callback
    except ImportError:  # pragma: no cover
        try:
            from pytorch_lightning import Callback

            return Callback
        except ImportError:
            return object


class _Impl:
    def __init__(
        self, config: Any = None, *, tokenizer: Any = None, scorer: Any = None, **monitor_kw: Any
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.scorer = scorer
        self.monitor_kw = monitor_kw
        self.monitor = None
        self._seen_step = 0
        self._loss_sum: Any = None
        self._n = 0

    def on_train_start(self, trainer, pl_module):
        from fineline_monitor.monitor import FineLineMonitor

        opt = trainer.optimizers[0] if trainer.optimizers else None
        if self.monitor is None:
            self.monitor = FineLineMonitor(
                model=pl_module,
                optimizer=opt,
                config=self.config,
                tokenizer=self.tokenizer,
                scorer=self.scorer,
                run_meta={"framework": "lightning"},
                **self.monitor_kw,
            )
        self._seen_step = int(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.monitor is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            v = loss.detach().float()
            self._loss_sum = v if self._loss_sum is None else self._loss_sum + v
            self._n += 1
        gs = int(trainer.global_step)
        if gs == self._seen_step:
            return  # accumulating: no optimizer step yet
        self._seen_step = gs
        opt = trainer.optimizers[0] if trainer.optimizers else None
        lr: Optional[float] = float(opt.param_groups[0]["lr"]) if opt is not None else None
        mean = None if self._loss_sum is None else self._loss_sum / max(1, self._n)
        self._loss_sum, self._n = None, 0
        tokens = getattr(pl_module, "tokens_seen", None)
        self.monitor.step(step=gs, loss=mean, tokens=tokens, lr=lr)
        if self.monitor.should_stop:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        if self.monitor is not None:
            self.monitor.close()


def FineLineLightningCallback(config: Any = None, **kw: Any):
    """Build the callback (a subclass of Lightning's Callback, created lazily)."""
    cls = type("FineLineLightningCallback", (_Impl, _base()), {})
    return cls(config, **kw)
