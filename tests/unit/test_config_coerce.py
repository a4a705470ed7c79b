"""`MonitorConfig.coerce`: what the monitor and every adapter accept as `config=`."""

from pathlib import Path

import pytest

from fineline_monitor import ConfigError, MonitorConfig


def test_coerce_accepts_none_dict_yaml_and_a_config(tmp_path):
    assert MonitorConfig.coerce(None) == MonitorConfig()
    assert MonitorConfig.coerce({"probe_every": 7}).probe_every == 7
    (tmp_path / "c.yaml").write_text("probe_every: 9\nprobes:\n  batch_size: 4\n")
    for path in (tmp_path / "c.yaml", str(tmp_path / "c.yaml")):
        cfg = MonitorConfig.coerce(path)
        assert (cfg.probe_every, cfg.probes.batch_size) == (9, 4)
    same = MonitorConfig(probe_every=3)
    assert MonitorConfig.coerce(same) is same


def test_coerce_checks_a_config_again_and_rejects_other_types():
    cfg = MonitorConfig()
    cfg.probe_every = -5  # assigned after construction: not checked until coerced
    with pytest.raises(ConfigError, match="probe_every"):
        MonitorConfig.coerce(cfg)
    with pytest.raises(TypeError, match="MonitorConfig, a dict or a YAML path, got list"):
        MonitorConfig.coerce([("probe_every", 3)])
    with pytest.raises(ConfigError, match="cannot read config"):
        MonitorConfig.coerce(Path("/nonexistent/fineline.yaml"))
