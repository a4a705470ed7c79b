"""One process under torchrun: a tiny GPT-2 in a real DeepSpeed engine (ZeRO 1, gradient
accumulation 3, bf16 or fp16), the monitor attached through DeepSpeedMonitor with a real
FineLineMonitor and its store. Writes OUT/engine.json: what the engine itself reported at
each optimizer step (global step, skipped-step count, loss scale, grad norm, micro-batch
losses), to compare with what the monitor stored.

    torchrun --nproc_per_node=1 ds_scaler_worker.py OUT {bf16|fp16} STEPS
"""

import json
import os
import sys

import deepspeed
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fineline_monitor.integrations.deepspeed import DeepSpeedMonitor

out, precision, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
GAS, VOCAB, SEQ, MICRO = 3, 64, 16, 2
torch.manual_seed(0)
torch.set_num_threads(1)
deepspeed.init_distributed(dist_backend="gloo")
model = GPT2LMHeadModel(
    GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)
)
ds_config = {
    "train_micro_batch_size_per_gpu": MICRO,
    "gradient_accumulation_steps": GAS,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    "zero_optimization": {"stage": 1},
    "gradient_clipping": 1.0,
}
if precision == "fp16":
    # 2**32 overflows the first backward passes: the scaler skips those steps and halves
    # the scale, the behaviour the monitor must report as skipped steps and a falling scale
    ds_config["fp16"] = {
        "enabled": True,
        "initial_scale_power": 32,
        "loss_scale_window": 1000,
        "hysteresis": 1,
    }
else:
    ds_config["bf16"] = {"enabled": True}
engine, *_ = deepspeed.initialize(
    model=model, model_parameters=model.parameters(), config=ds_config
)
monitor = DeepSpeedMonitor(
    engine,
    config={
        "run_name": "ds",
        "out_dir": out,
        "probe_every": 0,
        "indicators": {"collect_every": 1},
        "sinks": {"enabled": ["store"]},
    },
)
record, micro_losses = [], []
for micro in range(steps * GAS):
    g = torch.Generator().manual_seed(micro)
    x = torch.randint(0, VOCAB, (MICRO, SEQ), generator=g).to(engine.device)
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    micro_losses.append(float(loss.detach().float()))
    before = monitor._seen_global_steps
    monitor.step(loss=loss, tokens=(micro + 1) * MICRO * SEQ)
    if engine.global_steps != before:
        scale = None
        if precision == "fp16":  # DeepSpeed's fp16 optimizers keep the scale in their loss scaler
            opt = engine.optimizer
            scale = getattr(getattr(opt, "loss_scaler", None), "cur_scale", None) or getattr(
                opt, "cur_scale", None
            )
        gn = engine.get_global_grad_norm()
        record.append(
            {
                "global_step": int(engine.global_steps),
                "skipped_steps": int(engine.skipped_steps),
                "loss_scale": None if scale is None else float(scale),
                "grad_norm": None if gn is None else float(gn),
                "micro_losses": micro_losses,
            }
        )
        micro_losses = []
monitor.close()
with open(os.path.join(out, "engine.json"), "w") as f:
    json.dump(
        {
            "precision": precision,
            "fp16_enabled": engine.fp16_enabled(),
            "bf16_enabled": engine.bfloat16_enabled(),
            "steps": record,
        },
        f,
    )
print("DONE", flush=True)
