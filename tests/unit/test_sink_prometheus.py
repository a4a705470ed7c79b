"""Prometheus sink: names, labels, modes (http with port 0, textfile atomic, pushgateway)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from fineline_monitor import Alert, MonitorConfig, ProbeRound, TaskResult  # noqa: E402
from fineline_monitor.core.config import ConfigError  # noqa: E402
from fineline_monitor.sinks.prometheus import PrometheusSink, prom_name  # noqa: E402


def samples(text):
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def lab(**kw):
    return tuple(sorted(kw.items()))


def test_name_mapping():
    assert prom_name("train/loss") == ("fineline_train_loss", {})
    assert prom_name("train/tokens_per_s") == ("fineline_train_tokens_per_second", {})
    assert prom_name("optim/update_ratio") == ("fineline_optim_update_ratio", {"group": "all"})
    assert prom_name("optim/update_ratio/matrices") == (
        "fineline_optim_update_ratio",
        {"group": "matrices"},
    )
    assert prom_name("stability/attn_logit_max/7") == (
        "fineline_stability_attn_logit_max",
        {"layer": "7"},
    )
    assert prom_name("stability/act_rms/3") == ("fineline_stability_act_rms", {"layer": "3"})
    assert prom_name("optim/grad_rms/vectors") == ("fineline_optim_grad_rms", {"group": "vectors"})
    assert prom_name("some thing/odd-name") == ("fineline_some_thing_odd_name", {})


def test_snapshot_at_scrape_time_with_labels():
    reg = CollectorRegistry()
    s = PrometheusSink("r1", mode="http", registry=reg, port=0)
    try:
        s.start_run("r1", {"probe_every": 50}, {})
        s.log_metrics(
            10,
            1000,
            {"train/loss": 2.5, "stability/attn_logit_max/0": 12.0, "train/lr": float("nan")},
        )
        s.log_probe(
            ProbeRound(
                step=10,
                tokens=1000,
                tasks={
                    "gsm8k": TaskResult(
                        "gsm8k", "math", 16, {"acc": 0.1, "bpb": 1.4}, {"acc": 0.07}
                    )
                },
                requests=[],
                seconds=2.0,
                tokens_scored=100,
                capability_scores={"math/bpb": 0.02},
            )
        )
        # the flat probe names the monitor also logs: the exporter takes probes from the round itself
        s.log_metrics(10, 1000, {"probe/gsm8k/acc": 0.125, "capability/math/bpb": 0.03})
        s.log_expectations(
            10,
            [
                {"name": "capability/math/bpb", "expected": 0.04, "low": 0.01, "high": 0.07},
                {"name": "probe/gsm8k/acc", "expected": 0.12, "low": 0.05, "high": 0.2},
            ],
        )
        s.log_phase(10, 1000, "stable", "warmup")
        s.log_alert(
            Alert(
                "capability_regression",
                "critical",
                10,
                "m",
                run="r1",
                capability="math",
                task="gsm8k",
                metric="acc",
            )
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        got = samples(text)
        assert got[("fineline_train_loss", lab(run="r1"))] == 2.5
        assert got[("fineline_stability_attn_logit_max", lab(run="r1", layer="0"))] == 12.0
        assert (
            got[
                (
                    "fineline_probe_value",
                    lab(run="r1", capability="math", task="gsm8k", metric="acc"),
                )
            ]
            == 0.1
        )
        assert (
            got[
                (
                    "fineline_probe_stderr",
                    lab(run="r1", capability="math", task="gsm8k", metric="acc"),
                )
            ]
            == 0.07
        )
        assert (
            got[("fineline_capability_score", lab(run="r1", capability="math", series="bpb"))]
            == 0.02
        )
        assert not any(
            name.startswith(("fineline_probe_gsm8k", "fineline_capability_math")) for name, _ in got
        )
        assert (
            got[
                (
                    "fineline_expected_low",
                    lab(
                        run="r1",
                        name="capability/math/bpb",
                        capability="math",
                        task="",
                        metric="bpb",
                    ),
                )
            ]
            == 0.01
        )
        assert (
            got[
                (
                    "fineline_expected_high",
                    lab(
                        run="r1",
                        name="probe/gsm8k/acc",
                        capability="math",
                        task="gsm8k",
                        metric="acc",
                    ),
                )
            ]
            == 0.2
        )
        assert got[("fineline_phase", lab(run="r1", phase="stable"))] == 1.0
        assert got[("fineline_phase", lab(run="r1", phase="warmup"))] == 0.0
        assert (
            got[
                (
                    "fineline_alert_active",
                    lab(
                        run="r1",
                        rule="capability_regression",
                        severity="critical",
                        capability="math",
                        task="gsm8k",
                        metric="acc",
                    ),
                )
            ]
            == 1.0
        )
        assert (
            got[
                (
                    "fineline_alerts_total",
                    lab(run="r1", rule="capability_regression", severity="critical"),
                )
            ]
            == 1
        )
        assert got[("fineline_probe_every_steps", lab(run="r1"))] == 50
        assert abs(got[("fineline_last_step_timestamp_seconds", lab(run="r1"))] - time.time()) < 60
        assert (
            got[("fineline_train_lr", lab(run="r1"))] != got[("fineline_train_lr", lab(run="r1"))]
        )  # NaN kept
    finally:
        s.close()
    # the port is released on close
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", s.port)) != 0


def test_alert_resolves_after_hold_time():
    s = PrometheusSink("r", mode="http", registry=CollectorRegistry(), port=0, alert_hold_s=0.3)
    try:
        s.log_alert(Alert("nonfinite_loss", "critical", 1, "nan"))
        key = (
            "fineline_alert_active",
            lab(
                run="r",
                rule="nonfinite_loss",
                severity="critical",
                capability="",
                task="",
                metric="",
            ),
        )
        assert samples(s.exposition())[key] == 1.0
        time.sleep(0.4)
        assert samples(s.exposition())[key] == 0.0
    finally:
        s.close()


def test_textfile_mode_from_config_is_atomic_and_final(tmp_path):
    cfg = MonitorConfig(sinks={"enabled": ["prometheus"], "prometheus_mode": "textfile"})
    s = PrometheusSink.from_config(cfg, out_dir=tmp_path, run="tf")
    assert s.textfile == tmp_path / "metrics.prom" and s.port is None
    for step in range(200):
        s.log_metrics(step, step * 10, {"train/loss": 1.0 / (step + 1)})
    s.flush()
    assert 'fineline_train_loss{run="tf"}' in (tmp_path / "metrics.prom").read_text()
    s.close()
    got = samples((tmp_path / "metrics.prom").read_text())
    assert got[("fineline_last_step", lab(run="tf"))] == 199
    assert got[("fineline_run_finished", lab(run="tf"))] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.prom"]  # no temp files left behind


def test_log_metrics_is_cheap(tmp_path):
    """The training thread only records numbers; formatting happens at scrape/write time."""
    s = PrometheusSink(
        "perf", mode="textfile", textfile=tmp_path / "m.prom", registry=CollectorRegistry()
    )
    m = {f"stability/act_rms/{i}": 1.0 for i in range(48)}
    m.update({"train/loss": 1.0, "optim/grad_norm": 1.0})
    t0 = time.perf_counter()
    for step in range(1000):
        s.log_metrics(step, step, m)
    per_call = (time.perf_counter() - t0) / 1000
    s.close()
    assert per_call < 2e-3, f"log_metrics took {per_call * 1e6:.0f} us per call"


def test_pushgateway_mode_needs_env(monkeypatch, tmp_path):
    monkeypatch.delenv("FINELINE_PUSHGATEWAY_URL", raising=False)
    cfg = MonitorConfig(sinks={"enabled": ["prometheus"], "prometheus_mode": "pushgateway"})
    with pytest.raises(ConfigError, match="FINELINE_PUSHGATEWAY_URL"):
        PrometheusSink.from_config(cfg, out_dir=tmp_path, run="pg")


PUSHGATEWAY = "/usr/bin/prometheus-pushgateway"


@pytest.mark.e2e
def test_pushgateway_mode_pushes_to_a_real_pushgateway(monkeypatch, tmp_path):
    if not os.path.exists(PUSHGATEWAY):
        pytest.skip(f"{PUSHGATEWAY} not installed (Debian package prometheus-pushgateway)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = subprocess.Popen(
        [PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(url + "/-/ready", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "pushgateway did not start"
                time.sleep(0.2)
        monkeypatch.setenv("FINELINE_PUSHGATEWAY_URL", url)
        cfg = MonitorConfig(sinks={"enabled": ["prometheus"], "prometheus_mode": "pushgateway"})
        s = PrometheusSink.from_config(cfg, out_dir=tmp_path, run="pg-run")
        # the URL (it may carry credentials) is read from the environment at each push,
        # never kept on the sink (README: secrets are read when used)
        assert url not in repr(vars(s)) and url not in repr(vars(s._worker))
        s.log_metrics(5, 50, {"train/loss": 3.25})
        s.log_alert(Alert("loss_spike", "warning", 5, "spike"))
        s.close()
        text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        assert 'fineline_train_loss{instance="",job="fineline",run="pg-run"} 3.25' in text
        assert 'rule="loss_spike"' in text
    finally:
        p.terminate()
        p.wait(10)
