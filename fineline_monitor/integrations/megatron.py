"""megatron-core adapter: the monitor inside a megatron-core (or Megatron-LM) training job.

    from fineline_monitor.integrations.megatron import MegatronMonitor
    monitor = MegatronMonitor(model, optimizer, config=cfg, tokenizer=tok)
    for it in range(train_iters):
        ...; ok, grad_norm, _ = optimizer.step()          # megatron's optimizer
        monitor.step(step=it + 1, loss=loss, tokens=consumed_tokens, grad_norm=grad_norm)
    monitor.close()

What makes it correct under megatron's parallelism (the design card's distributed rules):

* Tensor parallelism: probe scoring passes `labels` to `GPTModel.forward`, which returns
  the per-token cross entropy already reduced over the TP group by
  `vocab_parallel_cross_entropy`: the full [b, s, V] logits are never gathered. The
  greedy flag (is every continuation token the argmax?) is computed from the rank-local
  logit shard: local max and the label's logit on the rank that owns it, then one
  MAX and one SUM all-reduce of [b, s] over the TP group (`_TPGreedy`). A label counts as
  greedy when its logit equals the global maximum (ties count as greedy; lm-eval's
  argmax picks the lowest index, which differs only on exact float ties).
* Pipeline parallelism: the forward-only schedule (`get_forward_backward_func()` with
  `forward_only=True`); every rank of the pipeline joins every probe forward; only the
  last stage has losses, and it broadcasts the [b, s] per-token results to the other
  stages over the pipeline group, so every rank ends the round with the same numbers.
  megatron-core's schedules allocate on CUDA: PP needs a GPU (tests/gpu/).
* Data parallelism: probe documents are sharded over `parallel_state`'s data-parallel
  group (without context parallelism) through the DistContext built here; TP/PP peers
  of one replica get the same shard, so they run the same batches.
* Logging: from the rank that owns the loss: last pipeline stage, TP rank 0, DP rank 0.
* Gradient norm: megatron's optimizer returns it from `optimizer.step()` (global over
  TP/PP/DP, distributed optimizer included): pass it as `grad_norm=`. Without it
  (plain torch optimizers, CPU runs) `tp_grad_norm(model)` computes the same quantity.
* Attention logits: the indicators' megatron-core DotProductAttention hook records a
  per-rank maximum over the rank's own heads and layers; `_reduce_attention_max`
  reduces it with MAX over the model-parallel group at the end of every probe round.

Context parallelism is not supported by the scorer (it would need the sequence split
over CP ranks); attach raises a clear error when CP > 1.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

from fineline_monitor.distributed import DistContext, collective_device, module_device
from fineline_monitor.integrations._wrapper import MonitorPassThrough

log = logging.getLogger("fineline_monitor")


# ---- parallel state -> DistContext -----------------------------------------------------------


def megatron_dist_context(timeout_s: float = 300.0) -> DistContext:
    """DistContext from megatron's `parallel_state`: DP group without context parallelism,
    logging on the rank that owns the loss (last PP stage, TP rank 0, DP rank 0)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not (dist.is_available() and dist.is_initialized()):
        return DistContext(timeout_s=timeout_s)
    if not ps.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron parallel state is not initialized: call "
            "megatron.core.parallel_state.initialize_model_parallel(...) before attaching "
            "the monitor"
        )
    if ps.get_context_parallel_world_size() > 1:
        raise NotImplementedError(
            "fineline_monitor's megatron scorer does not support context parallelism "
            f"(context_parallel_size={ps.get_context_parallel_world_size()}); "
            "run probes with CP=1"
        )
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_group=ps.get_data_parallel_group(),
        is_logging_rank=is_loss_owner(),
        timeout_s=timeout_s,
    )


def is_loss_owner() -> bool:
    """True on the one rank that owns the (DP-reduced) loss: last PP stage, TP 0, DP 0."""
    from megatron.core import parallel_state as ps

    return (
        ps.is_pipeline_last_stage(ignore_virtual=True)
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
    )


def unwrap_megatron(model: Any) -> Any:
    """The GPTModel under Megatron's wrappers (a list of chunks, DDP, Float16Module)."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise NotImplementedError(
                "virtual pipeline parallelism (several model chunks per rank) is not "
                "supported by the probe scorer; got %d chunks" % len(model)
            )
        model = model[0]
    seen = 0
    while (
        not hasattr(model, "output_layer")
        and not hasattr(model, "post_process")
        and hasattr(model, "module")
        and seen < 8
    ):
        model = model.module
        seen += 1
    return model


# ---- greedy flag under TP without gathering logits ---------------------------------------------


class _TPGreedy:
    """Forward hook on `output_layer` (ColumnParallelLinear): from the rank-local logits
    shard [s, b, V/tp], is each label the argmax over the full vocabulary?

    Two [s, b] all-reduces over the TP group (MAX of the local maxima, SUM of the label
    logit that only its owner contributes) replace a gather of [s, b, V] logits.
    """

    def __init__(self, module: Any):
        self.module = module
        self.labels = None  # [b, s] set before each forward
        self.results: List[Any] = []  # [b, s] bool per forward, in call order
        self._handle = None

    def __enter__(self) -> "_TPGreedy":
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: Any, args: Any, output: Any) -> None:
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        logits = output[0] if isinstance(output, (tuple, list)) else output  # [s, b, Vp]
        if self.labels is None:
            return
        labels = self.labels.transpose(0, 1).to(logits.device)  # [s, b]
        with torch.no_grad():
            lg = logits.detach().float()
            vp = lg.shape[-1]
            tp = ps.get_tensor_model_parallel_world_size()
            start = ps.get_tensor_model_parallel_rank() * vp if tp > 1 else 0
            local_max = lg.amax(dim=-1)
            owned = (labels >= start) & (labels < start + vp)
            idx = (labels - start).clamp(0, vp - 1).unsqueeze(-1)
            label_logit = torch.where(
                owned, lg.gather(-1, idx).squeeze(-1), torch.zeros_like(local_max)
            )
            if tp > 1:
                group = ps.get_tensor_model_parallel_group()
                dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
                dist.all_reduce(label_logit, op=dist.ReduceOp.SUM, group=group)
            self.results.append((label_logit >= local_max).transpose(0, 1).cpu())


# ---- the token-level scorer --------------------------------------------------------------------


def _causal_mask(s: int, device: Any):
    import torch

    # megatron's convention: True = masked out. Passing it explicitly also avoids
    # megatron's CUDA-allocated default causal mask on CPU runs.
    return torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), diagonal=1)[None, None]


class MegatronTokenScorer:
    """Per-token log-probabilities of given targets under a megatron-core GPTModel.

    `token_logprobs(input_ids, targets)` takes right-padded [b, s] LongTensors (targets
    are the next tokens; padded positions may hold any valid id) and returns
    `(logprob [b, s] float64 on CPU, greedy [b, s] bool on CPU)`, the same on every rank
    of the job (TP peers compute it together; PP stages receive it from the last stage).
    Forward-only and no_grad; the model's train/eval mode is restored after.
    """

    def __init__(
        self,
        model: Any,
        *,
        micro_batch_size: Optional[int] = None,
        greedy: bool = True,
        around_forward: Optional[Callable[[], Any]] = None,
    ):
        from megatron.core import parallel_state as ps

        self.model = model  # as given (possibly a list of wrapped chunks): forward goes through it
        self.core = unwrap_megatron(model)
        # Megatron-LM keeps a list of (DDP-wrapped) chunks; without virtual PP it has one.
        self.chunk = model[0] if isinstance(model, (list, tuple)) else model
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.micro_batch_size = micro_batch_size
        self.greedy = greedy
        # Megatron-LM's DDP with overlapped param gather installs forward pre-hooks that must
        # be off outside train_step (as in its own evaluate()); the hook passes that here.
        self.around_forward = around_forward or contextlib.nullcontext
        self.config = getattr(self.core, "config", None)
        self.padded_vocab_size = int(getattr(self.core, "vocab_size", 0)) or None
        self.max_sequence_length = int(getattr(self.core, "max_sequence_length", 0)) or None

    @property
    def device(self):
        import torch

        for p in self.core.parameters():
            return p.device
        return torch.device("cpu")

    def _pad_len(self, s: int) -> int:
        # Sequence parallelism splits the sequence over TP ranks: keep it divisible.
        if (
            self.config is not None
            and getattr(self.config, "sequence_parallel", False)
            and self.tp > 1
        ):
            return -(-s // self.tp) * self.tp
        return s

    def token_logprobs(self, input_ids, targets) -> Tuple[Any, Any]:
        import torch

        if input_ids.shape != targets.shape or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and targets {tuple(targets.shape)} must both "
                "be [batch, seq]"
            )
        b, s = input_ids.shape
        sp = self._pad_len(s)
        if sp != s:
            pad = torch.zeros(b, sp - s, dtype=input_ids.dtype)
            input_ids, targets = torch.cat([input_ids, pad], 1), torch.cat([targets, pad], 1)
        modules = self.model if isinstance(self.model, (list, tuple)) else [self.model]
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            with torch.no_grad(), self.around_forward():
                if self.pp > 1:
                    nll, greedy = self._forward_pipeline(input_ids, targets)
                else:
                    nll, greedy = self._forward_direct(input_ids, targets)
        finally:
            for m, t in zip(modules, was_training):
                m.train(t)
        return (-nll[:, :s].double()), greedy[:, :s]

    # -- PP = 1: call the model; TP reduction happens inside vocab_parallel_cross_entropy
    def _forward_direct(self, input_ids, targets):
        import torch

        dev = self.device
        ids, tg = input_ids.to(dev), targets.to(dev)
        b, s = ids.shape
        pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, -1)
        greedy_ctx = _TPGreedy(self.core.output_layer) if self.greedy else contextlib.nullcontext()
        with greedy_ctx as g:
            if g is not None:
                g.labels = tg
            nll = self.chunk(ids, pos, _causal_mask(s, dev), labels=tg)
        nll = nll.float().cpu()
        greedy = (
            g.results[-1] if g is not None and g.results else torch.zeros(b, s, dtype=torch.bool)
        )
        return nll, greedy

    # -- PP > 1: megatron's forward-only schedule; every stage joins every forward
    def _forward_pipeline(self, input_ids, targets):
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        dev = self.device
        b, s = input_ids.shape
        mbs = self.micro_batch_size or b
        mbs = max(1, min(mbs, b))
        chunks = [(input_ids[i : i + mbs], targets[i : i + mbs]) for i in range(0, b, mbs)]
        # The schedule's p2p buffers have a fixed shape: pad the last micro-batch to mbs.
        last_ids, last_tg = chunks[-1]
        if last_ids.shape[0] < mbs:
            fill = mbs - last_ids.shape[0]
            z = torch.zeros(fill, s, dtype=input_ids.dtype)
            chunks[-1] = (torch.cat([last_ids, z]), torch.cat([last_tg, z]))
        last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        greedy_ctx = (
            _TPGreedy(self.core.output_layer)
            if (self.greedy and last_stage)
            else contextlib.nullcontext()
        )

        def forward_step(data_iterator, model):
            ids, tg = next(data_iterator)
            ids, tg = ids.to(dev), tg.to(dev)
            if g is not None:
                g.labels = tg
            pos = torch.arange(s, device=dev).unsqueeze(0).expand(ids.shape[0], -1)
            out = model(ids, pos, _causal_mask(s, dev), labels=tg)

            def loss_func(output_tensor):
                return output_tensor.float().sum(), {"token_nll": output_tensor.detach().float()}

            return out, loss_func

        with greedy_ctx as g:
            fb = get_forward_backward_func()
            data = fb(
                forward_step_func=forward_step,
                data_iterator=iter(chunks),
                model=[self.core]
                if not isinstance(self.model, (list, tuple))
                else list(self.model),
                num_microbatches=len(chunks),
                seq_length=s,
                micro_batch_size=mbs,
                forward_only=True,
            )
            greedy_parts = list(g.results) if g is not None else []
        nll = torch.zeros(b, s, dtype=torch.float32, device=dev)
        greedy = torch.zeros(b, s, dtype=torch.float32, device=dev)
        if last_stage:
            got = torch.cat([d["token_nll"] for d in data])[:b]
            nll.copy_(got.to(dev))
            if greedy_parts:
                greedy.copy_(torch.cat(greedy_parts)[:b].float().to(dev))
        # Every stage leaves with the same numbers: broadcast from the last stage.
        group = ps.get_pipeline_model_parallel_group()
        src = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(nll, src=src, group=group)
        dist.broadcast(greedy, src=src, group=group)
        return nll.cpu(), greedy.cpu() > 0.5


# ---- gradient norm and attention-logit reduction -----------------------------------------------


def tp_grad_norm(model: Any) -> float:
    """Global L2 norm of the gradients of a megatron model, as megatron's optimizer computes
    it: tensor-parallel shards count once each, duplicated (non-TP) params once per model-
    parallel group; summed over the model-parallel group (TP x PP). DP replicas hold the
    same reduced gradients, so no DP reduction. Use it when the optimizer is not
    megatron's (CPU runs); otherwise pass the grad norm `optimizer.step()` returns."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    core = unwrap_megatron(model)
    total = torch.zeros((), dtype=torch.float64)
    for p in core.parameters():
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad
        if g is None or not param_is_not_tensor_parallel_duplicate(p):
            continue
        total += g.detach().double().pow(2).sum().cpu()
    if dist.is_initialized() and ps.get_model_parallel_group() is not None:
        group = ps.get_model_parallel_group()
        total = total.to(collective_device(group, module_device(core)))  # NCCL takes no CPU tensors
        dist.all_reduce(total, group=group)
    return float(total.sqrt())


def model_param_count(core: Any) -> int:
    """The whole model's parameters (what `params` in the run metadata and the exported
    table means), not this rank's: TP-duplicated parameters (layer norms, biases of row-
    parallel layers) counted once, the last pipeline stage's copy of tied embeddings
    (`shared`) left out, summed over the model-parallel group (TP x PP). A collective: every
    rank builds the monitor."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    n = sum(
        p.numel()
        for p in core.parameters()
        if param_is_not_tensor_parallel_duplicate(p) and not getattr(p, "shared", False)
    )
    group = ps.get_model_parallel_group() if dist.is_initialized() else None
    if group is not None and dist.get_world_size(group=group) > 1:
        t = torch.tensor(
            [float(n)], dtype=torch.float64, device=collective_device(group, module_device(core))
        )
        dist.all_reduce(t, group=group)
        n = int(t.item())
    return int(n)


def _reduce_attention_max(recorder_max: Dict[str, Any]) -> None:
    """MAX-reduce the per-rank attention maxima over the TP group, in place."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not recorder_max or ps.get_tensor_model_parallel_world_size() <= 1:
        return
    names = sorted(recorder_max)
    group = ps.get_tensor_model_parallel_group()
    t = torch.stack([recorder_max[n].detach().float().reshape(()) for n in names])
    t = t.to(collective_device(group, t.device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    for n, v in zip(names, t):
        recorder_max[n] = v


def gather_tp_state_dict(model: Any) -> Dict[str, Any]:
    """The model's weights with tensor-parallel shards concatenated (CPU tensors), i.e. the
    state dict of the same model built with TP=1. For checks and small exports (tests
    compare TP=2 probe scores against a TP=1 run of these weights); PP is not merged.

    Valid for megatron-core's default layouts: column/row-parallel linears and the
    vocab-parallel embedding are split along `partition_dim`, and the fused QKV weight
    is laid out per query group, so concatenating the rank shards in TP-rank order gives
    the TP=1 layout. (A gated MLP, `gated_linear_unit=True`, interleaves differently and
    is refused.)"""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    core = unwrap_megatron(model)
    if getattr(getattr(core, "config", None), "gated_linear_unit", False):
        raise NotImplementedError(
            "gather_tp_state_dict does not merge gated-linear-unit MLP shards"
        )
    tp = ps.get_tensor_model_parallel_world_size()
    group = ps.get_tensor_model_parallel_group()
    params = dict(core.named_parameters())
    out: Dict[str, Any] = {}
    for name, t in core.state_dict().items():
        if t is None or not isinstance(t, torch.Tensor):
            continue
        p = params.get(name)
        if tp > 1 and p is not None and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.detach().contiguous(), group=group)
            out[name] = torch.cat([x.cpu() for x in parts], dim=p.partition_dim)
        else:
            out[name] = t.detach().cpu().clone()
    return out


# ---- the adapter ----------------------------------------------------------------------------------


class MegatronMonitor(MonitorPassThrough):
    """FineLineMonitor wired to a megatron-core model (GPTModel, possibly wrapped in
    megatron's DDP / Float16Module, or a one-chunk list as Megatron-LM keeps it).

    Call `step(step=iteration, loss=..., tokens=..., grad_norm=...)` once per optimizer step
    on every rank. `loss` only matters on the loss-owning rank (the last PP stage).
    """

    def __init__(
        self,
        model: Any,
        optimizer: Any = None,
        config: Any = None,
        *,
        tokenizer: Any = None,
        scorer: Any = None,
        sinks: Optional[List[Any]] = None,
        checkpoint_fn: Optional[Callable[[int], None]] = None,
        run_meta: Optional[Dict[str, Any]] = None,
        micro_batch_size: Optional[int] = None,
        around_forward: Optional[Callable[[], Any]] = None,
        grad_norm_fn: Optional[Callable[[], float]] = None,
    ):
        from megatron.core import parallel_state as ps

        from fineline_monitor.core.config import MonitorConfig
        from fineline_monitor.integrations._scoring import backend_scorer
        from fineline_monitor.monitor import FineLineMonitor

        cfg = MonitorConfig.coerce(config)
        self.model = model
        self.optimizer = optimizer
        self.dist = megatron_dist_context(cfg.dist_timeout_s)
        self.grad_norm_fn = grad_norm_fn
        core = unwrap_megatron(model)
        if (
            scorer is None
            and tokenizer is not None
            and (cfg.probe_every > 0 or cfg.probe_every_tokens > 0)
        ):
            backend = MegatronTokenScorer(
                model, micro_batch_size=micro_batch_size, around_forward=around_forward
            )
            # TP and PP forwards are collectives: every rank runs the same number of batches.
            scorer = backend_scorer(
                backend,
                tokenizer,
                cfg.probes,
                self.dist,
                max_length=backend.max_sequence_length or 2048,
                equal_batches=True,
            )
        meta = {
            "framework": "megatron-core",
            "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(),
            "params": model_param_count(core),
        }
        meta.update(run_meta or {})
        # The indicators read torch optimizers' param_groups; megatron's optimizer wrappers
        # expose them too (over the rank's own shard under the distributed optimizer).
        self.monitor = FineLineMonitor(
            model=core,
            optimizer=_torch_optimizer(optimizer),
            config=cfg,
            tokenizer=tokenizer,
            scorer=scorer,
            dist=self.dist,
            sinks=sinks,
            checkpoint_fn=checkpoint_fn,
            run_meta=meta,
        )
        self._wrap_probe_round_for_tp()

    def _wrap_probe_round_for_tp(self) -> None:
        """Under TP>1: during each probe round, reduce the output-logit statistics over the
        TP group inside the head hook (a vocab-parallel output layer gives each rank a slice
        of the vocabulary); after it, MAX-reduce the attention-logit maxima (each TP rank saw
        only its own heads)."""
        from megatron.core import parallel_state as ps

        probes = getattr(self.monitor, "probes", None)
        run = getattr(probes, "run", None)
        if run is None:
            return
        head = getattr(unwrap_megatron(self.model), "output_layer", None)
        vocab_parallel = (
            ps.get_tensor_model_parallel_world_size() > 1
            and head is not None
            and not getattr(head, "gather_output", False)
        )

        def run_and_reduce(*args: Any, **kwargs: Any) -> Any:
            ctx = kwargs.get("hooks")
            if ctx is not None and vocab_parallel:
                ctx.vocab_group = ps.get_tensor_model_parallel_group()
            result = run(*args, **kwargs)
            rec = getattr(getattr(ctx, "attn", None), "recorder", None)
            if rec is not None:
                _reduce_attention_max(rec.max)
            return result

        probes.run = run_and_reduce

    def step(
        self,
        step: int,
        loss: Any = None,
        tokens: Optional[int] = None,
        lr: Optional[float] = None,
        *,
        grad_norm: Any = None,
        loss_scale: Optional[float] = None,
        skipped: bool = False,
        batch_tokens: Optional[int] = None,
    ) -> list:
        opt = self.optimizer
        if lr is None and opt is not None:
            groups = getattr(opt, "param_groups", None)
            if groups:
                lr = float(groups[0]["lr"])
        if loss_scale is None and opt is not None and _grad_scaler(opt) is not None:
            # only a real (fp16) grad scaler: bf16/fp32 optimizers report a constant 1.0,
            # which would make their NaN gradients look like scaler skips
            try:
                ls = opt.get_loss_scale()
                loss_scale = float(ls.item() if hasattr(ls, "item") else ls)
            except Exception:  # noqa: BLE001
                loss_scale = None
        if grad_norm is None and self.grad_norm_fn is not None:
            grad_norm = self.grad_norm_fn()
        return self.monitor.step(
            step=step,
            loss=loss,
            tokens=tokens,
            lr=lr,
            grad_norm=grad_norm,
            loss_scale=loss_scale,
            skipped=skipped,
            batch_tokens=batch_tokens,
        )


def _grad_scaler(optimizer: Any) -> Any:
    """megatron's MixedPrecisionOptimizer keeps its loss scaler in `grad_scaler` (None for
    bf16); ChainedOptimizer reports the first chained optimizer's scale."""
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained:
        return getattr(chained[0], "grad_scaler", None)
    return getattr(optimizer, "grad_scaler", None)


def _torch_optimizer(optimizer: Any) -> Any:
    """megatron's MegatronOptimizer wraps a torch optimizer in `.optimizer`; ChainedOptimizer
    has `chained_optimizers`. The indicators want something with torch-style param_groups."""
    if optimizer is None:
        return None
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and getattr(inner, "param_groups", None) is not None:
        return inner
    return optimizer if getattr(optimizer, "param_groups", None) is not None else None
