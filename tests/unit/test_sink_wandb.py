"""W&B sink in offline mode (no account): what lands in the run's transaction log.

The offline run file (.wandb, LevelDB-log framing of protobuf Records) is decoded with
wandb's own protobuf classes, so the test sees exactly what `wandb sync` would upload.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")

from fineline_monitor import Alert, MonitorConfig, ProbeRound, TaskResult  # noqa: E402
from fineline_monitor.sinks.wandb_sink import WandbSink, wandb_key  # noqa: E402


def read_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk = data[pos : pos + n]
        pos += n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r)
    return out


def test_wandb_key_groups_probes_by_capability():
    assert wandb_key("probe/gsm8k/acc", {"gsm8k": "math"}) == "probe_math/gsm8k/acc"
    assert wandb_key("probe/mine/acc", {}) == "probe_other/mine/acc"
    assert wandb_key("train/loss", {}) == "train/loss"


@pytest.mark.timeout(180)
def test_offline_run_has_axes_metrics_config_and_no_alerts(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = MonitorConfig(run_name="wb-test", sinks={"enabled": ["wandb"]})
    s = WandbSink.from_config(cfg, out_dir=tmp_path, run="wb-test")
    s.start_run("wb-test", cfg.to_dict(), {"params": 1234})
    for step in range(0, 30, 10):
        s.log_metrics(
            step,
            step * 100,
            {"train/loss": 3.0 - step / 100, "train/tokens": step * 100, "optim/grad_norm": 1.0},
        )
    r = ProbeRound(
        step=20,
        tokens=2000,
        tasks={"gsm8k": TaskResult("gsm8k", "math", 8, {"acc": 0.25}, {"acc": 0.1})},
        requests=[],
        seconds=1.0,
        tokens_scored=10,
        capability_scores={"math": 0.05},
    )
    s.log_probe(r)
    s.log_metrics(20, 2000, {"probe/gsm8k/acc": 0.25, "capability/math": 0.05})
    s.log_expectations(
        20, [{"name": "capability/math", "expected": 0.06, "low": 0.01, "high": 0.1}]
    )
    s.log_phase(20, 2000, "stable", "warmup")
    s.log_alert(
        Alert(
            "capability_regression", "critical", 20, "math fell", run="wb-test", capability="math"
        )
    )
    s.close()
    assert s.stats["failed"] == 0 and s.stats["dropped"] == 0
    assert s.writer.alerts_not_sent == 1 and s.writer.alerts_sent == 0  # offline: no wandb.alert

    files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    # wandb-core writes the transaction log asynchronously; finish() may return before the
    # last records hit the disk on a loaded machine. Wait (bounded) for the exit record.
    deadline = time.monotonic() + 60
    while True:
        recs = read_records(files[0])
        kinds = [r.WhichOneof("record_type") for r in recs]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    metric_defs = {
        (m.metric.name or m.metric.glob_name): m.metric.step_metric
        for m in recs
        if m.HasField("metric")
    }
    assert "train/tokens" in metric_defs and "train/step" in metric_defs
    assert metric_defs["*"] == "train/tokens"
    keys = set()
    for r in recs:
        if r.HasField("history"):
            keys.update("/".join(i.nested_key) or i.key for i in r.history.item)
    for k in (
        "train/loss",
        "train/tokens",
        "train/step",
        "probe_math/gsm8k/acc",
        "probe_math/gsm8k/acc_stderr",
        "capability/math",
        "capability/math_low",
        "capability/math_high",
        "train/phase_index",
        "alerts/critical",
    ):
        assert k in keys, (k, sorted(keys))
    run_rec = next(r for r in recs if r.HasField("run"))
    cfg_items = {i.key: i.value_json for i in run_rec.run.config.update}
    assert json.loads(cfg_items["fineline"])["run_name"] == "wb-test"
    assert "exit" in kinds


def test_init_failure_disables_quietly(tmp_path, monkeypatch, caplog):
    """Online with no credentials: wandb.init fails on the worker thread, the sink says so once
    and turns into a no-op; the caller never sees an exception."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    s = WandbSink(mode="online", out_dir=tmp_path, close_timeout_s=30)
    s.start_run("x", {}, {})
    s.log_metrics(1, 1, {"train/loss": 1.0})
    s.close()
    assert s.writer._disabled
    assert "W&B sink disabled" in caplog.text
