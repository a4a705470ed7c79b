"""The exporter writes a sample for every family a Prometheus rule or a Grafana panel queries,
when its sinks are handed every kind of record (feed_everything). Whether a real run
produces those records is checked on the demo's own exposition, in
test_demo_short.py::test_every_queried_metric_has_samples_in_the_demo_exposition."""

from __future__ import annotations

from fineline_e2e_support import (
    dashboard_exprs,
    exposition_names,
    feed_everything,
    make_monitor,
    queried_metric_names,
    rule_exprs,
)


def test_queries_reference_fineline_metrics():
    names = queried_metric_names()
    assert len(rule_exprs()) == 8 and len(dashboard_exprs()) > 30
    # sanity: the extraction sees the metrics the issue names
    for n in (
        "fineline_alert_active",
        "fineline_last_step_timestamp_seconds",
        "fineline_capability_score",
        "fineline_expected_low",
        "fineline_expected_high",
        "fineline_probe_value",
        "fineline_phase",
    ):
        assert n in names, n


def test_the_exporter_writes_samples_for_every_queried_family(tmp_path):
    out = tmp_path / "out"
    monitor = make_monitor(out, "coverage", prometheus_mode="textfile")
    feed_everything(monitor)
    monitor.close()
    text = (out / "metrics.prom").read_text()
    exported = exposition_names(text)
    missing = sorted(n for n in queried_metric_names() if exported.get(n, 0) == 0)
    assert not missing, (
        f"queried by rules/dashboard but without samples in the exposition: {missing}"
    )
    # and the exposition parses as Prometheus text format
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name for f in text_string_to_metric_families(text)}
    assert "fineline_alert_active" in fams and 'run="coverage"' in text
