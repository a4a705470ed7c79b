"""Pretrain a tiny GPT-2 with DeepSpeed (any ZeRO stage) and the fineline monitor attached.

    torchrun --nproc_per_node=2 examples/deepspeed_pretrain.py --zero-stage 3 --steps 6 \
        --probe-every 3 --out /tmp/ds-run

Runs on the CPU over gloo. Writes OUT/run.db (the run store), OUT/probe_round.json (the
last round's per-request scores) and, with --save-weights, OUT/weights.pt (the full
state dict, gathered from the ZeRO-3 shards) so a single process can re-score the same
documents and check the numbers.

The monitor lines are marked `# fineline`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps")
    ap.add_argument("--probe-every", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--docs-per-task", type=int, default=8)
    ap.add_argument("--save-weights", action="store_true")
    ap.add_argument(
        "--fail-rank",
        type=int,
        default=-1,
        help="tests: this rank raises inside the 2nd probe batch",
    )
    args = ap.parse_args(argv)
    C.threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import deepspeed
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    C.init_cpu_distributed()
    deepspeed.init_distributed(dist_backend="gloo")
    tok = C.tokenizer(out)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=256,
            n_embd=64,
            n_layer=2,
            n_head=4,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    ds_config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": args.grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.zero_stage},
        "steps_per_print": 10**9,
        # Plain torch AdamW as the client optimizer: DeepSpeed's fused Adam needs CUDA.
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    from fineline_monitor.integrations.deepspeed import DeepSpeedMonitor  # fineline

    cfg = C.monitor_config(
        out, args.probe_every, args.docs_per_task, run_name=f"deepspeed-zero{args.zero_stage}"
    )
    monitor = DeepSpeedMonitor(engine, config=cfg, tokenizer=tok)  # fineline
    if args.fail_rank == C.rank() and monitor.monitor.probes is not None:
        monitor.monitor.probes.scorer.fail_at_batch = 1

    dp_rank, dp_size = monitor.dist.dp_rank, monitor.dist.dp_size
    data = C.batches(
        C.token_stream(tok), args.micro_batch, args.seq, dp_rank=dp_rank, dp_size=dp_size
    )
    tokens_per_step = args.micro_batch * args.seq * args.grad_accum * dp_size
    micro = 0
    while engine.global_steps < args.steps:
        batch = next(data)
        out_ = engine(input_ids=batch[:, :-1], labels=batch[:, :-1])
        engine.backward(out_.loss)
        engine.step()
        micro += 1
        tokens = (micro // args.grad_accum) * tokens_per_step
        monitor.step(loss=out_.loss, tokens=tokens)  # fineline: acts once per optimizer step
    C.dump_probe_round(monitor.monitor, out)
    if C.rank() == 0:
        print(
            f"[deepspeed zero{args.zero_stage}] steps={engine.global_steps} "
            f"disabled={monitor.monitor.disabled_parts}",
            flush=True,
        )
    monitor.close()  # fineline

    if args.save_weights:
        state = _full_state_dict(engine, args.zero_stage)
        if C.rank() == 0:
            torch.save(state, out / "weights.pt")
            model.config.save_pretrained(str(out))
    C.barrier()
    return 0


def _full_state_dict(engine, stage: int):
    """Whole weights on rank 0; under ZeRO-3 gathered with DeepSpeed's own helper."""
    import deepspeed

    module = engine.module
    if stage < 3:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


if __name__ == "__main__":
    sys.exit(main())
