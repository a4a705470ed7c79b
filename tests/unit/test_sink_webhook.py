"""Webhook sink: Slack / PagerDuty Events v2 / generic payloads to a real local HTTP server,
retries with backoff, de-duplication key, secrets only from the environment and never shown."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fineline_monitor import Alert, MonitorConfig
from fineline_monitor.core.config import ConfigError
from fineline_monitor.sinks.webhook import WebhookSink

SECRET_PATH = "/services/T000/B000/sEcReTtOkEn"
KEY = "R0UTINGKEY0123456789abcdefSECRET"


class Server:
    def __init__(self, fail_first: int = 0, status: int = 500):
        self.bodies, self.fail_first, self.status = [], fail_first, status
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.fail_first > 0:
                    outer.fail_first -= 1
                    self.send_response(outer.status)
                    self.end_headers()
                    return
                outer.bodies.append((self.path, body))
                self.send_response(202)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}{SECRET_PATH}"

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def alert(sev="critical", **kw):
    return Alert(
        "nonfinite_loss",
        sev,
        42,
        "loss is NaN",
        run="r1",
        metric="train/loss",
        tokens=4200,
        phase="stable",
        **kw,
    )


def make(monkeypatch, url, kind, **kw):
    monkeypatch.setenv("FINELINE_WEBHOOK_URL", url)
    monkeypatch.setenv("FINELINE_PAGERDUTY_ROUTING_KEY", KEY)
    cfg = MonitorConfig(sinks={"enabled": ["webhook"], "webhook_kind": kind, **kw})
    return WebhookSink.from_config(cfg, out_dir=None, run="r1")


def test_pagerduty_events_v2_payload(monkeypatch, server):
    s = make(monkeypatch, server.url, "pagerduty")
    a = alert(capability=None)
    s.log_alert(a)
    s.log_alert(alert("info"))  # below webhook_min_severity=warning: not sent
    s.close()
    assert len(server.bodies) == 1
    path, body = server.bodies[0]
    assert path == SECRET_PATH
    assert body["routing_key"] == KEY and body["event_action"] == "trigger"
    assert body["dedup_key"] == a.dedup_key == "r1|||nonfinite_loss|||train/loss"
    p = body["payload"]
    assert p["severity"] == "critical" and p["source"] == "r1" and p["class"] == "nonfinite_loss"
    assert "loss is NaN" in p["summary"] and len(p["summary"]) <= 1024
    assert p["custom_details"]["step"] == 42 and "observed" not in p["custom_details"]


def test_slack_and_generic_payloads(monkeypatch, server):
    s = make(monkeypatch, server.url, "slack")
    s.log_alert(alert("warning", observed=0.2, expected=0.3, band=[0.25, 0.35]))
    s.close()
    body = server.bodies[-1][1]
    assert body["text"].startswith(":warning: [WARNING] nonfinite_loss")
    assert "*band* [0.25, 0.35]" in body["blocks"][0]["text"]["text"]
    s = make(monkeypatch, server.url, "generic")
    s.log_alert(alert())
    s.close()
    body = server.bodies[-1][1]
    assert body["alert"]["rule"] == "nonfinite_loss" and body["dedup_key"] == alert().dedup_key


def test_retries_5xx_with_backoff_then_delivers(monkeypatch):
    srv = Server(fail_first=2, status=503)
    try:
        s = make(monkeypatch, srv.url, "generic")
        s.worker.backoff_s = 0.05
        s.log_alert(alert())
        s.flush()
        st = s.stats
        assert st["delivered"] == 1 and st["retries"] == 2 and len(srv.bodies) == 1
        s.close()
    finally:
        srv.close()


def test_4xx_is_not_retried(monkeypatch):
    srv = Server(fail_first=5, status=400)
    try:
        s = make(monkeypatch, srv.url, "pagerduty")
        s.log_alert(alert())
        s.flush()
        assert s.stats["failed"] == 1 and s.stats["retries"] == 0
        s.close()
    finally:
        srv.close()


def test_secrets_never_in_repr_logs_or_errors(monkeypatch, caplog):
    # a dead endpoint: the error text would contain the URL; it must be redacted
    dead = f"http://127.0.0.1:9{SECRET_PATH}"
    s = make(monkeypatch, dead, "pagerduty")
    s.worker.max_retries, s.worker.backoff_s = 1, 0.01
    with caplog.at_level(logging.DEBUG, logger="fineline_monitor"):
        s.log_alert(alert())
        s.flush()
        s.close()
    st = s.stats
    assert st["failed"] == 1
    text = repr(s) + str(st) + caplog.text + json.dumps(vars(s), default=str)
    for secret in ("sEcReTtOkEn", KEY):
        assert secret not in text
    assert "FINELINE_WEBHOOK_URL" in repr(s)


def test_missing_env_fails_at_attach_naming_the_variable(monkeypatch):
    monkeypatch.delenv("FINELINE_WEBHOOK_URL", raising=False)
    monkeypatch.delenv("MY_KEY", raising=False)
    cfg = MonitorConfig(sinks={"enabled": ["webhook"], "webhook_kind": "slack"})
    with pytest.raises(ConfigError, match="FINELINE_WEBHOOK_URL"):
        WebhookSink.from_config(cfg, out_dir=None, run="r")
    cfg = MonitorConfig(
        sinks={"enabled": ["webhook"], "webhook_kind": "pagerduty", "pagerduty_key_env": "MY_KEY"}
    )
    with pytest.raises(ConfigError, match="MY_KEY"):
        WebhookSink.from_config(cfg, out_dir=None, run="r")
    monkeypatch.setenv("FINELINE_WEBHOOK_URL", "https://evil.example/x")
    cfg = MonitorConfig(
        sinks={"enabled": ["webhook"], "webhook_url_allowlist": ["hooks.slack.com"]}
    )
    with pytest.raises(ConfigError, match="allowlist"):
        WebhookSink.from_config(cfg, out_dir=None, run="r")
