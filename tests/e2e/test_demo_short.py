"""The demo, end to end, in a short mode: the CLI trains a tiny GPT on the CPU with the
monitor attached and writes run.db, alerts.jsonl, report.html and metrics.prom."""

import json
import subprocess
import sys

import pytest

from fineline_monitor.core.store import RunStore
from fineline_monitor.core.types import CAPABILITIES

ALERT_KEYS = {
    "run",
    "source",
    "model",
    "step",
    "tokens",
    "severity",
    "rule",
    "capability",
    "task",
    "metric",
    "observed",
    "expected",
    "band",
    "phase",
    "message",
}


def _demo(out, *extra, check=True, timeout=600):
    # the seed these short runs were checked with (the demo's default is for 600 steps)
    extra = extra if "--seed" in extra else (*extra, "--seed", "0")
    cmd = [sys.executable, "-m", "fineline_monitor.cli", "demo", "--out", str(out), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stderr[-4000:]
    return p


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    p = _demo(
        out,
        "--steps",
        "60",
        "--probe-every",
        "20",
        "--docs-per-task",
        "4",
        "--inject",
        "data_corruption@36",
        "--threads",
        "2",
    )
    return out, p


def test_demo_writes_all_outputs(short_demo):
    out, p = short_demo
    for name in ("run.db", "alerts.jsonl", "report.html", "metrics.prom"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    # progress and a closing summary on stderr
    assert "[fineline] step" in p.stderr and "probe step" in p.stderr
    assert "injected data_corruption at step 36" in p.stderr


def test_demo_store_has_steps_probes_for_every_capability(short_demo):
    out, _ = short_demo
    s = RunStore(out / "run.db", readonly=True)
    (run,) = s.runs()
    info = s.run_info(run)
    assert info["meta"]["versions"]["torch"] and info["config"]["probe_every"] == 20
    loss = s.series("train/loss", run)
    # training works before the injected corruption (steps 36-55 are random tokens on purpose)
    assert len(loss) >= 10 and min(v for st, _, v in loss if 0 < st < 36) < loss[0][2]
    rounds = s.probe_rounds(run)
    assert [r["step"] for r in rounds] == [0, 20, 40]
    caps = {r["capability"] for r in s.probe_results(run)}
    assert caps == set(CAPABILITIES)
    assert s.row_counts(run)["probe_docs"] > 0


def test_demo_alerts_file_follows_contract(short_demo):
    out, _ = short_demo
    lines = [json.loads(x) for x in (out / "alerts.jsonl").read_text().splitlines() if x.strip()]
    for a in lines:
        assert set(a) == ALERT_KEYS and a["severity"] in ("info", "warning", "critical")
    # the injected data corruption (random tokens from step 36 on) is caught by the engine
    caught = [a for a in lines if a["step"] >= 36 and a["severity"] in ("warning", "critical")]
    assert caught, f"no alert after the corruption injected at step 36: {lines}"
    s = RunStore(out / "run.db", readonly=True)
    assert {(a["step"], a["rule"]) for a in lines} <= {
        (r[0], r[1]) for r in s.query("SELECT step, rule FROM alerts")
    }, "alerts.jsonl and the store's alerts disagree"


def test_metrics_prom_is_an_exposition(short_demo):
    out, _ = short_demo
    text = (out / "metrics.prom").read_text()
    assert "# TYPE" in text and "fineline_" in text


def test_demo_refuses_foreign_folder_and_reuses_its_own(tmp_path, short_demo):
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not delete")
    p = _demo(foreign, "--steps", "5", check=False)
    assert p.returncode == 2 and "refusing to overwrite" in p.stderr
    assert (foreign / "thesis.tex").read_text() == "do not delete"


def test_demo_rejects_bad_injection(tmp_path):
    p = _demo(tmp_path / "x", "--inject", "lr_spik@3", "--steps", "10", check=False)
    assert p.returncode == 2 and "did you mean `lr_spike`" in p.stderr


def test_demo_reruns_over_its_own_output(tmp_path):
    out = tmp_path / "again"
    for _ in range(2):
        _demo(out, "--steps", "6", "--probe-every", "0", "--inject", "none")
    s = RunStore(out / "run.db", readonly=True)
    assert len(s.runs()) == 1 and len(s.series("train/loss", s.runs()[0])) >= 1


def test_demo_runs_without_the_prometheus_extra(tmp_path):
    """A plain `pip install fineline-monitor` has no prometheus-client: the demo says so and
    writes everything else (it raised an ImportError before)."""
    code = (
        "import sys, importlib.util as u; f = u.find_spec; "
        "u.find_spec = lambda n, *a: None if n == 'prometheus_client' else f(n, *a); "
        "sys.modules['prometheus_client'] = None; "
        "from fineline_monitor.cli import main; "
        f"sys.exit(main(['demo', '--out', {str(tmp_path / 'out')!r}, '--steps', '8', '--probe-every', '4', "
        "'--docs-per-task', '2', '--inject', 'none', '--threads', '2']))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "prometheus-client is not installed" in p.stderr
    assert (tmp_path / "out" / "run.db").exists() and not (
        tmp_path / "out" / "metrics.prom"
    ).exists()


# Families that a rule or a dashboard panel queries but that a healthy CPU demo run cannot
# fill, each with the condition under which the monitor writes samples for it. Any other
# queried family must have samples in the demo's exposition.
def _conditional_families():
    from fineline_monitor import metric_names as M

    fam = lambda name: M.METRICS[name].family or M.derived_family(name)  # noqa: E731
    return {
        fam(M.LOSS_SCALE): "fp16 training with a loss scaler (the demo trains in fp32)",
        fam(
            M.SKIPPED_STEPS
        ): "a framework that skips optimizer steps on overflow (fp16 loss scaling)",
        fam(M.HESSIAN_TRACE): "opt-in: indicators.hessian_trace and a Hessian batch",
    }


def test_every_queried_metric_has_samples_in_the_demo_exposition(short_demo):
    """Rules, dashboard panels and runbooks name families the real demo run fills with
    samples; a `# TYPE` line alone (the exporter declares every family it knows) does not
    count."""
    from fineline_e2e_support import exposition_names, queried_metric_names, runbook_metric_families

    out, _ = short_demo
    samples = exposition_names((out / "metrics.prom").read_text())
    conditional = _conditional_families()
    runbook = runbook_metric_families()
    assert runbook, "the runbooks name no metric (did the extraction break?)"
    queried = queried_metric_names() | runbook
    assert len(queried) > 20
    missing = sorted(
        n
        for n in queried
        if samples.get(n, 0) == 0
        and n not in conditional
        and n.removesuffix("_total") not in conditional
    )
    assert not missing, (
        f"queried by rules/dashboard /runbooks but without samples in the demo's metrics.prom: {missing}"
    )
    # an exemption must name a family someone queries, or it hides nothing and is stale
    assert set(conditional) <= {n.removesuffix("_total") for n in queried} | set(queried), (
        conditional
    )
