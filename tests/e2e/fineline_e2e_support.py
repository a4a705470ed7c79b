"""Shared pieces of the observability end-to-end tests: a real FineLineMonitor fed every
metric name the monitor produces, free ports, bounded waits, and the metric names that the
shipped rules and the Grafana dashboard query."""

from __future__ import annotations

import json
import math
import re
import socket
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set

import yaml

from fineline_monitor import Alert, FineLineMonitor, MonitorConfig, ProbeRound, TaskResult

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "hooks" / "prometheus" / "fineline-rules.yml"
AM_CONFIG = REPO / "hooks" / "alertmanager" / "alertmanager.yml"
DASHBOARD = REPO / "dashboards" / "grafana" / "fineline.json"

# Every metric name of the monitor's log_metrics contract (issue 7), with plausible values.
CAPS = {
    "hellaswag": "commonsense",
    "arc_easy": "knowledge",
    "boolq": "reading",
    "gsm8k": "math",
    "codex_humaneval": "code",
    "mmlu": "examination",
}


def step_metrics(step: int, tokens: int) -> Dict[str, float]:
    m = {
        "train/loss": 3.0 + 1.0 / (1 + step),
        "train/loss_z": 0.3,
        "train/lr": 3e-4,
        "train/tokens": float(tokens),
        "train/tokens_per_s": 1.2e4,
        "optim/grad_norm": 0.9,
        "optim/param_norm": 120.0,
        "optim/update_ratio": 1e-3,
        "optim/update_ratio/matrices": 1.1e-3,
        "optim/update_ratio/vectors": 4e-4,
        "optim/nonfinite_loss": 0.0,
        "optim/nonfinite_grad": 0.0,
        "optim/loss_scale": 65536.0,
        "optim/skipped_steps": 0.0,
        "optim/grad_rms/matrices": 2e-4,
        "optim/grad_rms/vectors": 1e-5,
        "optim/grad_rms_over_eps_min": 1e3,
    }
    return m


def probe_metrics(step: int) -> Dict[str, float]:
    m = {
        "stability/attn_logit_max": 12.0,
        "stability/output_logit_max": 20.0,
        "stability/output_logsumexp_mean": 9.5,
        "optim/hessian_trace": 410.0,
        "monitor/probe_seconds": 1.2,
        "monitor/probe_tokens_per_s": 3.5e4,
    }
    for layer in range(2):
        m[f"stability/attn_logit_max/{layer}"] = 10.0 + layer
        m[f"stability/act_rms/{layer}"] = 1.0 + 0.1 * layer
    for task in CAPS:
        m[f"probe/{task}/acc"] = 0.3 + 0.001 * step
        m[f"probe/{task}/bpb"] = 1.5 - 0.001 * step
    for cap in set(CAPS.values()):
        m[f"capability/{cap}/bpb"] = 0.05 + 0.001 * step
    return m


def probe_round(step: int, tokens: int) -> ProbeRound:
    tasks = {
        t: TaskResult(
            t, c, 8, {"acc": 0.3 + 0.001 * step, "bpb": 1.5 - 0.001 * step}, {"acc": 0.05}
        )
        for t, c in CAPS.items()
    }
    return ProbeRound(
        step=step,
        tokens=tokens,
        tasks=tasks,
        requests=[],
        seconds=1.2,
        tokens_scored=42000,
        capability_scores={f"{c}/bpb": 0.05 + 0.001 * step for c in set(CAPS.values())},
    )


def make_monitor(out: Path, run: str, **sinks) -> FineLineMonitor:
    """A real FineLineMonitor whose sinks come from build_sinks (store + prometheus)."""
    cfg = MonitorConfig(
        run_name=run,
        out_dir=str(out),
        probe_every=20,
        indicators={"enabled": False},
        sinks={"enabled": ["store", "prometheus"], **sinks},
    )
    return FineLineMonitor(model=None, config=cfg)


def feed_everything(monitor: FineLineMonitor, steps: int = 40) -> None:
    """Drive the monitor's own sinks with every kind of record the monitor emits.

    Loss/lr/tokens go through `monitor.step` (the monitor's collection path); the indicator,
    probe, phase, expectation and alert records are handed to `monitor.sinks` with the same
    calls the monitor makes (FineLineMonitor._emit), because the torch indicators and the
    probe runner are other modules' business and not needed to test the exporter.
    """
    prom = [s for s in monitor.sinks if getattr(s, "name", "") == "prometheus"]
    assert prom, f"no prometheus sink built: {monitor.sinks} disabled={monitor.disabled_parts}"
    for s in monitor.sinks:
        s.log_phase(0, 0, "warmup", None)
    for step in range(steps):
        tokens = (step + 1) * 4096
        monitor.step(step=step, loss=3.0 + 1.0 / (1 + step), tokens=tokens, lr=3e-4)
        if step % 10 == 0:
            for s in monitor.sinks:
                s.log_metrics(step, tokens, step_metrics(step, tokens))
        if step % 20 == 0:
            r = probe_round(step, tokens)
            rows = [
                {"name": f"capability/{c}", "expected": v, "low": v - 0.05, "high": v + 0.05}
                for c, v in r.capability_scores.items()
            ]
            rows += [
                {"name": f"probe/{t}/acc", "expected": 0.3, "low": 0.2, "high": 0.4} for t in CAPS
            ]
            for s in monitor.sinks:
                s.log_probe(r)
                s.log_metrics(step, tokens, probe_metrics(step))
                s.log_expectations(step, rows)
        if step == 10:
            for s in monitor.sinks:
                s.log_phase(10, tokens, "stable", "warmup")
        if step == 30:
            a = Alert(
                "capability_regression",
                "warning",
                step,
                "math/gsm8k acc fell below its band",
                run=monitor.run,
                capability="math",
                task="gsm8k",
                metric="acc",
                observed=0.2,
                expected=0.33,
                band=[0.28, 0.38],
                phase="stable",
                tokens=tokens,
            )
            for s in monitor.sinks:
                s.log_alert(a)


# ---- what the rules and the dashboard query ------------------------------------------------
_NAME = re.compile(r"\b(fineline_[a-z0-9_]+|up)\b(?!\s*\()")


def rule_exprs() -> List[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def dashboard_exprs() -> List[str]:
    d = json.loads(DASHBOARD.read_text())
    out = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    out += [a["expr"] for a in d["annotations"]["list"] if a.get("expr")]
    for v in d["templating"]["list"]:
        q = v.get("query")
        if isinstance(q, dict) and "label_values" in q.get("query", ""):
            out.append(re.sub(r"label_values\((.*),\s*\w+\)", r"\1", q["query"]))
    return out


def queried_metric_names() -> Set[str]:
    names: Set[str] = set()
    for e in rule_exprs() + dashboard_exprs():
        names.update(n for n in _NAME.findall(e) if n != "up")
    return names


def exposition_names(text: str) -> Dict[str, int]:
    """family/sample name -> number of samples (0: declared by # TYPE only)."""
    out: Dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            out.setdefault(name, 0)
            if line.split()[3] == "counter":
                out.setdefault(name + "_total", 0)
        elif line and not line.startswith("#"):
            name = re.split(r"[{\s]", line, maxsplit=1)[0]
            out[name] = out.get(name, 0) + 1
    return out


def promql_for_test(expr: str) -> str:
    """Grafana variables replaced so Prometheus can evaluate the panel query."""
    return (
        expr.replace("$run", ".*")
        .replace("$capability", ".*")
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
    )


# ---- processes and ports --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    fn: Callable[[], Optional[object]], timeout_s: float, what: str, interval: float = 0.25
):
    deadline = time.monotonic() + timeout_s
    last_err: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - keep polling until the deadline
            last_err = e
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout_s:.0f}s waiting for {what}"
        + (f" (last error: {last_err})" if last_err else "")
    )


def finite(x: float) -> bool:
    return math.isfinite(x)


def runbook_metric_families() -> Set[str]:
    """Prometheus families of the metrics the runbooks (README/docs sections whose heading
    says runbook or "when paged") tell the on-call to look at."""
    from fineline_monitor import metric_names as names

    out: Set[str] = set()
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^(#+)\s+(.*)$", line)
            if not m or not re.search(r"runbook|when paged", m.group(2), re.I):
                continue
            for nxt in lines[i + 1 :]:
                h = re.match(r"^(#+)\s", nxt)
                if h and len(h.group(1)) <= len(m.group(1)):
                    break
                for tok in re.findall(r"`([^`\n]+)`", nxt):
                    if re.fullmatch(r"fineline_[a-z0-9_]+", tok):
                        out.add(tok)
                    elif "<" not in tok and names.lookup(tok)[0] is not None:
                        out.add(names.prom_name(tok)[0])
    return out
