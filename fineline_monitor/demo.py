"""`fineline-monitor demo`: the Fine Line workflow in miniature, on the CPU.

1. A ladder: two small pilot models are pretrained on the same data for the same tokens
   (a few seconds each) with probes at the target's steps; their probe results are written
   to OUT/reference/ladder.csv (the trajectory CSV, runs `demo-ladder/pilot-<params>`).
2. The target: an ordinary pretraining loop (a GPT-2 of ~0.9M parameters, AdamW, a
   warmup-stable-decay schedule with declared phases, gradient clipping) on a mixture of two
   domains (English prose, Python code) plus the three lines a user adds: build the monitor,
   call `monitor.step(...)` after each optimizer step, close it. It is judged against its own
   fit and the biggest pilot.
3. At 60% of the run a fault is injected on purpose, so the monitor has something to catch:

  data_mixture@STEP     English prose leaves the training mixture (code only from then on):
                        the loss barely moves, prose capabilities' bits per byte regress
                        (the default injection);
  stall@STEP            the learning rate falls to 1e-3 of its value with no scheduled decay;
  lr_spike@STEP         the learning rate is multiplied by 40 for 10 steps;
  data_corruption@STEP  20 batches of uniformly random tokens replace the data;
  grad_explosion@STEP   gradients are scaled by 1e4 for 3 steps with clipping off.
  none                  a healthy run.

Writes OUT/run.db, OUT/alerts.jsonl, OUT/report.html, OUT/metrics.prom, OUT/summary.json and
OUT/reference/ladder.csv. docs/demo.md tells the whole story.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

INJECTION_KINDS = ("data_mixture", "stall", "lr_spike", "data_corruption", "grad_explosion")
DEFAULT_INJECTION = "data_mixture"
DEMO_MARKER = ".fineline-demo"
DEMO_FILES = (
    "run.db",
    "run.db-wal",
    "run.db-shm",
    "alerts.jsonl",
    "report.html",
    "metrics.prom",
    "summary.json",
    DEMO_MARKER,
)
DEMO_DIRS = ("tokenizer", "reference")
LADDER_SOURCE = "demo-ladder"
# Most of the mixture is English prose, as in a real pretraining mixture: the probes' tasks
# are English, and taking the prose away is a shift they show.
PROSE_SHARE = 0.75
# (layers, width) of the pilot models, smallest first
PILOTS = ((1, 64), (2, 96))


@dataclass
class DemoArgs:
    out: str = "demo-out"
    steps: int = 600
    inject: str = "auto"  # KIND@STEP, KIND (at 60%), "auto" (data_mixture at 60%) or "none"
    probe_every: int = 40
    docs_per_task: int = 8
    tasks: str = "default"
    batch_size: int = 8
    seq_len: int = 128
    n_layer: int = 3
    n_embd: int = 128
    vocab_size: int = 2048
    lr: float = 2e-3
    # seed 0 trains through a real gradient-norm spike at step 40 of warmup (the monitor flags it);
    # seed 2 does not, so the first alert of the default run is the injected capability fault
    seed: int = 2
    threads: int = (
        1  # a ~1M-parameter model gains little from more, and loses much on a busy machine
    )
    pilots: int = len(PILOTS)  # 0: no ladder (the target is judged against its own fit only)


def parse_injection(spec: str, steps: int) -> Optional[Tuple[str, int]]:
    """`KIND@STEP`, `KIND` (at 60% of the run), `auto` (data_mixture at 60%) or `none`."""
    spec = spec.strip()
    if spec in ("none", ""):
        return None
    if spec == "auto":
        return (DEFAULT_INJECTION, int(steps * 0.6))
    kind, _, at = spec.partition("@")
    if kind not in INJECTION_KINDS:
        import difflib

        close = difflib.get_close_matches(kind, INJECTION_KINDS, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise ValueError(
            f"--inject {spec!r}: unknown kind `{kind}`{hint}; allowed: "
            f"{', '.join(INJECTION_KINDS)}, or `none`"
        )
    if not at:
        return (kind, int(steps * 0.6))
    if not at.isdigit() or not (0 < int(at) < steps):
        raise ValueError(f"--inject {spec!r}: STEP must be an integer between 1 and {steps - 1}")
    return (kind, int(at))


def prepare_out_dir(out: Path) -> None:
    """Refuse to write into a folder that holds anything but a previous demo run."""
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder; choose another --out")
        entries = [p.name for p in out.iterdir()]
        if entries and DEMO_MARKER not in entries:
            raise FileExistsError(
                f"{out} exists, is not empty and is not a previous demo run "
                f"(no {DEMO_MARKER} in it): refusing to overwrite; choose another --out"
            )
        foreign = [e for e in entries if e not in DEMO_FILES and e not in DEMO_DIRS]
        if foreign:
            raise FileExistsError(
                f"{out} is a previous demo run but also holds {sorted(foreign)[:5]}: "
                "refusing to overwrite them; move them or choose another --out"
            )
        for name in DEMO_FILES:
            if (out / name).exists():
                (out / name).unlink()
        if (out / "reference").is_dir():
            shutil.rmtree(out / "reference")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("fineline-monitor demo output; safe to delete\n")


def schedule_phases(steps: int) -> Tuple[int, int]:
    """(first stable step, first decay step) of the warmup-stable-decay schedule."""
    return max(1, int(0.1 * steps)), int(0.8 * steps)


def lr_at(step: int, steps: int, peak: float) -> float:
    """Warmup-stable-decay: 10% linear warmup, flat, last 20% linear decay to 10%."""
    warm, decay_start = schedule_phases(steps)
    if step < warm:
        return peak * (step + 1) / warm
    if step < decay_start:
        return peak
    frac = (step - decay_start) / max(1, steps - decay_start)
    return peak * (1.0 - 0.9 * frac)


def run_demo(args: DemoArgs, stream=None) -> dict:
    import torch

    from fineline_monitor.demo_data import CORPUS_SOURCE, load_corpus_domains, train_tokenizer

    stream = stream or sys.stderr

    def say(msg: str) -> None:
        print(f"[demo] {msg}", file=stream, flush=True)

    injection = parse_injection(args.inject, args.steps)
    out = Path(args.out)
    prepare_out_dir(out)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()

    say(f"corpus: {CORPUS_SOURCE}")
    prose, code = load_corpus_domains(seed=args.seed)
    tok = train_tokenizer(prose + code, args.vocab_size, out / "tokenizer")
    data = {name: _tokens(tok, docs) for name, docs in (("prose", prose), ("code", code))}
    say(
        f"{len(prose):,} prose and {len(code):,} code documents: {len(data['prose']):,} + "
        f"{len(data['code']):,} tokens, vocab {len(tok):,} ({time.time() - t_start:.1f}s); "
        f"the mixture draws {PROSE_SHARE:.0%} of each batch from prose, the rest from code"
    )

    ladder = None
    if args.pilots > 0 and args.probe_every > 0:
        ladder = _train_ladder(args, tok, data, out, say)
    elif args.pilots > 0:
        say(
            "probes are off (--probe-every 0): no pilot ladder, nothing to compare capabilities with"
        )

    # ---- the target run ----
    model, optimizer, n_params = _build_model(
        args, len(tok), args.n_layer, args.n_embd, tok.eos_token_id
    )
    say(
        f"target: GPT-2 {args.n_layer} layers x {args.n_embd}, {n_params / 1e6:.2f}M parameters; "
        f"{args.steps} steps of {args.batch_size}x{args.seq_len} tokens; injection: "
        f"{'none' if injection is None else f'{injection[0]} at step {injection[1]}'}"
    )
    monitor_cfg = _monitor_config(
        args, out, f"demo-{'none' if injection is None else injection[0]}", ladder, say
    )
    meta = {
        "demo": True,
        "corpus": CORPUS_SOURCE,
        "params": n_params,
        "injection": None if injection is None else f"{injection[0]}@{injection[1]}",
        "ladder": None if ladder is None else ladder["runs"],
    }
    train_seconds, losses, monitor = _train(
        args, model, optimizer, tok, data, monitor_cfg, meta, injection, say
    )

    from fineline_monitor.report import render_report

    report = render_report(out)
    summary = _summarize(
        out,
        monitor,
        injection,
        args,
        n_params,
        train_seconds,
        time.time() - t_start,
        losses,
        ladder,
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary, report, say)
    return summary


def _tokens(tok, docs: List[str]):
    import torch

    ids: List[int] = []
    for d in docs:
        ids.extend(tok(d)["input_ids"])
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _build_model(args: DemoArgs, vocab: int, n_layer: int, n_embd: int, eos: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=256,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=max(1, n_embd // 64),
        bos_token_id=eos,
        eos_token_id=eos,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # say it, or transformers warns that it guessed
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 0.1, "name": "matrices"},
            {"params": no_decay, "weight_decay": 0.0, "name": "vectors"},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    return model, optimizer, n_params


def _monitor_config(
    args: DemoArgs, out: Path, run_name: str, ladder: Optional[dict], say, pilot: bool = False
):
    from fineline_monitor import MonitorConfig

    warm, decay_start = schedule_phases(args.steps)
    alerts = {"phases": ["warmup@0", f"stable@{warm}", f"decay@{decay_start}"]}
    if ladder is not None:
        # the pilots are the reference ladder: same data and tokens, two smaller sizes
        alerts["reference"] = {
            "files": [ladder["csv"]],
            "runs": list(ladder["runs"]),
            "align": "tokens",
        }
    sinks = (
        ["store"]
        if pilot
        else ["store", "console"] + (["prometheus"] if _have_prometheus_client(say) else [])
    )
    return MonitorConfig(
        run_name=run_name,
        out_dir=str(out),
        probe_every=args.probe_every,
        # The demo exists to show capability curves on a toy model whose steps are tiny next to
        # a probe round; a real run keeps the default whole-run budget (probe_max_overhead).
        probe_max_overhead=0.0,
        probes={
            "tasks": [t for t in args.tasks.split(",") if t],
            "docs_per_task": args.docs_per_task,
            "batch_size": 32,
        },
        indicators={"collect_every": 5, "enabled": not pilot},
        alerts=alerts,
        sinks={"enabled": sinks, "prometheus_mode": "textfile", "console_every": 50},
    )


def _train_ladder(args: DemoArgs, tok, data, out: Path, say) -> Optional[dict]:
    """Pretrain the pilots on the same data, for the same steps and tokens, probed at the
    target's steps; write their probe results to OUT/reference/ladder.csv."""
    import csv
    import tempfile

    from fineline_monitor.core.store import RunStore

    ref = out / "reference"
    ref.mkdir(parents=True, exist_ok=True)
    path = ref / "ladder.csv"
    runs: List[str] = []
    params: List[int] = []
    total = 0
    cols = ["source", "model", "params", "step", "tokens", "task", "metric", "value", "stderr"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for n_layer, n_embd in PILOTS[-args.pilots :]:
            t0 = time.time()
            model, optimizer, n = _build_model(args, len(tok), n_layer, n_embd, tok.eos_token_id)
            name = f"pilot-{n}"
            with tempfile.TemporaryDirectory(prefix="fineline-pilot-") as tmp:
                cfg = _monitor_config(args, Path(tmp), name, None, say, pilot=True)
                _train(
                    args,
                    model,
                    optimizer,
                    tok,
                    data,
                    cfg,
                    {"demo": True, "params": n, "pilot": True},
                    None,
                    say,
                    quiet=True,
                )
                store = RunStore(Path(tmp) / "run.db", readonly=True)
                rows = 0
                for row in store.iter_trajectory_rows(name, source=LADDER_SOURCE, params=n):
                    w.writerow(
                        {
                            k: (("nan" if k == "value" else "") if v is None else v)
                            for k, v in row.items()
                        }
                    )
                    rows += 1
                store.close()
            runs.append(f"{LADDER_SOURCE}/{name}")
            params.append(n)
            total += rows
            say(
                f"pilot {name}: GPT-2 {n_layer} x {n_embd}, {n / 1e6:.2f}M parameters, {rows} probe rows "
                f"({time.time() - t0:.1f}s)"
            )
    if total == 0:  # no probe round happened (a run shorter than its first round): no reference
        say("the pilots recorded no probe rows: no ladder")
        return None
    say(f"ladder: {path} ({', '.join(runs)})")
    return {"csv": str(path), "runs": runs, "params": params}


def _train(
    args: DemoArgs,
    model,
    optimizer,
    tok,
    data,
    monitor_cfg,
    meta: dict,
    injection: Optional[Tuple[str, int]],
    say,
    quiet: bool = False,
):
    import torch

    from fineline_monitor import FineLineMonitor

    monitor = FineLineMonitor(
        model=model, optimizer=optimizer, config=monitor_cfg, tokenizer=tok, run_meta=meta
    )
    gen = torch.Generator().manual_seed(args.seed + 1)
    tokens_seen = 0
    t_train = time.time()
    losses: List[float] = []
    prose, code = data["prose"], data["code"]
    stalled = False
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr)
        kind = _active_injection(injection, step)
        if kind == "lr_spike":
            lr *= 40.0
        if kind == "stall":
            stalled = True
        if stalled:
            lr *= 1e-3
        for g in optimizer.param_groups:
            g["lr"] = lr
        # PROSE_SHARE of each batch from prose, the rest from code; `data_mixture` leaves the prose out
        rows = []
        for i in range(args.batch_size):
            src = (
                code
                if (kind == "data_mixture" or i >= round(PROSE_SHARE * args.batch_size))
                else prose
            )
            s = int(torch.randint(0, len(src) - args.seq_len - 1, (1,), generator=gen))
            rows.append(src[s : s + args.seq_len])
        batch = torch.stack(rows)
        if kind == "data_corruption":
            batch = torch.randint(0, len(tok), batch.shape, generator=gen)
        model.train()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if kind == "grad_explosion":
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(1e4)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens_seen += batch.numel()
        # The one line a user adds to the loop (before zero_grad, so gradients are still there):
        monitor.step(
            step=step,
            loss=loss.detach(),
            tokens=tokens_seen,
            lr=lr,
            grad_norm=grad_norm,
            batch_tokens=batch.numel(),
        )
        optimizer.zero_grad(set_to_none=True)
        if step % 5 == 0:
            losses.append(float(loss.detach()))
        if monitor.should_stop:
            say(f"monitor asked to stop at step {step}")
            break
    train_seconds = time.time() - t_train
    monitor.close()
    return train_seconds, losses, monitor


def _active_injection(injection: Optional[Tuple[str, int]], step: int) -> Optional[str]:
    if injection is None:
        return None
    kind, at = injection
    # data_mixture and stall last to the end of the run; the others are short events
    length = {"lr_spike": 10, "data_corruption": 20, "grad_explosion": 3}.get(kind, 1 << 62)
    return kind if at <= step < at + length else None


def _have_prometheus_client(say) -> bool:
    """The demo writes metrics.prom when prometheus-client (the `prometheus` extra, which
    `make demo` installs) is there; on a plain `pip install fineline-monitor` it says so and
    goes on without it."""
    import importlib.util

    if importlib.util.find_spec("prometheus_client") is not None:
        return True
    say(
        "prometheus-client is not installed (pip install 'fineline-monitor[prometheus]'): no metrics.prom"
    )
    return False


def _summarize(
    out: Path,
    monitor,
    injection,
    args: DemoArgs,
    n_params: int,
    train_seconds: float,
    total_seconds: float,
    losses: List[float],
    ladder: Optional[dict] = None,
) -> dict:
    from fineline_monitor.core.store import RunStore
    from fineline_monitor.report.render import is_capability_alert, what_happened

    store = RunStore(out / "run.db", readonly=True)
    run = monitor.run
    alerts = store.alerts(run)
    rounds = store.probe_rounds(run)
    probe_steps = [r["step"] for r in rounds]
    first_alert_after = None
    criticals_before = 0
    if injection is not None:
        at = injection[1]
        after = [a for a in alerts if a["step"] >= at]
        first_alert_after = after[0] if after else None
        criticals_before = sum(1 for a in alerts if a["step"] < at and a["severity"] == "critical")
    rounds_to_detect = None
    if first_alert_after is not None:
        rounds_to_detect = sum(
            1 for s in probe_steps if injection[1] <= s <= first_alert_after["step"]
        )
    summary = {
        "run": run,
        "out": str(out),
        "steps": args.steps,
        "params": n_params,
        "injection": None if injection is None else {"kind": injection[0], "step": injection[1]},
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(total_seconds, 1),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "probe_rounds": len(rounds),
        "capabilities_first": rounds[0]["capabilities"] if rounds else {},
        "capabilities_last": rounds[-1]["capabilities"] if rounds else {},
        "alerts": {
            s: sum(1 for a in alerts if a["severity"] == s) for s in ("info", "warning", "critical")
        },
        "first_alert_after_injection": first_alert_after,
        "first_capability_alert_after_injection": next(
            (
                a
                for a in alerts
                if is_capability_alert(a) and (injection is None or a["step"] >= injection[1])
            ),
            None,
        ),
        "what_happened": what_happened(alerts, injection, probe_steps),
        "ladder": ladder,
        "probe_rounds_to_detect": rounds_to_detect,
        "criticals_before_injection": criticals_before,
        "disabled_parts": monitor.disabled_parts,
        "rows": store.row_counts(run),
    }
    store.close()
    return summary


def _print_summary(s: dict, report: Path, say) -> None:
    say("=" * 72)
    say(
        f"run {s['run']}: {s['steps']} steps, {s['params'] / 1e6:.2f}M params, "
        f"train {s['train_seconds']}s, total {s['total_seconds']}s"
    )
    if s["loss_first"] is not None:
        say(f"loss {s['loss_first']:.3f} -> {s['loss_last']:.3f}; {s['probe_rounds']} probe rounds")
    from fineline_monitor import metric_names as names

    first, last = s["capabilities_first"], s["capabilities_last"]
    for key in sorted(k for k in last if k.rsplit("/", 1)[-1] in names.CAPABILITY_SERIES):
        say(
            f"  {key:<32} {first.get(key, math.nan):.4f} -> {last[key]:.4f}  "
            f"({names.describe_capability_series(key.rsplit('/', 1)[-1])})"
        )
    a = s["alerts"]
    say(f"alerts: {a['critical']} critical, {a['warning']} warning, {a['info']} info")
    if s["injection"]:
        inj = s["injection"]
        fa = s["first_alert_after_injection"]
        if fa:
            say(
                f"injected {inj['kind']} at step {inj['step']}: first alert `{fa['rule']}` ({fa['severity']}) "
                f"at step {fa['step']}, after {s['probe_rounds_to_detect']} probe round(s); "
                f"criticals before injection: {s['criticals_before_injection']}"
            )
        else:
            say(f"injected {inj['kind']} at step {inj['step']}: NO alert raised")
    say(
        "what happened: "
        + (
            "; ".join(s["what_happened"])
            if s["what_happened"]
            else "no capability left its expected band"
        )
    )
    if s["disabled_parts"]:
        say(f"monitor parts disabled by errors: {s['disabled_parts']}")
    prom = ", metrics.prom" if (Path(s["out"]) / "metrics.prom").exists() else ""
    say(f"wrote {s['out']}/run.db, alerts.jsonl{prom}, {report}")
