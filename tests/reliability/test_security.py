"""Security: loopback by default, secrets never leave the environment, probe data is data.

- The Prometheus exporter's socket is bound to 127.0.0.1 unless `sinks.prometheus_host` says
  otherwise (checked on the real listening socket).
- Webhook URLs and PagerDuty keys come from environment variables; the secret never shows in
  logs, exception messages, repr/config dumps, the run store (run.db and its WAL, as bytes)
  or alerts.jsonl, in success and in failure paths.
- Nothing from probe data is executed: code-task continuations are scored by likelihood only
  (a requests file whose continuation is a shell-out leaves no file behind), the probes package
  has no eval/exec/subprocess/pickle-load of anything, and a poisoned task cache is not run.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pickle
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fineline_monitor import FineLineMonitor, MonitorConfig
from fineline_monitor.core.config import ConfigError
from fineline_monitor.core.types import Alert

from .conftest import tiny_gpt2

AREA = "security"
PKG = Path(__file__).resolve().parents[2] / "fineline_monitor"
pytestmark = pytest.mark.timeout(120)


def _cfg(tmp_path, **sinks):
    return MonitorConfig(
        run_name="sec",
        out_dir=str(tmp_path / "out"),
        probe_every=0,
        indicators={"collect_every": 1},
        sinks=sinks,
    )


def _prom_sink(mon):
    return next(s for s in mon.sinks if getattr(s, "name", "") == "prometheus")


def test_exporter_binds_loopback_by_default(tmp_path, fault_table):
    pytest.importorskip("prometheus_client")
    assert MonitorConfig().sinks.prometheus_host == "127.0.0.1"
    mon = FineLineMonitor(config=_cfg(tmp_path, enabled=["store", "prometheus"], prometheus_port=0))
    try:
        sink = _prom_sink(mon)
        host, port = sink._server.socket.getsockname()[:2]
        assert host == "127.0.0.1", host
        # It really serves there.
        mon.step(step=0, loss=1.0, tokens=0, lr=1e-3)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "fineline" in body
        # The kernel's view agrees: the only listener on that port is 127.0.0.1 (0100007F).
        listeners = [
            line.split()[1]
            for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
            if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port
        ]
        assert listeners == [f"0100007F:{port:04X}"], listeners
    finally:
        mon.close()
    fault_table.record(
        AREA,
        "Prometheus exporter with default config",
        "socket bound to 127.0.0.1 only",
        injected=0,
        survived=0,
    )


def test_exporter_binds_where_configured(tmp_path):
    pytest.importorskip("prometheus_client")
    mon = FineLineMonitor(
        config=_cfg(tmp_path, enabled=["prometheus"], prometheus_port=0, prometheus_host="0.0.0.0")
    )
    try:
        assert _prom_sink(mon)._server.socket.getsockname()[0] == "0.0.0.0"
    finally:
        mon.close()


# ---- secrets --------------------------------------------------------------------------------------


class _Receiver:
    """Webhook endpoint on loopback that answers with a fixed status."""

    def __init__(self, status: int):
        self.bodies = []
        bodies = self.bodies

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _all_bytes(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())


@pytest.mark.parametrize("status", [200, 500, 403])
def test_webhook_secrets_never_leak(tmp_path, monkeypatch, caplog, status, fault_table):
    url_secret, key_secret = "hooks-T0KEN-9f8e7d6c", "pd-ROUTING-KEY-5a4b3c"
    rx = _Receiver(status)
    monkeypatch.setenv("FINELINE_WEBHOOK_URL", f"http://127.0.0.1:{rx.port}/services/{url_secret}")
    monkeypatch.setenv("FINELINE_PAGERDUTY_ROUTING_KEY", key_secret)
    cfg = _cfg(tmp_path, enabled=["store", "console", "webhook"], webhook_kind="pagerduty")
    with caplog.at_level(logging.DEBUG):
        mon = FineLineMonitor(config=cfg)
        hook = next(s for s in mon.sinks if getattr(s, "name", "") == "webhook")
        hook.worker.backoff_s = 0.01  # keep retries of the 500 case short
        for step in range(4):
            mon.step(step=step, loss=1.0, tokens=step, lr=1e-3)
        mon._handle_alerts(
            [Alert(rule="nonfinite", severity="critical", step=3, message="loss is NaN")]
        )
        mon.close()
    rx.close()
    assert rx.bodies, "the webhook was never called"
    # The key goes where it must (the PagerDuty event) and nowhere else.
    assert key_secret in json.loads(rx.bodies[0])["routing_key"]
    texts = [
        "\n".join(r.getMessage() for r in caplog.records),
        "\n".join(str(r.exc_info) for r in caplog.records),
        repr(hook),
        str(hook.stats),
        repr(cfg),
        json.dumps(cfg.to_dict()),
        repr(mon.disabled_parts),
    ]
    blob = "\n".join(texts).encode() + _all_bytes(Path(cfg.out_dir))
    for secret in (url_secret, key_secret):
        assert secret.encode() not in blob, f"secret {secret[:6]}... leaked (HTTP {status} case)"
    if status != 200:
        assert hook.stats["last_error"], "the failure was not recorded"
    fault_table.record(
        AREA,
        "webhook URL / PagerDuty key in env; endpoint answers 200, 500, 403",
        "secret absent from logs, errors, repr, config dump, run.db+WAL, alerts.jsonl",
        injected=1,
        survived=1,
    )


@pytest.mark.parametrize(
    "bad_url", ["ftp://user:{s}@example.org/x", "http://evil.example/{s}", "not a url {s}"]
)
def test_webhook_config_errors_do_not_echo_the_secret(
    tmp_path, monkeypatch, caplog, bad_url, fault_table
):
    secret = "Sekr1t-abc123-XYZ"
    monkeypatch.setenv("FINELINE_WEBHOOK_URL", bad_url.format(s=secret))
    cfg = _cfg(tmp_path, enabled=["store", "webhook"], webhook_url_allowlist=["hooks.example.com"])
    # Bad configuration fails at attach time, naming the env var.
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigError) as ei:
        FineLineMonitor(config=cfg)
    assert "FINELINE_WEBHOOK_URL" in str(ei.value)
    text = "\n".join(r.getMessage() for r in caplog.records) + str(ei.value) + repr(ei.value)
    assert secret not in text, text[-2000:]
    strict = MonitorConfig(
        run_name="sec",
        out_dir=str(tmp_path / "out2"),
        probe_every=0,
        strict=True,
        sinks={"enabled": ["webhook"], "webhook_url_allowlist": ["hooks.example.com"]},
    )
    with pytest.raises(Exception) as ei:  # strict mode raises the attach-time error itself
        FineLineMonitor(config=strict)
    assert secret not in str(ei.value) and secret not in repr(ei.value)
    fault_table.record(
        AREA,
        "malformed / foreign-host webhook URL holding a secret",
        "attach-time error names the env var, never its value (log, exception)",
        bad_inputs=1,
    )


# ---- probe data is data ----------------------------------------------------------------------------


def test_code_continuations_are_scored_not_run(tmp_path, tiny_tokenizer, fault_table):
    marker = tmp_path / "pwned"
    payloads = [
        f"__import__('os').system('touch {marker}')",
        f"exec(\"open('{marker}', 'w').write('x')\")",
        f"\n    import subprocess; subprocess.run(['touch', '{marker}'])\n",
    ]
    req = tmp_path / "evil_code.jsonl"
    with open(req, "w") as f:
        for doc_id, p in enumerate(payloads):
            for idx, cont in enumerate([p, " return a + b"]):
                f.write(
                    json.dumps(
                        {
                            "doc_id": doc_id,
                            "idx": idx,
                            "label": 0,
                            "task_name": "codex_evil",
                            "capability": "code",
                            "request": {
                                "context": f"def solve():\n    # {p}\n",
                                "continuation": cont,
                            },
                        }
                    )
                    + "\n"
                )
    model = tiny_gpt2(len(tiny_tokenizer), n_positions=256)
    cfg = MonitorConfig(
        run_name="sec",
        out_dir=str(tmp_path / "out"),
        probe_every=1,
        strict=True,
        probes={"tasks": [], "requests_files": [str(req)], "docs_per_task": 10},
        sinks={"enabled": ["store"]},
    )
    mon = FineLineMonitor(model=model, config=cfg, tokenizer=tiny_tokenizer)
    round_ = mon.probe_now(step=0, tokens=0)
    mon.close()
    assert round_ is not None and round_.tasks["codex_evil"].n_docs == 3
    assert all(q.logprob < 0 for q in round_.requests)  # scored by likelihood
    assert not marker.exists(), "a probe continuation was executed"
    fault_table.record(
        AREA,
        "code-task requests whose text shells out (os.system, exec, subprocess)",
        "scored by likelihood only; no file created",
        injected=len(payloads),
        survived=len(payloads),
    )


PICKLE_BUG = (
    "probes/tasks.py load_task: the parsed-task cache is a pickle in ~/.cache/fineline_monitor or "
    "$FINELINE_CACHE_DIR; pickle.load runs code from whoever can write there (shared file systems). "
    "Fix (issue 3 owner): cache as JSON, or drop the disk cache."
)


DANGEROUS_CALLS = {
    "eval",
    "exec",
    "compile",
    "__import__",
    "system",
    "popen",
    "load",
    "loads",
    "Popen",
    "run",
    "call",
    "check_output",
    "spawn",
}
DANGEROUS_MODULES = {"subprocess", "pickle", "marshal", "shelve", "dill", "cloudpickle"}


def _findings(path: Path):
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + (
                [node.module] if isinstance(node, ast.ImportFrom) else []
            )
            for n in names:
                if n and n.split(".")[0] in DANGEROUS_MODULES:
                    out.append(f"{path.name}:{node.lineno}: import {n}")
        if isinstance(node, ast.Call):
            f = node.func
            name = (
                f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            )
            base = (
                f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            )
            if name in ("eval", "exec", "compile", "__import__") and isinstance(f, ast.Name):
                out.append(f"{path.name}:{node.lineno}: {name}()")
            elif base in ("os", "subprocess", "pickle", "marshal") and name in DANGEROUS_CALLS:
                out.append(f"{path.name}:{node.lineno}: {base}.{name}()")
            elif base == "yaml" and name in ("load", "unsafe_load", "full_load"):
                out.append(f"{path.name}:{node.lineno}: yaml.{name}()")
    return out


def test_probe_and_parser_code_never_executes_data():
    """No eval/exec/subprocess/pickle on anything in the code that reads probe data, configs,
    trajectories or alerts (an AST scan, so comments and `model.eval()` do not count)."""
    files = sorted((PKG / "probes").glob("*.py")) + [
        PKG / "core" / n for n in ("config.py", "trajectory.py", "store.py", "types.py")
    ]
    found = [f for p in files if p.exists() for f in _findings(p)]
    assert not found, "code that could execute data:\n" + "\n".join(found)


def test_poisoned_task_cache_is_not_executed(tmp_path, monkeypatch, fault_table):
    """The parsed-task cache lives in ~/.cache or $FINELINE_CACHE_DIR, often a shared file
    system: whoever can write there must not get code run in every training process."""
    from fineline_monitor.probes import tasks

    monkeypatch.setenv("FINELINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tasks, "_MEM_CACHE", {})
    name = "arc_easy"
    try:
        tasks.load_task(name)
    except tasks.TaskError as e:
        pytest.skip(f"registry task unavailable: {e}")
    cached = list((tmp_path / "cache").rglob("*"))
    cached = [p for p in cached if p.is_file()]
    assert cached, (
        "load_task wrote no on-disk cache: this test poisons that cache and has nothing to poison"
    )
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for p in cached:
        p.write_bytes(pickle.dumps(Evil()))
    monkeypatch.setattr(tasks, "_MEM_CACHE", {})
    try:
        tasks.load_task(name)
    except Exception:  # noqa: BLE001 - rejecting the file is fine; running it is not
        pass
    assert not marker.exists(), (
        "a poisoned task cache file was executed (pickle.load on a shared cache dir)"
    )
    fault_table.record(
        AREA,
        "poisoned on-disk task cache (a pickle that shells out)",
        "not executed",
        injected=1,
        survived=1,
    )
