"""Probe throughput: this plugin vs lm-eval-harness's HF backend, and vs training.

Same small GPT-2-style model (built locally: BPE tokenizer trained on the probe text,
seeded init, save_pretrained), same documents, same (context, continuation) requests.

Prints, from one run:
  1. speed ratio = lm-eval HFLM.loglikelihood wall time / our wall time on the identical
     requests, for (a) a probe round as the monitor runs it (tokenization and planning done
     at attach time) and (b) cold, tokenization and planning included (the CLI case);
     plus the largest per-request |logprob difference| and whether acc / acc_norm agree;
  2. probe tokens/s vs training tokens/s: a probe round's real tokens through the model per
     second, against fwd+bwd+AdamW steps of the same model on [batch, T] batches of the
     same row length (forward-only work is about 1/3 of a training step, so ~3x is the
     ceiling), and lm-eval-equivalent request tokens/s (what an unshared evaluator reads).

Timings alternate (ours, lm-eval, ours, ...) and take the median, because the CPU is
shared with other jobs. Usage:

    OMP_NUM_THREADS=2 python benchmarks/probe_speed.py [--docs 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_json  # noqa: E402

TASKS = [
    "hellaswag:rc_0shot",
    "piqa:rc_0shot",
    "winogrande:rc_0shot",
    "csqa:rc_0shot",
    "arc_easy:rc_0shot",
    "openbookqa:rc_0shot",
    "boolq:rc_0shot",
    "arc_challenge:rc_5shot",
    "basic_skills_arithmetic:rc_5shot",
    "naturalqs_open:bpb_5shot",
    "gsm8k:gold_bpb_5shot",
    "codex_mbpp:gold_bpb_0shot",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=40, help="documents per task")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=128)
    ap.add_argument("--positions", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096)
    bench_json.add_json_argument(ap, "probe-speed")
    args = ap.parse_args()

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fineline_monitor.core.config import ProbeConfig
    from fineline_monitor.probes import ProbeRunner
    from fineline_monitor.probes._testing import build_tiny_model

    tmp = tempfile.mkdtemp(prefix="probe_speed_")
    path = build_tiny_model(
        tmp,
        vocab_size=args.vocab,
        n_layer=args.layers,
        n_embd=args.embd,
        n_head=4,
        n_positions=args.positions,
        seed=0,
    )
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = ProbeConfig(
        tasks=args.tasks.split(","), docs_per_task=args.docs, batch_size=args.batch_size, seed=1234
    )

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=path, device="cpu", batch_size=args.batch_size)

    def ours_cold():
        t = time.perf_counter()
        runner = ProbeRunner(cfg, model=model, tokenizer=tok)
        rnd = runner.run(step=0)
        return time.perf_counter() - t, runner, rnd

    _, runner, rnd = ours_cold()  # warm-up (task cache, self-check)
    insts = [
        Instance(request_type="loglikelihood", doc={}, arguments=(q.context, q.continuation), idx=i)
        for i, q in enumerate(runner.requests)
    ]
    lm.loglikelihood(insts[:64], disable_tqdm=True)  # warm-up

    t_round, t_cold, t_lm = [], [], []
    c_round, c_lm = [], []  # CPU seconds of this process (all threads): robust to a shared CPU
    res = None
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        rnd = runner.run(step=1)
        t_round.append(time.perf_counter() - t)
        c_round.append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        res = lm.loglikelihood(insts, disable_tqdm=True)
        t_lm.append(time.perf_counter() - t)
        c_lm.append(time.process_time() - c)
        t_cold.append(ours_cold()[0])
    r_round, r_cold, r_lm = (statistics.median(x) for x in (t_round, t_cold, t_lm))
    cr_round, cr_lm = statistics.median(c_round), statistics.median(c_lm)

    diffs = np.array([abs(a[0] - b.logprob) for a, b in zip(res, rnd.requests)])
    rel = np.array(
        [abs(a[0] - b.logprob) / max(1.0, abs(b.logprob)) for a, b in zip(res, rnd.requests)]
    )
    greedy_eq = all(a[1] == b.is_greedy for a, b in zip(res, rnd.requests))
    # acc / acc_norm from lm-eval's numbers with lm-eval's formulas, per task
    acc_equal = True
    by_key = {(q.task, q.doc_id, q.choice): res[i][0] for i, q in enumerate(runner.requests)}
    for name, entries in runner.docs.items():
        if runner.tasks[name].kind != "mc":
            continue
        acc = accn = 0.0
        for d, _ in entries:
            lls = np.array([by_key[(name, d.doc_id, c)] for c in range(d.n_choices)])
            lens = np.array(
                [float(len(c[1:] if c.startswith(" ") else c)) for c in d.continuations]
            )
            acc += float(np.argmax(lls) == d.gold)
            accn += float(np.argmax(lls / lens) == d.gold)
        m = rnd.tasks[name].metrics
        acc_equal &= (
            abs(acc / len(entries) - m["acc"]) < 1e-12
            and abs(accn / len(entries) - m["acc_norm"]) < 1e-12
        )

    # training tokens/s of the same model on rows of the probe's typical length
    T = int(np.median([len(r) for r in runner.rows]))
    B = args.batch_size
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    for _ in range(2):  # warm-up
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    steps = 4
    t = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    t_train = (time.perf_counter() - t) / steps
    model.eval()
    train_tps = B * T / t_train
    probe_tps = runner.tokens_per_round / r_round
    request_tokens = sum(len(e.tokens) for e in runner._encoded)

    print(
        f"model: GPT-2 style, {n_params / 1e6:.2f}M params, {args.layers} layers, d={args.embd}, "
        f"context {args.positions}, vocab {model.config.vocab_size}; threads {torch.get_num_threads()}"
    )
    print(
        f"requests: {len(runner.requests)} from {len(runner.tasks)} tasks x {args.docs} docs; "
        f"{runner.n_truncated} left-truncated; scorer packing={runner.scorer.supports_packing} "
        f"fast_head={runner.scorer.fast_head} mask={runner.scorer.mask_dtype}"
    )
    print(
        f"agreement with lm-eval HFLM: max |dlogprob| = {diffs.max():.2e} (max relative {rel.max():.2e}), "
        f"is_greedy equal: {greedy_eq}, acc/acc_norm equal: {acc_equal}"
    )
    print(f"lm-eval HFLM.loglikelihood: {r_lm:.2f} s (runs {', '.join(f'{x:.2f}' for x in t_lm)})")
    print(
        f"ours, probe round:          {r_round:.2f} s (runs {', '.join(f'{x:.2f}' for x in t_round)})"
    )
    print(
        f"ours, cold (tokenize+plan):  {r_cold:.2f} s (runs {', '.join(f'{x:.2f}' for x in t_cold)})"
    )
    print(
        f"SPEED RATIO vs lm-eval: {r_lm / r_round:.2f}x (probe round), {r_lm / r_cold:.2f}x (cold), wall time"
    )
    print(
        f"CPU-TIME RATIO vs lm-eval: {cr_lm / cr_round:.2f}x (lm-eval {cr_lm:.2f} CPU s, ours {cr_round:.2f} CPU s "
        f"per round; CPU seconds do not count time lost to other processes on a shared machine)"
    )
    print(
        f"tokens through the model per round: {runner.tokens_per_round} (lm-eval-equivalent request tokens "
        f"{request_tokens}, {request_tokens / runner.tokens_per_round:.2f}x more)"
    )
    print(
        f"training: {train_tps:,.0f} tokens/s (fwd+bwd+AdamW, batch {B}x{T}); probe: {probe_tps:,.0f} model tokens/s, "
        f"{request_tokens / r_round:,.0f} request tokens/s"
    )
    print(
        f"PROBE/TRAIN TOKENS/S RATIO: {probe_tps / train_tps:.2f}x (model tokens; forward-only ceiling ~3x), "
        f"{request_tokens / r_round / train_tps:.2f}x (request tokens)"
    )
    bench_json.write(
        args.json,
        "probe-speed",
        {
            "params_m": n_params / 1e6,
            "requests": len(runner.requests),
            "tasks": len(runner.tasks),
            "docs_per_task": args.docs,
            "repeats": args.repeats,
            "max_abs_dlogprob": float(diffs.max()),
            "is_greedy_equal": bool(greedy_eq),
            "acc_equal": bool(acc_equal),
            "lm_eval_s": r_lm,
            "round_s": r_round,
            "cold_s": r_cold,
            "speed_ratio_wall": r_lm / r_round,
            "speed_ratio_cold": r_lm / r_cold,
            "speed_ratio_cpu": cr_lm / cr_round,
            "train_tokens_per_s": train_tps,
            "probe_tokens_per_s": probe_tps,
            "probe_train_ratio": probe_tps / train_tps,
        },
        size=""
        if args.docs == 40 and args.repeats == 3
        else f"{args.docs} docs per task, {args.repeats} repeats",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
