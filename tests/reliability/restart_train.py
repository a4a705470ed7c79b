"""A real training run (tiny GPT-2, AdamW, the monitor with indicators, alert engine, store and
webhook sinks) that checkpoints model + optimizer + monitor state every CKPT steps (written
atomically) and resumes from the last checkpoint when one exists. Used by test_restart.py:
killed with SIGKILL at a random step, then resumed.

At step ALERT_STEP the monitor is handed a NaN loss (the training itself is untouched), so
the real alert engine raises a critical `nonfinite` alert that the webhook pages.
Probe rounds run every PROBE_EVERY steps on a small requests file with a tokenizer saved by
the test (argv 6-8), so probe rounds, per-document scores and the engine's expectations are
written, and must survive the kill too. Prints `step N` after each step (the test's clock
for the kill).
"""

import os
import sys
import time

import torch

from fineline_monitor import FineLineMonitor, MonitorConfig

out, steps, ckpt_every, alert_step, sleep = (
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    int(sys.argv[4]),
    float(sys.argv[5]),
)
probe_every, tokenizer_dir, requests_file = int(sys.argv[6]), sys.argv[7], sys.argv[8]
torch.set_num_threads(1)
ckpt = os.path.join(out, "ckpt.pt")

from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
VOCAB, SEQ, BATCH = len(tokenizer), 64, 2

torch.manual_seed(0)
model = GPT2LMHeadModel(
    GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
cfg = MonitorConfig(
    run_name="restart",
    out_dir=out,
    probe_every=probe_every,
    probe_at_start=True,
    probe_max_overhead=0.0,  # a fixed cadence: the same rounds in every run
    probes={"tasks": [], "requests_files": [requests_file], "docs_per_task": 3, "batch_size": 4},
    indicators={"collect_every": 1},
    alerts={"cooldown_rounds": 1000},
    sinks={"enabled": ["store", "webhook"]},
)
mon = FineLineMonitor(model=model, optimizer=opt, config=cfg, tokenizer=tokenizer)
start = 0
if os.path.exists(ckpt):
    state = torch.load(ckpt, weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    mon.load_state_dict(state["monitor"])
    start = state["step"] + 1
    print(f"resumed at {start}", flush=True)

for step in range(start, steps):
    g = torch.Generator().manual_seed(
        1000 + step
    )  # the batch of a step does not depend on the past
    x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    out_ = model(input_ids=x, labels=x)
    out_.loss.backward()
    opt.step()
    seen = out_.loss.detach() * float("nan") if step == alert_step else out_.loss.detach()
    mon.step(step=step, loss=seen, tokens=(step + 1) * BATCH * SEQ, lr=3e-3)
    opt.zero_grad(set_to_none=True)
    if step % ckpt_every == ckpt_every - 1:
        state = {
            "step": step,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "monitor": mon.state_dict(),
        }
        torch.save(state, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)
    print(f"step {step} loss {out_.loss.item():.6f}", flush=True)
    time.sleep(sleep)
mon.close()
print("DONE", flush=True)
