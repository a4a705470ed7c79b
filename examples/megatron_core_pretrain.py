"""Pretrain a tiny megatron-core GPTModel with tensor/pipeline parallelism and the fineline
monitor attached.

    torchrun --nproc_per_node=2 examples/megatron_core_pretrain.py --tp 2 --steps 6 \
        --probe-every 3 --out /tmp/mc-run --cpu-patches

`--cpu-patches` applies fineline_monitor.integrations.megatron_cpu_patches: megatron-core
allocates two scratch objects on CUDA unconditionally (GlobalMemoryBuffer.get_tensor,
CudaRNGStatesTracker.fork); the patch makes TP runs possible on a CPU-only machine. It is
never applied without the flag. Pipeline parallelism (--pp 2) uses megatron's schedules,
which need CUDA: run it on GPUs (NCCL) without --cpu-patches.

On the CPU the optimizer is torch AdamW and the gradient norm is computed TP-aware by
`tp_grad_norm` (megatron's own DDP/optimizer allocate CUDA buffers). On GPUs, use
megatron's optimizer and pass the grad norm its `step()` returns.

Writes OUT/run.db, OUT/probe_round.json and, with --save-weights, OUT/weights.pt (the
TP shards merged: the same model at TP=1) so a TP=1 run can re-score the documents.
The monitor lines are marked `# fineline`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def build_model(vocab_size: int, tp: int, pp: int, seq: int):
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return GPTModel(
        config=cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=vocab_size,
        max_sequence_length=seq,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )


def padded_vocab(n: int, multiple: int) -> int:
    """Megatron pads the vocabulary to a multiple of (TP x 128) in Megatron-LM; here to TP x 8."""
    return -(-n // multiple) * multiple


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--probe-every", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--docs-per-task", type=int, default=8)
    ap.add_argument(
        "--cpu-patches", action="store_true", help="patch megatron-core's two CUDA-only spots"
    )
    ap.add_argument("--save-weights", action="store_true")
    ap.add_argument(
        "--load-weights", default="", help="score these (TP-merged) weights, no training"
    )
    ap.add_argument(
        "--fail-rank",
        type=int,
        default=-1,
        help="tests: this rank raises before its 2nd probe batch",
    )
    args = ap.parse_args(argv)
    C.threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    import torch.distributed as dist

    if args.cpu_patches:
        from fineline_monitor.integrations.megatron_cpu_patches import apply_megatron_cpu_patches

        apply_megatron_cpu_patches()
        C.init_cpu_distributed()
    else:
        import datetime
        import os

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=300))
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    ps.initialize_model_parallel(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp
    )
    if not args.cpu_patches:
        model_parallel_cuda_manual_seed(0)
    tok = C.tokenizer(out)
    torch.manual_seed(0)
    vocab = padded_vocab(len(tok), 8 * args.tp)
    model = build_model(vocab, args.tp, args.pp, max(args.seq, 256))
    if not args.cpu_patches:
        model = model.cuda()
    if args.load_weights:
        from fineline_monitor.integrations.megatron import unwrap_megatron

        missing = unwrap_megatron(model).load_state_dict(
            torch.load(args.load_weights), strict=False
        )
        assert not missing.unexpected_keys, missing
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    from fineline_monitor.integrations.megatron import MegatronMonitor, tp_grad_norm  # fineline

    cfg = C.monitor_config(
        out, args.probe_every, args.docs_per_task, run_name=f"megatron-tp{args.tp}-pp{args.pp}"
    )
    monitor = MegatronMonitor(
        model,
        optimizer,
        config=cfg,
        tokenizer=tok,  # fineline
        micro_batch_size=args.micro_batch,
    )
    if args.fail_rank == dist.get_rank() and monitor.monitor.probes is not None:
        monitor.monitor.probes.scorer.fail_at_batch = 1

    if args.load_weights:  # score only: one probe round of the loaded weights
        monitor.probe_now(step=0, tokens=0)
        C.dump_probe_round(monitor.monitor, out)
        monitor.close()
        return 0

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    data = C.batches(
        C.token_stream(tok), args.micro_batch, args.seq, dp_rank=dp_rank, dp_size=dp_size
    )
    dev = next(model.parameters()).device
    s = args.seq
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=dev), 1)[None, None]
    pos = torch.arange(s, device=dev).unsqueeze(0).expand(args.micro_batch, -1)
    for it in range(1, args.steps + 1):
        batch = next(data).to(dev)
        optimizer.zero_grad(set_to_none=True)
        if args.pp > 1:
            loss = _pipeline_train_step(model, batch, args)
        else:
            per_token = model(batch[:, :-1], pos, mask, labels=batch[:, 1:])
            loss = per_token.float().mean()
            loss.backward()
        if dp_size > 1:  # plain DP all-reduce of gradients (megatron's DDP does this on GPUs)
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=ps.get_data_parallel_group())
                    p.grad /= dp_size
        grad_norm = tp_grad_norm(model)  # on GPUs: `_, grad_norm, _ = megatron_optimizer.step()`
        torch.nn.utils.clip_grad_norm_(
            model.parameters(), 1e9
        )  # (no clipping; norm computed TP-aware above)
        optimizer.step()
        tokens = it * args.micro_batch * s * dp_size
        monitor.step(step=it, loss=loss, tokens=tokens, grad_norm=grad_norm)  # fineline
    C.dump_probe_round(monitor.monitor, out)
    if dist.get_rank() == 0:
        print(
            f"[megatron tp{args.tp} pp{args.pp}] steps={args.steps} disabled={monitor.monitor.disabled_parts}",
            flush=True,
        )
    monitor.close()  # fineline
    if args.save_weights and args.pp == 1:
        from fineline_monitor.integrations.megatron import gather_tp_state_dict

        state = gather_tp_state_dict(model)
        if dist.get_rank() == 0:
            torch.save(state, out / "weights.pt")
    C.barrier()
    return 0


def _pipeline_train_step(model, batch, args):
    """One training step through megatron's pipeline schedule (GPU only)."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    s = args.seq
    dev = batch.device
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=dev), 1)[None, None]

    def forward_step(data_iterator, m):
        b = next(data_iterator)
        pos = torch.arange(s, device=dev).unsqueeze(0).expand(b.shape[0], -1)
        out = m(b[:, :-1], pos, mask, labels=b[:, 1:])

        def loss_func(t):
            loss = t.float().mean()
            return loss, {"lm loss": loss.detach()}

        return out, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([batch]),
        model=[model],
        num_microbatches=1,
        seq_length=s,
        micro_batch_size=batch.shape[0],
        forward_only=False,
    )
    return losses[0]["lm loss"] if losses else None


if __name__ == "__main__":
    sys.exit(main())
