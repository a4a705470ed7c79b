"""DeepSpeed adapter: the monitor attached to a DeepSpeed engine.

    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    monitor = DeepSpeedMonitor(engine, config=cfg, tokenizer=tok)
    for batch in loader:                       # micro-batches
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        monitor.step(loss=loss, tokens=tokens_seen)   # every micro-step; acts once per optimizer step
    monitor.close()

With the pipeline engine, call `monitor.step(loss=engine.train_batch(it), tokens=...)`.

What it takes from the engine, and why:

* Optimizer steps: DeepSpeed's `engine.step()` only updates at gradient-accumulation
  boundaries. `step()` compares `engine.global_steps` with what it saw last time: the
  monitor steps exactly once per optimizer step (skipped fp16 overflow steps included,
  flagged `skipped`), with the mean loss of that step's micro-batches.
* Gradient norm: `engine.get_global_grad_norm()` (ZeRO 1-3, fp16/bf16 optimizers; global
  over DP/MP). Plain fp32 without ZeRO does not store it: when gradient clipping is on we
  capture the norm DeepSpeed's own `clip_grad_norm_` returns (no extra pass), otherwise
  an optimizer step pre-hook computes it from the (already all-reduced) gradients.
* Loss scale: the fp16 optimizer's `cur_scale` when fp16 is enabled; skipped steps from
  `engine.skipped_steps`.
* Ranks: probe documents are sharded over DeepSpeed's data-parallel group; rank 0 logs.
* ZeRO-3: parameters live in shards (`param.ds_tensor`); a forward is a collective (each
  layer all-gathers its parameters). So (1) every rank must run the same number of probe
  forwards: `EqualBatchesScorer` pads the rank's batch list to the DP-group maximum with
  dummy batches whose results are dropped; (2) the per-step indicators see the rank's
  own shards: the update ratio is measured on the local shard (an unbiased sample of the
  whole model for any reasonable partitioning) and the global parameter norm comes
  from the shards' squared norms summed over the DP group at collect steps (one bounded
  all-reduce of one number). Under ZeRO 1-2 parameters are whole on every rank and the
  indicators use them directly; Adam-state statistics are not reported under ZeRO >= 1
  (the optimizer state is partitioned into flat buffers).
* Pipeline engine: probes go through `engine.eval_batch` (the inference schedule), with
  the module's `loss_fn` swapped for a per-token one for the duration of a probe batch;
  the last stage broadcasts the per-token results to the other stages
  (`DeepSpeedPipeTokenScorer`). The last pipeline layer must output logits [b, s, V].
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

from fineline_monitor import metric_names as names
from fineline_monitor.distributed import DistContext, bounded_all_reduce, collective_device
from fineline_monitor.integrations._wrapper import MonitorPassThrough

log = logging.getLogger("fineline_monitor")


# ---- ranks ------------------------------------------------------------------------------------


def deepspeed_dist_context(engine: Any, timeout_s: float = 300.0) -> DistContext:
    """DistContext of a DeepSpeed engine: its data-parallel group; global rank 0 logs."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return DistContext(timeout_s=timeout_s)
    grid = getattr(engine, "grid", None)
    if grid is not None:  # PipelineEngine: DP group from the topology grid
        dp_group, dp_rank, dp_size = (
            grid.get_data_parallel_group(),
            grid.get_data_parallel_rank(),
            grid.get_data_parallel_world_size(),
        )
    else:
        dp_group = getattr(engine, "data_parallel_group", None) or getattr(
            engine, "seq_data_parallel_group", None
        )
        dp_size = (
            dist.get_world_size(group=dp_group) if dp_group is not None else dist.get_world_size()
        )
        dp_rank = dist.get_rank(group=dp_group) if dp_group is not None else dist.get_rank()
    rank = dist.get_rank()
    return DistContext(
        rank=rank,
        world_size=dist.get_world_size(),
        dp_rank=dp_rank,
        dp_size=dp_size,
        dp_group=dp_group,
        is_logging_rank=(rank == 0),
        timeout_s=timeout_s,
    )


# ---- ZeRO-3 shard views -----------------------------------------------------------------------


def zero3_local_shards(params: List[Any]) -> List[Any]:
    """The valid part of each ZeRO-3 parameter's local shard (`ds_tensor` minus the
    partition padding, which DeepSpeed leaves uninitialised)."""
    import torch.distributed as dist

    out = []
    for p in params:
        shard = getattr(p, "ds_tensor", None)
        if shard is None:
            out.append(p.data)
            continue
        group = getattr(p, "ds_process_group", None)
        rank = dist.get_rank(group=group) if dist.is_initialized() else 0
        size = shard.numel()
        valid = max(0, min(size, int(p.ds_numel) - rank * size))
        out.append(shard.narrow(0, 0, valid))
    return out


class _ShardOptimizerView:
    """What StepIndicators reads from an optimizer (param_groups), over local shards."""

    def __init__(self, module: Any):
        self.param_groups = [{"params": zero3_local_shards(list(module.parameters()))}]
        self.state: Dict[Any, Any] = {}


# ---- gradient norm for plain fp32 without ZeRO --------------------------------------------------


class _Fp32GradNormCapture:
    """Stage 0, fp32: DeepSpeed computes the norm while clipping but does not keep it."""

    def __init__(self, engine: Any):
        self.value: Optional[float] = None
        self._engine = engine
        self._handle = None
        if engine.gradient_clipping() > 0.0:
            from deepspeed.runtime.utils import clip_grad_norm_

            def clip_and_keep() -> None:
                # Same call as DeepSpeedEngine.clip_fp32_gradients, keeping its result.
                self.value = clip_grad_norm_(
                    parameters=engine.module.parameters(),
                    max_norm=engine.gradient_clipping(),
                    mpu=engine.mpu,
                )

            engine.clip_fp32_gradients = clip_and_keep  # instance attribute, this engine only
        else:
            opt = engine.optimizer
            if hasattr(opt, "register_step_pre_hook"):
                self._handle = opt.register_step_pre_hook(self._pre_step)

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        import torch

        # Gradients are already all-reduced over DP at the boundary; identical everywhere.
        grads = [p.grad for p in self._engine.module.parameters() if p.grad is not None]
        if grads:
            self.value = torch.linalg.vector_norm(
                torch.stack(torch._foreach_norm(grads, 2))
            ).detach()


def _engine_grad_norm(engine: Any, capture: Optional[_Fp32GradNormCapture]) -> Any:
    gn = None
    try:
        gn = engine.get_global_grad_norm()
    except Exception:  # noqa: BLE001 - older engines / pipeline edge cases
        gn = None
    if gn is None and capture is not None:
        gn = capture.value
    if gn is not None and hasattr(gn, "detach"):
        gn = gn.detach()
    return gn


def _loss_scale(engine: Any) -> Optional[float]:
    try:
        if not engine.fp16_enabled():
            return None
    except Exception:  # noqa: BLE001
        return None
    opt = engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        v = getattr(opt, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
    scaler = getattr(opt, "loss_scaler", None)
    v = getattr(scaler, "cur_scale", None)
    return float(v) if isinstance(v, (int, float)) else None


# ---- pipeline engine: eval_batch token scorer ---------------------------------------------------


class DeepSpeedPipeTokenScorer:
    """Per-token log-probabilities through a PipelineEngine's `eval_batch`.

    `token_logprobs(input_ids, targets)` -> (logprob [b, s] float64 CPU, greedy [b, s] bool
    CPU), identical on every rank of the pipeline. The batch is split into micro-batches
    of the engine's micro-batch size (the last one padded); `eval_batch` runs the
    inference schedule (every stage joins), the last stage computes per-token NLL and the
    greedy flag from its logits with a temporary `loss_fn`, and broadcasts both.
    """

    def __init__(self, engine: Any):
        self.engine = engine

    def token_logprobs(self, input_ids: Any, targets: Any) -> Tuple[Any, Any]:
        import torch
        import torch.distributed as dist

        eng = self.engine
        b, s = input_ids.shape
        mbs = int(eng.train_micro_batch_size_per_gpu())
        n_mb = -(-b // mbs)
        pad = n_mb * mbs - b
        if pad:
            z = torch.zeros(pad, s, dtype=input_ids.dtype)
            input_ids, targets = torch.cat([input_ids, z]), torch.cat([targets, z])
        dev = eng.device
        micro = [
            (input_ids[i * mbs : (i + 1) * mbs].to(dev), targets[i * mbs : (i + 1) * mbs].to(dev))
            for i in range(n_mb)
        ]

        def per_token(logits: Any, labels: Any) -> Any:
            lf = logits.float()
            nll = torch.nn.functional.cross_entropy(lf.transpose(1, 2), labels, reduction="none")
            greedy = (lf.argmax(-1) == labels).float()
            return torch.stack([nll, greedy])  # [2, mb, s]

        module = eng.module
        saved = (module.loss_fn, eng.dynamic_shape, module.training)
        module.loss_fn = per_token
        eng.dynamic_shape = True  # probe batches differ in length from training batches
        try:
            out = eng.eval_batch(
                iter(micro),
                compute_loss=True,
                reduce_output=None,
                bcast_loss=False,
                num_micro_batches=n_mb,
            )
        finally:
            module.loss_fn, eng.dynamic_shape = saved[0], saved[1]
            module.train(saved[2])
            # Training's p2p buffers were sized for probe shapes: renegotiate next step.
            eng.first_output_send = True
            eng.pipe_recv_buf = None
            eng.grad_layer = None
        res = torch.zeros(2, n_mb * mbs, s, dtype=torch.float32, device=dev)
        if eng.is_last_stage():
            res.copy_(torch.cat([o.float() for o in out], dim=1))
        if eng.num_stages > 1:
            dist.broadcast(
                res, src=eng._loss_stage_global_rank(), group=eng.mpu.get_pipe_parallel_group()
            )
        res = res[:, :b].cpu()
        return -res[0].double(), res[1] > 0.5


# ---- the adapter --------------------------------------------------------------------------------


class DeepSpeedMonitor(MonitorPassThrough):
    """FineLineMonitor wired to a DeepSpeed engine. Call `step()` after every `engine.step()`
    (or after `engine.train_batch()`), on every rank."""

    def __init__(
        self,
        engine: Any,
        config: Any = None,
        *,
        tokenizer: Any = None,
        scorer: Any = None,
        sinks: Optional[List[Any]] = None,
        checkpoint_fn: Optional[Callable[[int], None]] = None,
        run_meta: Optional[Dict[str, Any]] = None,
    ):
        from fineline_monitor.core.config import MonitorConfig
        from fineline_monitor.monitor import FineLineMonitor

        cfg = MonitorConfig.coerce(config)
        self.engine = engine
        self.zero_stage = (
            int(engine.zero_optimization_stage())
            if hasattr(engine, "zero_optimization_stage")
            else 0
        )
        self.is_pipeline = hasattr(engine, "eval_batch") and hasattr(engine, "grid")
        self.dist = deepspeed_dist_context(engine, cfg.dist_timeout_s)
        module = engine.module

        # What the per-step indicators may read (see the module docstring).
        step_metrics_fn = None
        if self.zero_stage >= 3:
            ind_optimizer: Any = _ShardOptimizerView(module)
            step_metrics_fn = self._zero3_param_norm
        elif self.zero_stage >= 1:
            ind_optimizer = None  # whole params on every rank; optimizer state is flat partitions
        else:
            ind_optimizer = getattr(engine, "optimizer", None)
            ind_optimizer = getattr(
                ind_optimizer, "optimizer", ind_optimizer
            )  # fp16 wrapper -> torch optim
        self._capture = None
        if (
            self.zero_stage == 0
            and not (engine.fp16_enabled() or engine.bfloat16_enabled())
            and not self.is_pipeline
        ):
            self._capture = _Fp32GradNormCapture(engine)

        if (
            scorer is None
            and tokenizer is not None
            and (cfg.probe_every > 0 or cfg.probe_every_tokens > 0)
        ):
            scorer = self._build_scorer(cfg, tokenizer)
        meta = {
            "framework": "deepspeed",
            "zero_stage": self.zero_stage,
            "pipeline": self.is_pipeline,
        }
        meta.update(run_meta or {})
        self.monitor = FineLineMonitor(
            model=module,
            optimizer=ind_optimizer,
            config=cfg,
            tokenizer=tokenizer,
            scorer=scorer,
            dist=self.dist,
            sinks=sinks,
            checkpoint_fn=checkpoint_fn,
            run_meta=meta,
            step_metrics_fn=step_metrics_fn,
        )
        self._seen_global_steps = int(getattr(engine, "global_steps", 0))
        self._seen_skipped = int(getattr(engine, "skipped_steps", 0))
        self._loss_sum: Any = None
        self._loss_n = 0

    def _build_scorer(self, cfg: Any, tokenizer: Any) -> Any:
        from fineline_monitor.integrations._scoring import backend_scorer, hf_scorer

        if self.is_pipeline:
            max_len = int(getattr(cfg.probes, "max_length", 0) or 0) or 2048
            return backend_scorer(
                DeepSpeedPipeTokenScorer(self.engine),
                tokenizer,
                cfg.probes,
                self.dist,
                max_length=max_len,
                modules=[],
            )
        # ZeRO-3 forwards are collectives: every rank runs the same number of batches.
        return hf_scorer(
            self.engine.module,
            tokenizer,
            cfg.probes,
            self.dist,
            equal_batches=self.zero_stage >= 3,
            plain_rows=self.zero_stage >= 3,
        )

    def _zero3_param_norm(self) -> Dict[str, Any]:
        import torch

        shards = zero3_local_shards(list(self.engine.module.parameters()))
        sq = torch.zeros((), dtype=torch.float64)
        for t in shards:
            if t.numel():
                sq += t.detach().double().pow(2).sum().cpu()
        if self.dist.dp_size > 1:
            sq = bounded_all_reduce(
                sq.to(collective_device(self.dist.dp_group, self.dist.device_hint)),
                "SUM",
                group=self.dist.dp_group,
                timeout_s=self.dist.timeout_s,
            )
        return {names.PARAM_NORM: float(sq.sqrt())}

    # ---- per micro-step --------------------------------------------------------------------
    def step(
        self,
        loss: Any = None,
        tokens: Optional[int] = None,
        lr: Optional[float] = None,
        *,
        batch_tokens: Optional[int] = None,
    ) -> list:
        """Call after every `engine.step()` (or `train_batch()`). Returns the alerts fired at
        an optimizer step, [] otherwise."""
        eng = self.engine
        if loss is not None:
            v = loss.detach().float() if hasattr(loss, "detach") else float(loss)
            self._loss_sum = v if self._loss_sum is None else self._loss_sum + v
            self._loss_n += 1
        gs = int(eng.global_steps)
        if gs == self._seen_global_steps:
            return []  # between accumulation boundaries: nothing happened to the weights
        skipped_now = int(getattr(eng, "skipped_steps", 0))
        skipped = skipped_now > self._seen_skipped
        self._seen_global_steps, self._seen_skipped = gs, skipped_now
        mean_loss = None if self._loss_sum is None else self._loss_sum / max(1, self._loss_n)
        self._loss_sum, self._loss_n = None, 0
        if lr is None:
            try:
                lr = float(eng.get_lr()[0])
            except Exception:  # noqa: BLE001
                lr = None
        return self.monitor.step(
            step=gs,
            loss=mean_loss,
            tokens=tokens,
            lr=lr,
            grad_norm=_engine_grad_norm(eng, self._capture),
            loss_scale=_loss_scale(eng),
            skipped=skipped,
            batch_tokens=batch_tokens,
        )
