"""Direct webhook sink for teams without Prometheus: alerts to Slack, PagerDuty or any URL.

Payloads (`sinks.webhook_kind`):
- `generic`: `{"source": "fineline_monitor", "dedup_key": ..., "alert": <Alerts JSONL row>}`;
- `slack`: an incoming-webhook message (`text` plus one mrkdwn block);
- `pagerduty`: a PagerDuty Events API v2 `trigger` event whose `dedup_key` is
  `Alert.dedup_key`, so a condition that keeps firing updates one incident instead of
  opening a new one every round.

Secrets (the webhook URL, the PagerDuty routing key) come from environment variables whose
names are in SinkConfig. They are read from the environment at delivery time and never kept
on the sink object, and every error text that could contain them is redacted before it is
logged (`repr(sink)` shows only the variable names). Delivery runs on a BackgroundWorker:
bounded queue, retries with exponential backoff for network errors, 5xx and 429; other 4xx
are not retried (the payload or key is wrong; retrying cannot fix it).
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any, Dict, List, Optional

from fineline_monitor.core.types import SEVERITIES, Alert
from fineline_monitor.sinks.background import BackgroundWorker
from fineline_monitor.sinks.base import Sink

log = logging.getLogger("fineline_monitor.sinks")

PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
PD_SEVERITY = {"critical": "critical", "warning": "warning", "info": "info"}
SLACK_ICON = {
    "critical": ":rotating_light:",
    "warning": ":warning:",
    "info": ":information_source:",
}


class PermanentDeliveryError(RuntimeError):
    """The endpoint rejected the payload (4xx other than 408/429): do not retry."""


def _fmt(x: Any) -> str:
    return "n/a" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))


def alert_title(a: Alert) -> str:
    where = "/".join(p for p in (a.capability, a.task, a.metric) if p) or "run"
    return f"[{a.severity.upper()}] {a.rule} on {where} (run {a.run or '?'}, step {a.step})"


def generic_payload(a: Alert) -> Dict[str, Any]:
    return {
        "source": "fineline_monitor",
        "dedup_key": a.dedup_key,
        "title": alert_title(a),
        "alert": a.to_json(),
    }


def slack_payload(a: Alert) -> Dict[str, Any]:
    band = "n/a" if not a.band else f"[{_fmt(a.band[0])}, {_fmt(a.band[1])}]"
    details = (
        f"*observed* {_fmt(a.observed)}  *expected* {_fmt(a.expected)}  *band* {band}  "
        f"*phase* {a.phase or 'n/a'}  *tokens* {_fmt(a.tokens)}"
    )
    text = f"{SLACK_ICON.get(a.severity, '')} {alert_title(a)}"
    return {
        "text": f"{text}: {a.message}",
        "blocks": [
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": f"*{text}*\n{a.message}\n{details}"},
            }
        ],
    }


def pagerduty_payload(a: Alert, routing_key: str) -> Dict[str, Any]:
    details = {k: v for k, v in a.to_json().items() if v is not None}
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": a.dedup_key,
        "payload": {
            "summary": f"{alert_title(a)}: {a.message}"[:1024],  # PagerDuty's limit
            "source": a.run or "fineline_monitor",
            "severity": PD_SEVERITY[a.severity],
            "component": a.capability or "training",
            "group": a.task or "run",
            "class": a.rule,
            "custom_details": details,
        },
        "client": "fineline_monitor",
    }


class WebhookSink(Sink):
    """Sends alerts at or above `min_severity` to a webhook; everything else is ignored."""

    name = "webhook"

    def __init__(
        self,
        kind: str = "generic",
        *,
        url_env: str = "FINELINE_WEBHOOK_URL",
        key_env: str = "FINELINE_PAGERDUTY_ROUTING_KEY",
        min_severity: str = "warning",
        queue_size: int = 1000,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        timeout_s: float = 10.0,
        close_timeout_s: float = 15.0,
        host_allowlist: Optional[List[str]] = None,
    ):
        if kind not in ("generic", "slack", "pagerduty"):
            raise ValueError(f"webhook kind {kind!r}: allowed generic, slack, pagerduty")
        if min_severity not in SEVERITIES:
            raise ValueError(
                f"webhook min_severity {min_severity!r}: allowed {', '.join(SEVERITIES)}"
            )
        self.kind = kind
        self.url_env = url_env
        self.key_env = key_env
        self.min_severity = min_severity
        self.timeout_s = timeout_s
        self.close_timeout_s = close_timeout_s
        self.host_allowlist = list(host_allowlist or [])
        self._check_env()
        self.worker = BackgroundWorker(
            "webhook",
            self._deliver,
            queue_size=queue_size,
            max_retries=max_retries,
            backoff_s=backoff_s,
            redact=self.redact,
            no_retry=(PermanentDeliveryError,),
        )
        self.sent: "deque[str]" = deque(
            maxlen=1000
        )  # dedup keys delivered, for inspection (no secrets)

    @classmethod
    def from_config(cls, config: Any, out_dir: Path, run: str) -> "WebhookSink":
        sc = config.sinks
        return cls(
            sc.webhook_kind,
            url_env=sc.webhook_url_env,
            key_env=sc.pagerduty_key_env,
            min_severity=sc.webhook_min_severity,
            queue_size=min(sc.queue_size, 10000),
            host_allowlist=getattr(sc, "webhook_url_allowlist", None),
        )

    def __repr__(self) -> str:  # names of the variables only, never their values
        return (
            f"WebhookSink(kind={self.kind!r}, url_env={self.url_env!r}, key_env={self.key_env!r}, "
            f"min_severity={self.min_severity!r})"
        )

    # ---- secrets: read at use, never stored ------------------------------------------------
    def _url(self) -> str:
        url = os.environ.get(self.url_env, "").strip()
        if not url and self.kind == "pagerduty":
            return PAGERDUTY_EVENTS_URL
        return url

    def _key(self) -> str:
        return os.environ.get(self.key_env, "").strip()

    def _check_env(self) -> None:
        from fineline_monitor.core.config import ConfigError

        url = self._url()
        if not url:
            raise ConfigError(
                f"sinks.enabled has `webhook` but the environment variable `{self.url_env}` "
                f"(sinks.webhook_url_env) is empty; set it to the webhook URL"
            )
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(
                f"the URL in `{self.url_env}` must be http(s)://HOST/..., got a "
                f"{parsed.scheme or 'scheme-less'} URL"
            )
        if self.host_allowlist and parsed.hostname not in self.host_allowlist:
            raise ConfigError(
                f"the host of the URL in `{self.url_env}` is not in sinks.webhook_url_allowlist "
                f"({', '.join(self.host_allowlist)})"
            )
        if self.kind == "pagerduty" and not self._key():
            raise ConfigError(
                f"sinks.webhook_kind is `pagerduty` but the environment variable `{self.key_env}` "
                f"(sinks.pagerduty_key_env) is empty; set it to the Events API v2 routing key"
            )

    def redact(self, text: str) -> str:
        for secret, label in (
            (os.environ.get(self.url_env, "").strip(), f"<${self.url_env}>"),
            (self._key(), f"<${self.key_env}>"),
        ):
            if secret:
                text = text.replace(secret, label)
                # urllib may quote parts of the URL in its messages
                text = text.replace(urllib.parse.quote(secret, safe=""), label)
        return text

    # ---- delivery ---------------------------------------------------------------------------
    def payload(self, alert: Alert) -> Dict[str, Any]:
        if self.kind == "slack":
            return slack_payload(alert)
        if self.kind == "pagerduty":
            return pagerduty_payload(alert, self._key())
        return generic_payload(alert)

    def _deliver(self, alert: Alert) -> None:
        body = json.dumps(self.payload(alert)).encode()
        req = urllib.request.Request(
            self._url(),
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "fineline-monitor"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 - http(s) checked
                resp.read()
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500 and e.code not in (408, 429):
                raise PermanentDeliveryError(
                    f"HTTP {e.code} from the webhook (payload rejected)"
                ) from None
            raise RuntimeError(f"HTTP {e.code} from the webhook") from None
        except urllib.error.URLError as e:
            raise ConnectionError(f"webhook unreachable: {e.reason}") from None
        self.sent.append(alert.dedup_key)

    # ---- Sink interface -----------------------------------------------------------------------
    def log_alert(self, alert: Alert) -> None:
        if SEVERITIES.index(alert.severity) < SEVERITIES.index(self.min_severity):
            return
        self.worker.submit(alert)

    def flush(self) -> None:
        self.worker.flush(self.close_timeout_s)

    def close(self) -> None:
        self.worker.close(self.close_timeout_s)

    @property
    def stats(self) -> Dict[str, Any]:
        return self.worker.stats()
