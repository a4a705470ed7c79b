"""Pretrain a tiny GPT-2 with the Hugging Face Trainer and the fineline callback.

    torchrun --nproc_per_node=2 examples/hf_trainer.py --steps 4 --probe-every 2 --out /tmp/hf-run

CPU, gloo (the Trainer's DDP). Writes OUT/run.db and OUT/probe_round.json. Monitor lines: `# fineline`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None) -> int:
    args, out = C.trainer_example_args(argv)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    C.init_cpu_distributed()
    tok = C.tokenizer(out)
    rows = C.token_rows(tok, args.seq)
    train = [{"input_ids": r, "labels": r} for r in rows]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2, n_head=4)
    )

    from fineline_monitor.integrations.hf_trainer import FineLineCallback  # fineline

    callback = FineLineCallback(
        config=C.monitor_config(out, args.probe_every, run_name="hf-trainer"),  # fineline
        tokenizer=tok,
    )
    targs = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        include_num_input_tokens_seen=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train, callbacks=[callback])
    trainer.train()
    C.dump_probe_round(callback.monitor, out)
    if C.rank() == 0:
        import json

        # the Trainer's own per-step log, to compare with what the monitor recorded
        (out / "trainer_log.json").write_text(json.dumps(trainer.state.log_history))
        print(
            f"[hf-trainer] steps={trainer.state.global_step} disabled={callback.monitor.disabled_parts}",
            flush=True,
        )
    C.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
