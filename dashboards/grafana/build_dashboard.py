"""Generates dashboards/grafana/fineline.json (Grafana 10+ dashboard for the FineLine exporter).

The JSON is the artifact to import; this script is its source, so panels stay consistent
(one helper per panel kind) and reviewable. Regenerate with:

    python dashboards/grafana/build_dashboard.py

Every `fineline_*` name a query uses must be a family registered in
fineline_monitor/metric_names.py: `build()` refuses any other (and
tests/e2e/test_dashboard_metrics.py checks every name against an exposition produced by
a real monitor run).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from fineline_monitor.metric_names import prometheus_sample_names

DS = {"type": "prometheus", "uid": "${datasource}"}
R = 'run=~"$run"'
_id = 0
_y = 0


def _next_id() -> int:
    global _id
    _id += 1
    return _id


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> Dict[str, Any]:
    t = {
        "datasource": DS,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "refId": ref,
        "range": not instant,
        "instant": instant,
    }
    return t


def timeseries(
    title: str,
    targets: List[Dict[str, Any]],
    x: int,
    y: int,
    w: int = 8,
    h: int = 8,
    *,
    unit: str = "short",
    log: bool = False,
    overrides: Optional[list] = None,
    description: str = "",
    repeat: Optional[str] = None,
) -> Dict[str, Any]:
    p = {
        "id": _next_id(),
        "type": "timeseries",
        "title": title,
        "datasource": DS,
        "description": description,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": targets,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {
                    "drawStyle": "line",
                    "lineWidth": 2,
                    "showPoints": "auto",
                    "spanNulls": True,
                    "scaleDistribution": {"type": "log", "log": 10} if log else {"type": "linear"},
                },
            },
            "overrides": overrides or [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom"},
            "tooltip": {"mode": "multi"},
        },
    }
    if repeat:
        p["repeat"] = repeat
        p["repeatDirection"] = "h"
        p["maxPerRow"] = 3
    return p


def band_overrides(low: str, high: str, expected: str) -> list:
    """Shade between the expected band's low and high series; expected as a dashed line."""
    return [
        {
            "matcher": {"id": "byName", "options": high},
            "properties": [
                {"id": "custom.fillBelowTo", "value": low},
                {"id": "custom.lineWidth", "value": 0},
                {"id": "color", "value": {"mode": "fixed", "fixedColor": "rgba(120,120,120,0.35)"}},
                {
                    "id": "custom.hideFrom",
                    "value": {"legend": True, "tooltip": False, "viz": False},
                },
            ],
        },
        {
            "matcher": {"id": "byName", "options": low},
            "properties": [
                {"id": "custom.lineWidth", "value": 0},
                {"id": "color", "value": {"mode": "fixed", "fixedColor": "rgba(120,120,120,0.35)"}},
                {
                    "id": "custom.hideFrom",
                    "value": {"legend": True, "tooltip": False, "viz": False},
                },
            ],
        },
        {
            "matcher": {"id": "byName", "options": expected},
            "properties": [
                {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [8, 6]}},
                {"id": "color", "value": {"mode": "fixed", "fixedColor": "gray"}},
            ],
        },
    ]


def stat(
    title: str,
    expr: str,
    x: int,
    y: int,
    w: int = 4,
    h: int = 4,
    *,
    unit: str = "short",
    thresholds: Optional[list] = None,
    description: str = "",
) -> Dict[str, Any]:
    return {
        "id": _next_id(),
        "type": "stat",
        "title": title,
        "datasource": DS,
        "description": description,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [target(expr, instant=True)],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "thresholds": {
                    "mode": "absolute",
                    "steps": thresholds
                    or [{"color": "green", "value": None}, {"color": "red", "value": 1}],
                },
            },
            "overrides": [],
        },
        "options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background"},
    }


def row(title: str, y: int) -> Dict[str, Any]:
    return {
        "id": _next_id(),
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
        "panels": [],
    }


def build() -> Dict[str, Any]:
    panels: List[Dict[str, Any]] = []
    y = 0
    # ---- alerts and liveness ---------------------------------------------------------------
    panels.append(row("Alerts and liveness", y))
    y += 1
    panels.append(
        stat(
            "Active critical alerts",
            f'sum(fineline_alert_active{{{R},severity="critical"}}) or vector(0)',
            0,
            y,
            description="Monitor alerts at critical severity (these page).",
        )
    )
    panels.append(
        stat(
            "Active warnings",
            f'sum(fineline_alert_active{{{R},severity="warning"}}) or vector(0)',
            4,
            y,
            thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 1}],
        )
    )
    panels.append(
        stat(
            "Seconds since last step",
            f"time() - max(fineline_last_step_timestamp_seconds{{{R}}})",
            8,
            y,
            unit="s",
            thresholds=[
                {"color": "green", "value": None},
                {"color": "orange", "value": 300},
                {"color": "red", "value": 900},
            ],
        )
    )
    panels.append(
        stat(
            "Last step",
            f"max(fineline_last_step{{{R}}})",
            12,
            y,
            thresholds=[{"color": "blue", "value": None}],
        )
    )
    panels.append(
        stat(
            "Monitor internal errors",
            f"sum(fineline_internal_errors_total{{{R}}})",
            16,
            y,
            thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 1}],
        )
    )
    panels.append(
        stat(
            "Exporter up",
            'min(up{job=~"fineline.*"})',
            20,
            y,
            thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}],
        )
    )
    y += 4
    panels.append(
        {
            "id": _next_id(),
            "type": "table",
            "title": "Active monitor alerts",
            "datasource": DS,
            "gridPos": {"x": 0, "y": y, "w": 14, "h": 7},
            "targets": [target(f"fineline_alert_active{{{R}}} == 1", instant=True)],
            "transformations": [
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {
                            "Time": True,
                            "__name__": True,
                            "Value": True,
                            "job": True,
                            "instance": True,
                        },
                        "indexByName": {
                            "run": 0,
                            "severity": 1,
                            "rule": 2,
                            "capability": 3,
                            "task": 4,
                            "metric": 5,
                        },
                    },
                }
            ],
            "options": {"showHeader": True},
            "fieldConfig": {"defaults": {}, "overrides": []},
        }
    )
    panels.append(
        {
            "id": _next_id(),
            "type": "state-timeline",
            "title": "Training phase",
            "datasource": DS,
            "gridPos": {"x": 14, "y": y, "w": 10, "h": 7},
            "targets": [target(f"fineline_phase{{{R}}} == 1", "{{run}} {{phase}}")],
            "fieldConfig": {"defaults": {}, "overrides": []},
            "options": {"showValue": "never", "mergeValues": True},
        }
    )
    y += 7
    # ---- capabilities ------------------------------------------------------------------------
    panels.append(row("Capabilities (expected band shaded, expected value dashed)", y))
    y += 1
    cap = 'capability=~"$capability"'
    panels.append(
        timeseries(
            "Capability bits per byte: $capability (lower is better)",
            [
                target(f'fineline_capability_score{{{R},{cap},series="bpb"}}', "{{run}} bpb"),
                target(f'fineline_expected_low{{{R},{cap},task="",metric="bpb"}}', "low", "B"),
                target(f'fineline_expected_high{{{R},{cap},task="",metric="bpb"}}', "high", "C"),
                target(
                    f'fineline_expected_value{{{R},{cap},task="",metric="bpb"}}', "expected", "D"
                ),
            ],
            0,
            y,
            8,
            8,
            repeat="capability",
            overrides=band_overrides("low", "high", "expected"),
            description="Gold-continuation bits per byte, mean over the capability's tasks, with the band "
            "expected for the current phase (from the reference ladder where there is one).",
        )
    )
    y += 8
    panels.append(
        timeseries(
            "Probe accuracy per task ($capability)",
            [
                target(
                    f'fineline_probe_value{{{R},{cap},metric=~"acc|acc_norm"}}',
                    "{{task}} {{metric}}",
                ),
                target(
                    f'fineline_expected_low{{{R},{cap},metric=~"acc|acc_norm",task!=""}}',
                    "{{task}} low",
                    "B",
                ),
                target(
                    f'fineline_expected_high{{{R},{cap},metric=~"acc|acc_norm",task!=""}}',
                    "{{task}} high",
                    "C",
                ),
            ],
            0,
            y,
            12,
            8,
            unit="percentunit",
        )
    )
    panels.append(
        timeseries(
            "Gold bits per byte per task ($capability)",
            [
                target(f'fineline_probe_value{{{R},{cap},metric="bpb"}}', "{{task}}"),
                target(
                    f'fineline_expected_low{{{R},{cap},metric="bpb",task!=""}}', "{{task}} low", "B"
                ),
                target(
                    f'fineline_expected_high{{{R},{cap},metric="bpb",task!=""}}',
                    "{{task}} high",
                    "C",
                ),
                target(
                    f'fineline_expected_value{{{R},{cap},metric="bpb",task!=""}}',
                    "{{task}} expected",
                    "D",
                ),
            ],
            12,
            y,
            12,
            8,
            description="Smooth long before accuracy takes off (OLMo in-loop evals); the expected "
            "value and band beside each task, from the reference ladder where there is one.",
        )
    )
    y += 8
    # ---- loss and indicators --------------------------------------------------------------
    panels.append(row("Loss and optimization-state indicators", y))
    y += 1
    panels.append(
        timeseries(
            "Training loss",
            [
                target(f"fineline_train_loss{{{R}}}", "{{run}}"),
                target(f"fineline_train_loss_z{{{R}}}", "{{run}} z-score", "B"),
            ],
            0,
            y,
            12,
            8,
            overrides=[
                {
                    "matcher": {"id": "byFrameRefID", "options": "B"},
                    "properties": [{"id": "custom.axisPlacement", "value": "right"}],
                }
            ],
        )
    )
    panels.append(
        timeseries("Learning rate", [target(f"fineline_train_lr{{{R}}}", "{{run}}")], 12, y, 6, 8)
    )
    panels.append(
        timeseries(
            "Tokens/s (training, probes)",
            [
                target(f"fineline_train_tokens_per_second{{{R}}}", "train {{run}}"),
                target(f"fineline_probe_tokens_per_second{{{R}}}", "probe {{run}}", "B"),
            ],
            18,
            y,
            6,
            8,
        )
    )
    y += 8
    panels.append(
        timeseries(
            "Gradient norm", [target(f"fineline_optim_grad_norm{{{R}}}", "{{run}}")], 0, y, log=True
        )
    )
    panels.append(
        timeseries(
            "Update / parameter ratio",
            [target(f"fineline_optim_update_ratio{{{R}}}", "{{run}} {{group}}")],
            8,
            y,
            log=True,
        )
    )
    panels.append(
        timeseries(
            "Parameter norm", [target(f"fineline_optim_param_norm{{{R}}}", "{{run}}")], 16, y
        )
    )
    y += 8
    panels.append(
        timeseries(
            "Max attention logit (warn 1e3, diverging 1e4)",
            [
                target(
                    f'fineline_stability_attn_logit_max{{{R},layer="all"}}', "{{run}} all layers"
                ),
                target(
                    f'topk(5, fineline_stability_attn_logit_max{{{R},layer!="all"}})',
                    "layer {{layer}}",
                    "B",
                ),
            ],
            0,
            y,
            log=True,
            description="Wortsman et al. 2023: attention logit growth precedes instability.",
        )
    )
    panels.append(
        timeseries(
            "Output logits",
            [
                target(
                    f"fineline_stability_output_logsumexp_mean{{{R}}}", "{{run}} mean log-partition"
                ),
                target(f"fineline_stability_output_logit_max{{{R}}}", "{{run}} max logit", "B"),
            ],
            8,
            y,
        )
    )
    panels.append(
        timeseries(
            "Grad RMS / Adam eps (min over groups)",
            [
                target(f"fineline_optim_grad_rms_over_eps_min{{{R}}}", "{{run}}"),
                target(f"fineline_optim_grad_rms{{{R}}}", "{{group}} grad RMS", "B"),
            ],
            16,
            y,
            log=True,
        )
    )
    y += 8
    panels.append(
        timeseries(
            "Activation RMS per layer",
            [target(f"fineline_stability_act_rms{{{R}}}", "layer {{layer}}")],
            0,
            y,
            log=True,
        )
    )
    panels.append(
        timeseries(
            "Non-finite losses / gradients, skipped steps",
            [
                target(f"fineline_optim_nonfinite_loss{{{R}}}", "{{run}} non-finite loss"),
                target(f"fineline_optim_nonfinite_grad{{{R}}}", "{{run}} non-finite grad", "B"),
                target(f"fineline_optim_skipped_steps{{{R}}}", "{{run}} skipped steps", "C"),
            ],
            8,
            y,
        )
    )
    panels.append(
        timeseries(
            "Loss scale, Hessian trace",
            [
                target(f"fineline_optim_loss_scale{{{R}}}", "{{run}} loss scale"),
                target(f"fineline_optim_hessian_trace{{{R}}}", "{{run}} Hessian trace", "B"),
            ],
            16,
            y,
            log=True,
        )
    )
    y += 8
    # ---- the monitor itself ------------------------------------------------------------------
    panels.append(row("Monitor health", y))
    y += 1
    panels.append(
        timeseries(
            "Probe round seconds",
            [target(f"fineline_probe_round_seconds{{{R}}}", "{{run}}")],
            0,
            y,
            6,
            7,
            unit="s",
        )
    )
    panels.append(
        timeseries(
            "Probe rounds and failures",
            [
                target(f"fineline_probe_rounds_total{{{R}}}", "{{run}} rounds"),
                target(f"fineline_probe_failures_total{{{R}}}", "{{run}} failures", "B"),
                target(
                    f"fineline_last_step{{{R}}} - fineline_probe_last_step{{{R}}}",
                    "{{run}} steps since probe",
                    "C",
                ),
            ],
            6,
            y,
            6,
            7,
        )
    )
    panels.append(
        timeseries(
            "Sink drops and failures (increase over 5m)",
            [
                target(f"increase(fineline_sink_dropped_total{{{R}}}[5m])", "{{sink}} dropped"),
                target(f"increase(fineline_sink_failed_total{{{R}}}[5m])", "{{sink}} failed", "B"),
                target(f"fineline_sink_queue_depth{{{R}}}", "{{sink}} queued", "C"),
            ],
            12,
            y,
            6,
            7,
        )
    )
    panels.append(
        timeseries(
            "Monitor alerts fired",
            [target(f"increase(fineline_alerts_total{{{R}}}[5m])", "{{rule}} ({{severity}})")],
            18,
            y,
            6,
            7,
        )
    )

    return {
        "__inputs": [],
        "uid": "fineline-monitor",
        "title": "FineLine training monitor",
        "description": "Capability curves with expected bands, optimization-state indicators and the "
        "monitor's alerts (fineline_monitor Prometheus exporter).",
        "tags": ["fineline", "training", "llm"],
        "timezone": "",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-24h", "to": "now"},
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                },
                {
                    "name": "Phase changes",
                    "datasource": DS,
                    "enable": True,
                    "iconColor": "blue",
                    "expr": f"(fineline_phase{{{R}}} == 1) and on(run) (changes(fineline_phase_start_step{{{R}}}[2m]) > 0)",
                    "step": "30s",
                    "titleFormat": "phase → {{phase}}",
                    "textFormat": "run {{run}}",
                },
                {
                    "name": "Monitor alerts",
                    "datasource": DS,
                    "enable": True,
                    "iconColor": "red",
                    "expr": f"increase(fineline_alerts_total{{{R}}}[2m]) > 0",
                    "step": "30s",
                    "titleFormat": "{{severity}}: {{rule}}",
                    "textFormat": "run {{run}}",
                },
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "run",
                    "type": "query",
                    "datasource": DS,
                    "label": "run",
                    "query": {"query": "label_values(fineline_last_step, run)", "refId": "run"},
                    "definition": "label_values(fineline_last_step, run)",
                    "multi": True,
                    "includeAll": True,
                    "refresh": 2,
                    "sort": 1,
                    "current": {},
                },
                {
                    "name": "capability",
                    "type": "query",
                    "datasource": DS,
                    "label": "capability",
                    "query": {
                        "query": 'label_values(fineline_capability_score{run=~"$run"}, capability)',
                        "refId": "capability",
                    },
                    "definition": 'label_values(fineline_capability_score{run=~"$run"}, capability)',
                    "multi": True,
                    "includeAll": True,
                    "refresh": 2,
                    "sort": 1,
                    "current": {},
                },
            ]
        },
        "panels": panels,
    }


_METRIC = re.compile(r"\b(fineline_[a-z0-9_]+)\b(?!\s*\()")


def unregistered_names(dashboard: Dict[str, Any]) -> List[str]:
    """`fineline_*` names the dashboard's queries use that the exporter does not register."""
    known = prometheus_sample_names()
    text = json.dumps(
        [p.get("targets", []) for p in dashboard["panels"]]
        + [dashboard["annotations"], dashboard["templating"]]
    )
    return sorted({n for n in _METRIC.findall(text) if n not in known})


def main() -> None:
    dashboard = build()
    unknown = unregistered_names(dashboard)
    if unknown:
        raise SystemExit(f"the dashboard queries families the exporter does not write: {unknown}")
    out = Path(__file__).with_name("fineline.json")
    out.write_text(json.dumps(dashboard, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
