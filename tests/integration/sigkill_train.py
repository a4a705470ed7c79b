"""A deterministic toy training loop with the monitor attached, checkpointing every
CKPT steps (monitor.state_dict() next to the loop's own state, written atomically).
Used by test_store_sigkill: killed with SIGKILL at a random step, then resumed."""

import json
import math
import os
import pickle
import sys
import time

from fineline_monitor import FineLineMonitor, MonitorConfig

out, steps, ckpt_every, sleep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
ckpt = os.path.join(out, "ckpt.pkl")
cfg = MonitorConfig(
    run_name="killme",
    out_dir=out,
    probe_every=0,
    indicators={"collect_every": 1},
    sinks={"enabled": ["store"]},
    strict=True,
)
mon = FineLineMonitor(config=cfg)
start = 0
if os.path.exists(ckpt):
    with open(ckpt, "rb") as f:
        state = pickle.load(f)
    mon.load_state_dict(state["monitor"])
    start = state["step"] + 1
for step in range(start, steps):
    loss = 5.0 * math.exp(-step / 50) + 0.01 * math.sin(step)
    mon.step(step=step, loss=loss, tokens=(step + 1) * 4096, lr=1e-3 * min(1.0, (step + 1) / 10))
    if step % ckpt_every == ckpt_every - 1:
        state = {"step": step, "monitor": mon.state_dict()}
        with open(ckpt + ".tmp", "wb") as f:
            pickle.dump(state, f)
        os.replace(ckpt + ".tmp", ckpt)
    print(json.dumps({"step": step}), flush=True)
    time.sleep(sleep)
mon.close()
print("DONE", flush=True)
