"""The demo's faults, end to end: each injection raises the alerts it should, within 3 probe
rounds, nothing is critical before it, and a healthy run raises no warning.

Short settings (300 steps, a probe round every 20 steps, one pilot) so the four runs fit a
CI job; the default `make demo` is the same story at 600 steps."""

import json
import re
import subprocess
import sys

import pytest

from fineline_monitor import metric_names as names
from fineline_monitor.core.store import RunStore
from fineline_monitor.report.render import is_capability_alert

STEPS, EVERY, AT = 300, 20, 180
WITHIN_ROUNDS = 3
# capabilities whose tasks are English text (math: word problems and arithmetic in words)
PROSE_CAPABILITIES = {"commonsense", "reading", "knowledge", "examination", "math"}


def _demo(out, inject):
    cmd = [
        sys.executable,
        "-m",
        "fineline_monitor.cli",
        "demo",
        "--out",
        str(out),
        "--steps",
        str(STEPS),
        "--probe-every",
        str(EVERY),
        "--pilots",
        "1",
        "--inject",
        inject,
        "--seed",
        "0",  # the seed these short runs were checked with (the demo's default is for 600 steps)
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


_RUNS = {}


def _run(tmp_path_factory, inject):
    if inject not in _RUNS:
        out = tmp_path_factory.mktemp(inject.replace("@", "_")) / "out"
        p = _demo(out, inject)
        store = RunStore(out / "run.db", readonly=True)
        (run,) = store.runs()
        alerts = store.alerts(run)
        store.close()
        _RUNS[inject] = (out, p, alerts)
    return _RUNS[inject]


def _deadline():
    """The last step at which an alert counts as caught: the 3rd probe round after AT."""
    first = -(-AT // EVERY) * EVERY
    return first + (WITHIN_ROUNDS - 1) * EVERY


def _capability_alerts(alerts, capabilities):
    return [
        a
        for a in alerts
        if a.get("capability") in capabilities
        and is_capability_alert(a)
        and AT <= a["step"] <= _deadline()
    ]


def _no_critical_before(alerts):
    early = [a for a in alerts if a["step"] < AT and a["severity"] == "critical"]
    assert not early, early


def test_data_mixture_raises_a_capability_alert_naming_an_english_capability(tmp_path_factory):
    out, p, alerts = _run(tmp_path_factory, f"data_mixture@{AT}")
    _no_critical_before(alerts)
    hits = _capability_alerts(alerts, PROSE_CAPABILITIES)
    assert hits, [(a["rule"], a["capability"], a["metric"], a["step"]) for a in alerts]
    first = hits[0]
    # the band the alert was judged against is drawn in the report, with the unit of the score
    assert first["band"] and first["band"][0] <= first["expected"] <= first["band"][1]
    html = (out / "report.html").read_text()
    box = html[html.index('id="what-happened"') :]
    box = box[: box.index("</div>")]
    assert re.search(rf"{first['capability']}[^<]* left its band at step {first['step']}", box), box
    assert names.describe_capability_series(names.CAP_BPB) in html
    said = next(line for line in p.stderr.splitlines() if "what happened: " in line)
    assert f"{first['capability']}" in said and f"left its band at step {first['step']}" in said, (
        said
    )


def test_lr_spike_is_caught_at_the_injection(tmp_path_factory):
    _, _, alerts = _run(tmp_path_factory, f"lr_spike@{AT}")
    _no_critical_before(alerts)
    caught = [
        a
        for a in alerts
        if AT <= a["step"] <= _deadline() and a["severity"] in ("warning", "critical")
    ]
    assert caught and {a["rule"] for a in caught} & {
        "loss_divergence",
        "loss_spike",
        "update_ratio",
    }, caught


@pytest.mark.xfail(
    strict=True,
    reason=(
        "known gap: the demo's curves flatten at the stall (bits per byte gains 0.08 a round before, "
        "under 0.003 after) and the pilots keep improving, but with probe rounds every 40 of 600 steps "
        "the stable phase has too few rounds before the stall for a frozen fit of the curve's residual "
        "from the ladder (10 fit points, 5 at least); docs/ladder.md"
    ),
)
def test_stall_raises_a_capability_alert(tmp_path_factory):
    _, _, alerts = _run(tmp_path_factory, f"stall@{AT}")
    _no_critical_before(alerts)
    assert _capability_alerts(
        alerts, {"commonsense", "reading", "knowledge", "examination", "code", "math"}
    )


def test_healthy_run_raises_no_warning(tmp_path_factory):
    out, p, alerts = _run(tmp_path_factory, "none")
    bad = [a for a in alerts if a["severity"] in ("warning", "critical")]
    assert not bad, [(a["rule"], a["capability"], a["metric"], a["step"]) for a in bad]
    assert "no capability left its expected band" in p.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["what_happened"] == []
    ladder = (out / "reference" / "ladder.csv").read_text().splitlines()
    assert ladder[0] == "source,model,params,step,tokens,task,metric,value,stderr"
    assert all(line.startswith("demo-ladder,pilot-") for line in ladder[1:])


CHROMIUM = "/usr/bin/chromium"


def test_default_report_in_chromium_shows_bands_units_and_the_alert(tmp_path_factory, tmp_path):
    """The rendered DOM of the data_mixture report (what a browser shows, after its script
    ran): capability charts with their bands, each score's unit, the alert marker."""
    import os
    import re

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (Debian package chromium)")
    out, _, alerts = _run(tmp_path_factory, f"data_mixture@{AT}")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=3000",
        "--dump-dom",
    ]
    dom = subprocess.run(
        [CHROMIUM, *flags, (out / "report.html").resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert re.search(r'<pre id="js-errors" data-count="0">\s*</pre>', html)
    for cap in ("commonsense", "reading", "code"):
        chart = re.search(
            rf'<svg[^>]*aria-label="{cap} · bits per byte, lower is better".*?</svg>', html, re.S
        )
        assert chart, cap
        assert "<title>expected band</title>" in chart.group(0), cap
    hit = _capability_alerts(alerts, PROSE_CAPABILITIES)[0]
    chart = re.search(
        rf'<svg[^>]*aria-label="{hit["capability"]} · bits per byte, lower is better".*?</svg>',
        html,
        re.S,
    ).group(0)
    assert f"{hit['severity']} {hit['rule']} @ step {hit['step']}" in chart
