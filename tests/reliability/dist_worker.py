"""One rank of a 2-rank gloo job: a tiny model trained with DDP (so training itself has a
collective every step and a stuck rank would stop the other), the real FineLineMonitor
attached, and a fault injected on rank 1 only. Launched by test_distributed.py with
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set; writes OUT/rank{r}.json when it finishes.

The probe runner is a stand-in with the real runner's collective structure (documents
sharded over the data-parallel group, results gathered with all_gather_object), so the
fault can be placed exactly: before that collective, after it, or as a slow rank.
Scenarios (argv[2]):
  clean          no fault
  raise_after    rank 1 raises after the probe collective, in its 2nd probe round
  raise_before   rank 1 raises before the probe collective, in its 2nd probe round
  slow           rank 1 sleeps SLOW_S (> dist_timeout_s) before the monitor's agreement
  actions        rank 0 has a pending `stop`, rank 1 a (wrong) local `checkpoint`
  real_raise     the real ProbeRunner on a tiny GPT-2 (documents sharded over both ranks); from
                 the 2nd probe round on, rank 1's model raises in every no-grad forward
  indicator_raise  the indicators carry a collective step metric (like the ZeRO-3 parameter
                 norm: an all-reduce at every collect step); rank 1's indicators fail in their
                 local part at its 2nd collect and are disabled there
"""

import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from fineline_monitor import FineLineMonitor, MonitorConfig
from fineline_monitor.core.types import ProbeRound, TaskResult

out, scenario = sys.argv[1], sys.argv[2]
STEPS = int(os.environ.get("REL_STEPS", "12"))
PROBE_EVERY = 3
DIST_TIMEOUT_S = float(os.environ.get("REL_DIST_TIMEOUT", "3"))
PG_TIMEOUT_S = float(os.environ.get("REL_PG_TIMEOUT", "20"))
SLOW_S = DIST_TIMEOUT_S + 5

torch.set_num_threads(1)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
rank = dist.get_rank()


class StandInProbes:
    def __init__(self):
        self.rounds = 0

    def run(self, step, tokens, hooks=None):
        self.rounds += 1
        faulty = rank == 1 and self.rounds == 2
        if faulty and scenario == "raise_before":
            raise RuntimeError("probe failed on rank 1 before the gather (injected)")
        local = {"rank": rank, "score": float(step)}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        if faulty and scenario == "raise_after":
            raise RuntimeError("probe failed on rank 1 after the gather (injected)")
        if faulty and scenario == "slow":
            time.sleep(SLOW_S)
        acc = sum(g["score"] for g in gathered) / len(gathered) / (STEPS + 1)
        task = TaskResult(
            task="stand_in", capability="commonsense", n_docs=len(gathered), metrics={"acc": acc}
        )
        return ProbeRound(
            step=step,
            tokens=tokens,
            tasks={"stand_in": task},
            requests=[],
            seconds=0.01,
            tokens_scored=10,
        )


probes = StandInProbes()
checkpoints = []
REAL = scenario.startswith("real_")
if REAL:
    import json as _json

    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [
            "The capital of France is Paris.",
            "Water boils at one hundred degrees.",
            "def add(a, b): return a + b",
        ]
        * 4,
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<|endoftext|>"],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    req = os.path.join(out, f"requests{rank}.jsonl")
    with open(req, "w") as f:
        for d in range(6):
            for i, cont in enumerate([" Paris.", " one hundred.", " a + b"]):
                f.write(
                    _json.dumps(
                        {
                            "doc_id": d,
                            "idx": i,
                            "label": d % 3,
                            "task_name": "dist_task",
                            "request": {"context": f"Question {d}:", "continuation": cont},
                        }
                    )
                    + "\n"
                )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )
    VOCAB = len(tok)
    probe_cfg = {"tasks": [], "requests_files": [req], "docs_per_task": 6, "batch_size": 4}
else:
    FineLineMonitor._build_probes = lambda self, scorer: probes  # the stand-in above, on every rank
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(64, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 8, 64)
    )
    VOCAB = 64
    tok, probe_cfg = None, {}
ddp = torch.nn.parallel.DistributedDataParallel(model)
opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
cfg = MonitorConfig(
    run_name="dist",
    out_dir=os.path.join(out, "mon"),
    probe_every=PROBE_EVERY,
    probe_max_overhead=0.0,  # fixed cadence: the test counts rounds
    dist_timeout_s=DIST_TIMEOUT_S,
    indicators={"collect_every": 2},
    probes=probe_cfg,
    alerts={"on_critical": ["checkpoint", "stop"]},
    sinks={"enabled": ["store"]},
)
world_sums = []


def world_metric():
    t = torch.ones(1)
    dist.all_reduce(t)  # a collective at every collect step, on every rank
    world_sums.append(float(t.item()))
    return {"test/world_sum": t}


mon = FineLineMonitor(
    model=model,
    optimizer=opt,
    config=cfg,
    checkpoint_fn=checkpoints.append,
    tokenizer=tok,
    step_metrics_fn=world_metric if scenario == "indicator_raise" else None,
)
if scenario == "indicator_raise":
    orig_collect, collects = mon.indicators.collect, [0]

    def failing_collect(step):
        collects[0] += 1
        if rank == 1 and collects[0] == 2:
            mon.indicators.run_collectives(
                step
            )  # what collect runs first; then the local part fails
            raise RuntimeError("indicator bug on rank 1 (injected)")
        return orig_collect(step)

    mon.indicators.collect = failing_collect
real_rounds = [0]
if REAL:
    assert mon.probes is not None, mon.disabled_parts
    orig_run = mon.probes.run

    def counted_run(*a, **k):
        real_rounds[0] += 1
        return orig_run(*a, **k)

    mon.probes.run = counted_run

    def hook(module, args, output):
        if rank == 1 and real_rounds[0] >= 2 and not torch.is_grad_enabled():
            raise RuntimeError("CUDA out of memory on rank 1 (injected in a probe forward)")

    model.transformer.h[0].register_forward_hook(hook)

g = torch.Generator().manual_seed(100 + rank)
losses, stop_seen_at = [], None
t0 = time.time()
for step in range(STEPS):
    x = torch.randint(0, VOCAB, (4, 8), generator=g)
    if REAL:
        loss = ddp(input_ids=x, labels=x).loss
    else:
        loss = torch.nn.functional.cross_entropy(ddp(x), x[:, 0])
    loss.backward()
    opt.step()
    if scenario == "actions" and step == 4:
        # Each rank's local wish; only the logging rank's must count.
        mon._pending_actions = ["stop"] if rank == 0 else ["checkpoint"]
    mon.step(step=step, loss=loss.detach(), tokens=(step + 1) * 64, lr=1e-2)
    opt.zero_grad(set_to_none=True)
    losses.append(loss.item())
    if mon.should_stop and stop_seen_at is None:
        stop_seen_at = step
mon.close()
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(
        {
            "rank": rank,
            "losses": losses,
            "disabled": mon.disabled_parts,
            "rounds": real_rounds[0] if REAL else probes.rounds,
            "should_stop": mon.should_stop,
            "stop_seen_at": stop_seen_at,
            "checkpoints": checkpoints,
            "world_sums": world_sums,
            "seconds": time.time() - t0,
        },
        f,
    )
dist.barrier()
dist.destroy_process_group()
