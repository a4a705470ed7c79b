"""MonitorConfig: typed, validated, loads from YAML, and says what was meant."""

import pytest

from fineline_monitor import ConfigError, MonitorConfig
from fineline_monitor.core.config import reference_markdown


def test_defaults_are_valid_and_round_trip_through_dict():
    cfg = MonitorConfig()
    again = MonitorConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError) as e:
        MonitorConfig(probe_evry=10)
    msg = str(e.value)
    assert "probe_evry" in msg and "did you mean `probe_every`" in msg and "allowed:" in msg


def test_unknown_nested_key_in_dict_section():
    with pytest.raises(ConfigError, match=r"probes\.batch_sise.*did you mean `batch_size`"):
        MonitorConfig(probes={"batch_sise": 4})


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"probe_every": -1}, "`probe_every` got -1; must be >= 0"),
        ({"probe_every": "often"}, "`probe_every` must be an integer, got 'often'"),
        ({"strict": "yes"}, "`strict` must be true or false"),
        ({"probes": {"docs_per_task": 0}}, "`probes.docs_per_task` got 0; must be >= 1"),
        ({"sinks": {"enabled": ["store", "wandbb"]}}, "did you mean `wandb`"),
        ({"sinks": {"prometheus_port": 70000}}, "must be <= 65535"),
        ({"alerts": {"on_critical": ["reboot"]}}, "allowed: checkpoint, stop"),
        ({"alerts": {"phases": ["warmup@x"]}}, "PHASE@STEP"),
        ({"alerts": {"attn_logit_warning": 10.0, "attn_logit_critical": 5.0}}, "must be >="),
    ],
)
def test_bad_values_name_key_value_and_allowed(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        MonitorConfig(**kwargs)
    assert needle in str(e.value)


def test_probe_every_zero_turns_probes_off():
    from fineline_monitor.core.cadence import should_probe

    assert not any(should_probe(s, every=0, first_step=0) for s in range(100))


def test_yaml_loads_and_errors_name_file_and_line(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(
        "probe_every: 200\nprobes:\n  tasks: [hellaswag_rc, arc_easy_rc]\n  docs_per_task: 50\n"
        "sinks:\n  enabled: [store]\n"
    )
    cfg = MonitorConfig.from_yaml(good)
    assert (
        cfg.probe_every == 200 and cfg.probes.docs_per_task == 50 and cfg.sinks.enabled == ["store"]
    )

    bad = tmp_path / "bad.yaml"
    bad.write_text("probe_every: 200\nprobes:\n  docs_per_task: 50\n  batchsize: 4\n")
    with pytest.raises(ConfigError) as e:
        MonitorConfig.from_yaml(bad)
    assert f"{bad}:4" in str(e.value) and "did you mean `batch_size`" in str(e.value)

    broken = tmp_path / "broken.yaml"
    broken.write_text("probe_every: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+: not valid YAML"):
        MonitorConfig.from_yaml(broken)

    with pytest.raises(ConfigError, match="cannot read config"):
        MonitorConfig.from_yaml(tmp_path / "missing.yaml")


def test_wrong_type_in_yaml_names_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run_name: x\nindicators:\n  collect_every: 2.5\n")
    with pytest.raises(
        ConfigError, match=r"c\.yaml:3: `indicators\.collect_every` must be an integer"
    ):
        MonitorConfig.from_yaml(p)


def test_reference_table_lists_every_field():
    table = reference_markdown()
    for key in (
        "probe_every",
        "probes.docs_per_task",
        "alerts.hysteresis",
        "sinks.prometheus_port",
        "indicators.collect_every",
    ):
        assert f"`{key}`" in table


def test_config_reference_page_is_current(repo_root):
    """docs/configuration.md's option table is `fineline-monitor config-reference`; regenerate
    it with `python scripts/render_docs.py` when a field changes (this test names the drift)."""
    page = (repo_root / "docs" / "configuration.md").read_text()
    assert reference_markdown() in page, (
        "docs/configuration.md is stale: run `python scripts/render_docs.py`"
    )


def test_a_config_changed_after_construction_is_checked_at_attach(tmp_path):
    from fineline_monitor import FineLineMonitor

    cfg = MonitorConfig(out_dir=str(tmp_path), sinks={"enabled": ["store"]})
    cfg.probe_every = -5
    with pytest.raises(ConfigError, match="`probe_every` got -5; must be >= 0"):
        FineLineMonitor(config=cfg, sinks=[])
