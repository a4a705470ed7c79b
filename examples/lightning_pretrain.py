"""Pretrain a tiny GPT-2 with Lightning and the fineline callback.

    torchrun --nproc_per_node=2 examples/lightning_pretrain.py --steps 4 --probe-every 2 --out /tmp/pl-run

CPU, DDP over gloo. Writes OUT/run.db and OUT/probe_round.json. Monitor lines: `# fineline`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None) -> int:
    args, out = C.trainer_example_args(argv)
    import lightning as L
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    C.init_cpu_distributed()  # Lightning reuses an existing process group
    tok = C.tokenizer(out)
    rows = torch.stack(C.token_rows(tok, args.seq))

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = GPT2LMHeadModel(
                GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2, n_head=4)
            )
            self.tokens_seen = 0  # read by the fineline callback

        def forward(self, input_ids, **kw):
            return self.model(input_ids=input_ids, **kw)

        def training_step(self, batch, idx):
            self.tokens_seen += batch.numel() * self.trainer.world_size
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    from fineline_monitor.integrations.lightning import FineLineLightningCallback  # fineline

    module = LM()
    cfg = C.monitor_config(out, args.probe_every, run_name="lightning", max_length=256)  # fineline
    callback = FineLineLightningCallback(cfg, tokenizer=tok)  # fineline
    loader = torch.utils.data.DataLoader(rows, batch_size=4, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=C.world(),
        max_steps=args.steps,
        accumulate_grad_batches=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=True,
    )
    trainer.fit(module, loader)
    C.dump_probe_round(callback.monitor, out)
    if C.rank() == 0:
        print(
            f"[lightning] steps={trainer.global_step} disabled={callback.monitor.disabled_parts}",
            flush=True,
        )
    C.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
