"""End to end: monitor -> exporter -> real Prometheus (shipped rules) -> real Alertmanager
(shipped routes) -> a PagerDuty Events v2 page at this test's receiver, within 60 s.

Everything runs on 127.0.0.1 with temporary storage; the binaries come from the Debian
packages `prometheus` and `prometheus-alertmanager` (skipped, saying so, when absent).
Alertmanager's config is the shipped hooks/alertmanager/alertmanager.yml with only the
endpoints and timings replaced: the PagerDuty receiver's `url` points at this test, the
routing key and Slack URL files are temporary files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml
from fineline_e2e_support import (
    AM_CONFIG,
    RULES,
    dashboard_exprs,
    free_port,
    make_monitor,
    promql_for_test,
    wait_for,
)

PROMETHEUS = "/usr/bin/prometheus"
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


class Receiver:
    """Collects the JSON bodies POSTed by Alertmanager (PagerDuty and Slack receivers)."""

    def __init__(self) -> None:
        self.received: List[Dict[str, Any]] = []
        self.lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                n = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(n)
                try:
                    data = json.loads(body)
                except ValueError:
                    data = {"_raw": body.decode(errors="replace")}
                with outer.lock:
                    outer.received.append({"path": self.path, "body": data, "t": time.monotonic()})
                self.send_response(202)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"status":"success","message":"Event processed"}')

            def log_message(self, *a):  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def on(self, path: str) -> List[Dict[str, Any]]:
        with self.lock:
            return [r for r in self.received if r["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _get_json(url: str) -> Dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # Prometheus explains a bad query in the body
        return json.loads(e.read() or b"{}") or {"status": "error", "error": str(e)}


def _am_config(tmp: Path, receiver_port: int) -> Path:
    cfg = yaml.safe_load(AM_CONFIG.read_text())
    key_file = tmp / "pd-routing-key"
    key_file.write_text("test-routing-key-0123456789abcdef\n")
    slack_file = tmp / "slack-url"
    slack_file.write_text(f"http://127.0.0.1:{receiver_port}/slack\n")

    def fast(route: Dict[str, Any]) -> None:
        for k in ("group_wait", "group_interval"):
            if k in route or route is cfg["route"]:
                route[k] = "1s"
        for r in route.get("routes", []):
            fast(r)

    fast(cfg["route"])
    for rec in cfg["receivers"]:
        for pd in rec.get("pagerduty_configs", []):
            pd["routing_key_file"] = str(key_file)
            pd["url"] = f"http://127.0.0.1:{receiver_port}/v2/enqueue"
        for sl in rec.get("slack_configs", []):
            sl["api_url_file"] = str(slack_file)
    path = tmp / "alertmanager.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _prom_config(tmp: Path, exporter_port: int, am_port: int) -> Path:
    rules = tmp / "fineline-rules.yml"
    shutil.copy(RULES, rules)
    cfg = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(rules)],
        "alerting": {
            "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]
        },
        "scrape_configs": [
            {
                "job_name": "fineline",
                "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
            }
        ],
    }
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _start(cmd: List[str], log: Path) -> subprocess.Popen:
    fh = open(log, "w")
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def test_critical_alert_pages_through_prometheus_and_alertmanager(tmp_path):
    for b in (PROMETHEUS, ALERTMANAGER):
        if not os.path.exists(b):
            pytest.skip(
                f"{b} not installed (Debian packages prometheus, prometheus-alertmanager); "
                ".ci/run installs them"
            )
    receiver = Receiver()
    procs: List[subprocess.Popen] = []
    monitor = None
    try:
        # 1) a real monitor with the exporter in http mode on a free port
        monitor = make_monitor(
            tmp_path / "out", "e2e-run", prometheus_mode="http", prometheus_port=0
        )
        prom_sink = next(s for s in monitor.sinks if getattr(s, "name", "") == "prometheus")
        assert prom_sink.port and prom_sink.host == "127.0.0.1"
        for step in range(0, 30):
            monitor.step(step=step, loss=2.5, tokens=(step + 1) * 1024, lr=1e-3)

        # 2) Alertmanager and Prometheus, on loopback, temp storage
        am_port, prom_port = free_port(), free_port()
        am_cfg = _am_config(tmp_path, receiver.port)
        procs.append(
            _start(
                [
                    ALERTMANAGER,
                    f"--config.file={am_cfg}",
                    f"--storage.path={tmp_path / 'am-data'}",
                    f"--web.listen-address=127.0.0.1:{am_port}",
                    "--cluster.listen-address=",
                    "--log.level=warn",
                ],
                tmp_path / "alertmanager.log",
            )
        )
        prom_cfg = _prom_config(tmp_path, prom_sink.port, am_port)
        procs.append(
            _start(
                [
                    PROMETHEUS,
                    f"--config.file={prom_cfg}",
                    f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--log.level=warn",
                ],
                tmp_path / "prometheus.log",
            )
        )
        am, prom = f"http://127.0.0.1:{am_port}", f"http://127.0.0.1:{prom_port}"
        wait_for(lambda: _get_json(f"{am}/api/v2/status"), 30, "Alertmanager to start")
        wait_for(
            lambda: _get_json(f"{prom}/api/v1/query?query=up")["data"]["result"],
            30,
            "Prometheus to scrape the monitor",
        )
        rules = _get_json(f"{prom}/api/v1/rules")["data"]["groups"]
        assert sum(len(g["rules"]) for g in rules) == 8, "shipped rules not loaded"
        assert not receiver.received, "paged before anything went wrong"

        # 3) the run goes wrong: a non-finite loss. The monitor's own alert engine must raise
        #    the critical alert: a monitor whose engine failed to build (isolated, so training
        #    goes on) fails here rather than being paged by a hand-built alert.
        assert monitor.engine is not None, (
            f"the alert engine was not built: {monitor.disabled_parts}"
        )
        t0 = time.monotonic()
        fired = monitor.step(step=30, loss=float("nan"), tokens=31 * 1024, lr=1e-3)
        crit = [a for a in fired if a.severity == "critical"]
        assert crit, f"no critical alert for a NaN loss: {fired}"

        # 4) the page arrives at the PagerDuty endpoint within 60 s
        pages = wait_for(
            lambda: [
                r for r in receiver.on("/v2/enqueue") if r["body"].get("event_action") == "trigger"
            ],
            60,
            "the PagerDuty page (Alertmanager logs: " + str(tmp_path / "alertmanager.log") + ")",
        )
        latency = pages[0]["t"] - t0
        body = pages[0]["body"]
        assert body["routing_key"] == "test-routing-key-0123456789abcdef"
        assert body["payload"]["severity"] == "critical"
        assert (
            "e2e-run" in body["payload"]["summary"] and crit[0].rule in body["payload"]["summary"]
        )
        assert body["payload"]["custom_details"]["run"] == "e2e-run"
        assert body["payload"]["custom_details"]["runbook"].startswith("docs/alerts.md#")
        assert latency < 60
        print(f"page latency: {latency:.1f}s after the non-finite loss")
        # criticals also reach the chat receiver (continue: true); no warning-only page was sent
        wait_for(lambda: receiver.on("/slack"), 20, "the Slack copy of the critical alert")

        # 5) while Prometheus runs: every Grafana panel query is valid PromQL and evaluates
        for expr in dashboard_exprs():
            q = urllib.parse.quote(promql_for_test(expr))
            res = _get_json(f"{prom}/api/v1/query?query={q}")
            assert res["status"] == "success", (expr, res)
        got = _get_json(
            f"{prom}/api/v1/query?query="
            + urllib.parse.quote('fineline_alert_active{severity="critical"}')
        )["data"]["result"]
        assert got and got[0]["metric"]["run"] == "e2e-run" and got[0]["value"][1] == "1"
    finally:
        for p in reversed(procs):
            _stop(p)
        if monitor is not None:
            monitor.close()
        receiver.close()
