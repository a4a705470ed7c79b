"""The metric-name registry is the one source of names: the alert rules, the dashboards, the
runbook and the producers use only registered names, and the exporter declares every
registered family."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Set

import pytest
import yaml

from fineline_monitor import metric_names as names

REPO = Path(__file__).resolve().parents[2]
PROM_NAME = re.compile(r"\b(fineline_[a-z0-9_]+)\b(?!\s*\()")
# a monitor metric name as the docs write it: `optim/grad_norm`, `probe/<task>/<metric>`
METRIC_NAME = re.compile(
    r"^(?:train|optim|stability|monitor|probe|capability|fineline|alerts)/[\w<>./:-]+$"
)


def _unregistered_prometheus(text: str) -> Set[str]:
    known = names.prometheus_sample_names()
    return {n for n in PROM_NAME.findall(text) if n not in known}


# ---- the registry itself ---------------------------------------------------------------------------
def test_registry_is_consistent():
    families = [m.family for m in names.metric_families()]
    assert len(families) == len(set(families)), "two metric names share a Prometheus family"
    assert not set(families) & set(names.FAMILIES), "a metric family is also built by the exporter"
    for m in names.METRICS.values():
        assert m.help.endswith(".") and m.help[0].isupper(), m.name
        assert m.family is None or re.fullmatch(r"fineline_[a-z0-9_]+", m.family), m.family
    for name in (
        "optim/grad_norm",
        "optim/update_ratio/matrices",
        "stability/attn_logit_max/h.3",
        "probe/arc_easy:rc_0shot/acc",
        "capability/math/bpb",
        "fineline/internal_error/sink_store",
        "alerts/critical",
        "capability/math/acc_above_chance_expected",
        "probe_math/gsm8k/bpb_low",
    ):
        assert names.is_registered(name), name
    for name in ("optim/grad_nrom", "train/los", "probe/only_task", "stability/act_rms_max"):
        assert not names.is_registered(name), name
    assert names.lookup("optim/update_ratio/matrices") == (
        names.METRICS[names.UPDATE_RATIO],
        "matrices",
    )
    assert names.lookup("probe/gsm8k/acc") == (names.METRICS[names.PROBE_METRIC], "acc")
    assert names.split_probe_key("probe/arc_easy:rc_0shot/acc") == ("arc_easy:rc_0shot", "acc")


def test_the_exporter_declares_every_registered_family():
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry

    from fineline_monitor.sinks.prometheus import PrometheusSink

    s = PrometheusSink("r", mode="http", registry=CollectorRegistry(), port=0)
    try:
        s.log_metrics(1, 10, {names.LOSS: 2.0})  # the liveness families appear with the first step
        s.log_probe(_round())
        s.log_phase(1, 10, "warmup", None)
        text = s.exposition()
    finally:
        s.close()
    declared = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            declared.add(
                family + "_total" if kind == "counter" and not family.endswith("_total") else family
            )
    assert set(names.prometheus_sample_names()) <= declared, (
        set(names.prometheus_sample_names()) - declared
    )
    assert not _unregistered_prometheus(text), _unregistered_prometheus(text)


# ---- what reads the names: rules, dashboards, runbook ---------------------------------------------------
def test_prometheus_rules_use_only_registered_families():
    rules = yaml.safe_load((REPO / "hooks/prometheus/fineline-rules.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    tests = yaml.safe_load((REPO / "hooks/prometheus/fineline-rules.test.yml").read_text())
    series = [s["series"] for t in tests["tests"] for s in t.get("input_series", [])]
    used = {n for e in exprs + series for n in PROM_NAME.findall(e)}
    assert len(used) >= 8, used  # the extraction sees the rules
    assert not _unregistered_prometheus("\n".join(exprs + series))


def test_grafana_dashboard_uses_only_registered_families():
    d = json.loads((REPO / "dashboards/grafana/fineline.json").read_text())
    queries = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    queries += [a["expr"] for a in d["annotations"]["list"] if a.get("expr")]
    queries += [v["definition"] for v in d["templating"]["list"] if v.get("definition")]
    assert len(queries) > 30
    assert not _unregistered_prometheus("\n".join(queries))


def test_wandb_workspace_uses_only_registered_keys():
    pytest.importorskip("wandb_workspaces")
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fl_ws", REPO / "dashboards" / "wandb_workspace.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    keys = mod.panel_keys(mod.build_workspace("team", "project"))
    assert len(keys) > 50
    assert [k for k in keys if not names.is_registered(k)] == []


def _runbook_sections() -> Dict[str, str]:
    """Sections of the user docs whose heading says runbook (or what to do when paged), by
    file and heading, down to the next heading of the same or a higher level."""
    out: Dict[str, str] = {}
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if not path.exists():
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^(#+)\s+(.*)$", line)
            if not m or not re.search(r"runbook|when paged", m.group(2), re.I):
                continue
            level, body = len(m.group(1)), []
            for nxt in lines[i + 1 :]:
                h = re.match(r"^(#+)\s", nxt)
                if h and len(h.group(1)) <= level:
                    break
                body.append(nxt)
            out[f"{path.name}: {m.group(2)}"] = "\n".join(body)
    return out


def _names_in_prose(text: str) -> List[str]:
    return [
        t
        for t in re.findall(r"`([^`\n]+)`", text)
        if METRIC_NAME.match(t) or PROM_NAME.fullmatch(t)
    ]


def test_runbook_uses_only_registered_names():
    sections = _runbook_sections()
    assert sections, "no runbook section found in README.md or docs/*.md"
    used = [n for text in sections.values() for n in _names_in_prose(text)]
    assert used, "the runbook names no metric (did the extraction break?)"
    bad = [n for n in used if not (names.is_registered(n) or n in names.prometheus_sample_names())]
    assert not bad, f"the runbook names metrics the monitor does not log: {bad}"


# ---- what writes the names: the indicators and the monitor ---------------------------------------------------
def _round():
    from fineline_monitor import ProbeRound, TaskResult

    return ProbeRound(
        step=1,
        tokens=10,
        tasks={"gsm8k": TaskResult("gsm8k", "math", 4, {"acc": 0.1, "bpb": 1.2}, {"acc": 0.05})},
        requests=[],
        seconds=1.0,
        tokens_scored=100,
        capability_scores={"math/bpb": 2.1, "math/headline": 2.1},
    )


def test_producers_write_only_registered_names():
    torch = pytest.importorskip("torch")
    from fineline_monitor.core.config import IndicatorConfig
    from fineline_monitor.indicators import StepIndicators
    from fineline_monitor.monitor import probe_metrics

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ind = StepIndicators(model, opt, IndicatorConfig(collect_every=2))
    written: Set[str] = set()
    for step in range(1, 5):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ind.on_step(step=step, loss=loss.detach(), lr=1e-3, tokens=step * 32, loss_scale=1024.0)
        if step % 2 == 0:
            written |= set(ind.collect(step))
    written |= set(ind.probe_round_metrics(ind.probe_context()))
    written |= set(probe_metrics(_round()))
    assert {names.LOSS, names.GRAD_NORM, names.UPDATE_RATIO, names.ADAM_EPS} <= written, written
    assert sorted(n for n in written if not names.is_registered(n)) == []
