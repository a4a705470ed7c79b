"""The shipped Prometheus rules and Alertmanager routes are valid and do what they say.

Runs the real tools from the Debian packages (promtool, amtool); skips with a reason when
they are not installed (CI installs them via .ci/run).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "hooks" / "prometheus" / "fineline-rules.yml"
RULE_TESTS = REPO / "hooks" / "prometheus" / "fineline-rules.test.yml"
AM_CONFIG = REPO / "hooks" / "alertmanager" / "alertmanager.yml"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"`{name}` not installed (Debian package prometheus / prometheus-alertmanager); "
            f".ci/run installs it"
        )
    return path


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_check_rules():
    r = _run(_tool("promtool"), "check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 8 rules found" in r.stdout


def test_promtool_test_rules():
    r = _run(_tool("promtool"), "test", "rules", str(RULE_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_test_rules_catch_a_broken_rule(tmp_path):
    """The unit tests are not vacuous: loosening the stall threshold makes them fail."""
    text = RULES.read_text().replace("> 900)", "> 60)")
    assert text != RULES.read_text()
    (tmp_path / "fineline-rules.yml").write_text(text)
    shutil.copy(RULE_TESTS, tmp_path / "fineline-rules.test.yml")
    r = _run(_tool("promtool"), "test", "rules", "fineline-rules.test.yml", cwd=tmp_path)
    assert r.returncode != 0
    assert "FineLineTrainingStalled" in r.stdout + r.stderr


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_every_rule_has_severity_and_runbook():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["labels"]["service"] == "fineline", r["alert"]
        for key in ("summary", "description", "runbook_url"):
            assert r["annotations"].get(key), (r["alert"], key)
        page, anchor = r["annotations"]["runbook_url"].split("#", 1)
        anchors = {
            _slug(h) for h in re.findall(r"^#+ (.*)$", (REPO / page).read_text(), flags=re.M)
        }
        assert anchor in anchors, f"{r['alert']}: runbook anchor #{anchor} missing from {page}"


def test_amtool_check_config():
    r = _run(_tool("amtool"), "check-config", str(AM_CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@pytest.mark.parametrize(
    "labels, receivers",
    [
        (
            ["service=fineline", "severity=critical", "alertname=FineLineCriticalAlert", "run=r1"],
            "pagerduty-oncall,slack-warnings",
        ),
        (
            ["service=fineline", "severity=warning", "alertname=FineLineWarningAlert", "run=r1"],
            "slack-warnings",
        ),
        (
            ["service=other", "severity=critical"],
            "slack-warnings",
        ),  # not ours: never pages on our behalf
    ],
)
def test_amtool_routes(labels, receivers):
    r = _run(
        _tool("amtool"),
        "config",
        "routes",
        "test",
        f"--config.file={AM_CONFIG}",
        f"--verify.receivers={receivers}",
        *labels,
    )
    assert r.returncode == 0, (
        f"{labels} routed to {r.stdout.strip()}, expected {receivers}\n{r.stderr}"
    )


def test_alertmanager_config_keeps_secrets_out():
    cfg = yaml.safe_load(AM_CONFIG.read_text())
    for rec in cfg["receivers"]:
        for pd in rec.get("pagerduty_configs", []):
            assert "routing_key_file" in pd and "routing_key" not in pd and "service_key" not in pd
        for sl in rec.get("slack_configs", []):
            assert "api_url_file" in sl and "api_url" not in sl
    # inhibition: a critical on a run silences that run's warnings
    inh = cfg["inhibit_rules"][0]
    assert 'severity="critical"' in inh["source_matchers"] and inh["equal"] == ["run"]
