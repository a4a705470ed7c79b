"""`render_report(out_dir)`: OUT/run.db -> OUT/report.html, one self-contained page.

What a person paged at 3 am needs on one screen, in this order: what fired and why (the
alerts with their explanations), the capability curves against their expected bands with
the training phases shaded, the loss next to the optimization-state indicators, the probe
tasks, and the monitor's own errors. No external JS/CSS/fonts (the page must open from a
laptop with no network, or as a CI artifact): inline SVG plus a few lines of inline script
that only add convenience (and trap JS errors into the page so the Chromium test sees them).
"""

from __future__ import annotations

import html
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from fineline_monitor import metric_names as names
from fineline_monitor.report.svg import PALETTE, PHASE_COLORS, SEVERITY_COLORS, Chart, fmt

esc = html.escape

# Indicators shown next to the loss, in this order: (metric name, title, log scale).
INDICATORS: Tuple[Tuple[str, str, bool], ...] = (
    (names.LR, "learning rate", False),
    (names.GRAD_NORM, "gradient norm", True),
    (names.UPDATE_RATIO, "update / parameter ratio", True),
    (names.PARAM_NORM, "parameter norm", False),
    (names.LOSS_Z, "loss z-score", False),
    (names.ATTN_LOGIT_MAX, "max attention logit", True),
    (names.OUTPUT_LOGIT_MAX, "max output logit", False),
    (names.OUTPUT_LOGSUMEXP_MEAN, "mean output log-partition", False),
    (names.GRAD_RMS_OVER_EPS_MIN, "min grad RMS / Adam eps", True),
    (names.HESSIAN_TRACE, "Hessian trace (Hutchinson)", False),
    (names.LOSS_SCALE, "loss scale", True),
    (names.SKIPPED_STEPS, "skipped steps", False),
    (names.NONFINITE_LOSS, "non-finite losses", False),
    (names.NONFINITE_GRAD, "non-finite gradients", False),
    (names.TOKENS_PER_S, "training tokens / s", False),
    (names.PROBE_SECONDS, "probe round seconds", False),
)
# Per-layer / per-group families drawn as one multi-line chart each.
FAMILIES = (
    (names.ATTN_LOGIT_MAX + "/", "max attention logit per layer", True),
    (names.ACT_RMS + "/", "activation RMS per layer", True),
    (names.UPDATE_RATIO + "/", "update / parameter ratio per group", True),
    (names.GRAD_RMS + "/", "gradient RMS per group", True),
)
QUIET_WHEN_ZERO = (names.SKIPPED_STEPS, names.NONFINITE_LOSS, names.NONFINITE_GRAD)
PRIMARY_ORDER = ("acc_norm", "acc", "bpb")

CSS = """
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;
color:#111827;background:#f9fafb}header{background:#111827;color:#f9fafb;padding:18px 28px}
header h1{margin:0 0 4px;font-size:22px}header .sub{color:#d1d5db}main{padding:8px 28px 40px;max-width:1540px}
h2{margin:28px 0 10px;font-size:18px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
h3{margin:16px 0 6px;font-size:15px}.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:6px}
.kpis{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}.kpi{background:#fff;border:1px solid #e5e7eb;
border-radius:8px;padding:8px 14px;min-width:130px}.kpi b{display:block;font-size:18px}.kpi span{color:#6b7280;font-size:12px}
table{border-collapse:collapse;background:#fff;width:100%;font-size:13px}th,td{border:1px solid #e5e7eb;
padding:4px 7px;text-align:left;vertical-align:top}th{background:#f3f4f6;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}.sev{color:#fff;border-radius:4px;padding:1px 6px;
font-size:12px;font-weight:600}.ok{color:#065f46}.muted{color:#6b7280}.legend span{display:inline-block;
margin-right:12px}.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px;
border:1px solid #d1d5db}svg.chart text{font:11px system-ui,sans-serif;fill:#374151}svg.chart .ct{font-weight:600;
font-size:12px;fill:#111827}svg.chart .pa{fill:#fff}svg.chart .gr{stroke:#e5e7eb}svg.chart .ax{stroke:#9ca3af}
svg.chart .ph{fill:#6b7280;font-size:10px}svg.chart .na{fill:#9ca3af}svg.chart .lg{font-size:10px}
details{margin:8px 0}pre{background:#fff;border:1px solid #e5e7eb;padding:10px;overflow:auto;max-height:420px}
tr.hl td{background:#fef9c3}#js-errors{display:none}
"""

SCRIPT = """
window.__fl_errors = [];
window.addEventListener('error', function (e) {
  window.__fl_errors.push(String(e.message || e));
  var box = document.getElementById('js-errors');
  if (box) { box.textContent = window.__fl_errors.join('\\n'); box.setAttribute('data-count', window.__fl_errors.length); }
});
document.addEventListener('DOMContentLoaded', function () {
  // Clicking an alert row highlights every alert of the same rule.
  var rows = document.querySelectorAll('#alerts tbody tr');
  rows.forEach(function (r) {
    r.addEventListener('click', function () {
      rows.forEach(function (o) { o.classList.toggle('hl', o.dataset.rule === r.dataset.rule); });
    });
  });
  document.body.setAttribute('data-rendered', String(document.querySelectorAll('svg.chart').length));
});
"""


def _load(out_dir: Path, run: Optional[str]) -> Dict[str, Any]:
    from fineline_monitor.core.store import RunStore

    db = Path(out_dir) / "run.db"
    store = RunStore(db, readonly=True)
    try:
        runs = store.runs()
        if not runs:
            raise ValueError(f"{db}: the store has no run recorded")
        if run is None:
            run = runs[-1]
        elif run not in runs:
            raise ValueError(f"{db}: no run {run!r}; runs here: {', '.join(runs)}")
        d: Dict[str, Any] = {"run": run, "runs": runs, "info": store.run_info(run)}
        d["series"] = {n: store.series(n, run) for n in store.metric_names(run)}
        d["probe_results"] = store.probe_results(run)
        d["probe_rounds"] = store.probe_rounds(run)
        d["alerts"] = store.alerts(run)
        d["phases"] = store.phases(run)
        d["expectations"] = store.expectations(run)
        d["events"] = store.events(run)
        return d
    finally:
        store.close()


def _phase_spans(phases: List[Dict[str, Any]], last_step: float) -> List[Tuple[float, float, str]]:
    spans = []
    for i, p in enumerate(phases):
        end = phases[i + 1]["step"] if i + 1 < len(phases) else last_step
        spans.append((float(p["step"]), float(end), p["phase"]))
    return spans


def _sev_badge(sev: str) -> str:
    return f'<span class="sev" style="background:{SEVERITY_COLORS.get(sev, "#6b7280")}">{esc(sev)}</span>'


def _num(v: Any) -> str:
    if v is None:
        return '<span class="muted">n/a</span>'
    try:
        f = float(v)
    except (TypeError, ValueError):
        return esc(str(v))
    return fmt(f) if math.isfinite(f) else esc(str(f))


def _alert_matches(
    a: Dict[str, Any],
    capability: Optional[str] = None,
    task: Optional[str] = None,
    metrics: Tuple[str, ...] = (),
) -> bool:
    if capability is not None and a.get("capability") == capability:
        return True
    if task is not None and a.get("task") == task:
        return True
    return bool(metrics) and a.get("metric") in metrics


def _mark(chart: Chart, alerts: List[Dict[str, Any]]) -> None:
    for a in alerts:
        chart.marker(
            a["step"],
            a["severity"],
            f"{a['severity']} {a['rule']} @ step {a['step']}: {a['message']}",
        )


def is_capability_alert(a: dict) -> bool:
    return bool(a.get("capability")) and str(a.get("rule", "")).startswith(
        ("capability_", "sibling_")
    )


def what_happened(
    alerts: List[dict],
    injection: Optional[Tuple[str, int]],
    probe_steps: List[int],
    max_lines: int = 5,
) -> List[str]:
    """Lines saying which capability left its band, where, after how many probe rounds, and
    expected vs observed (the report's "What happened" box and the closing summary)."""
    at = injection[1] if injection else 0
    lines: List[str] = []
    seen = set()
    # a capability's own series before its tasks', the first step first; one line per curve
    # family (a task's bpb and gold log-probability are one finding)
    ordered = sorted(
        (a for a in alerts if is_capability_alert(a) and a["step"] >= at),
        key=lambda a: (a["step"], a.get("task") is not None, a.get("metric") != names.CAP_BPB),
    )
    for a in ordered:
        what = (a.get("capability"), a.get("task"))
        if what in seen or len(lines) >= max_lines:
            continue
        seen.add(what)
        series = a.get("metric") or ""
        unit = (
            names.describe_capability_series(series)
            if series in names.CAPABILITY_SERIES
            else series
        )
        rounds = sum(1 for s in probe_steps if at <= s <= a["step"]) if injection else None
        band = a.get("band")
        band_s = f" (band {band[0]:.4g} to {band[1]:.4g})" if band else ""
        where = a["capability"] + (f" task {a['task']}" if a.get("task") else "")
        lines.append(
            f"{where} left its band at step {a['step']} ({a['severity']} {a['rule']}"
            + (f", {rounds} probe round(s) after the injection" if rounds is not None else "")
            + f"): observed {_fmt(a.get('observed'))}, expected {_fmt(a.get('expected'))}{band_s}; "
            f"{unit}"
        )
    return lines


def _fmt(v) -> str:
    try:
        return f"{float(v):.4g}"
    except (TypeError, ValueError):
        return "n/a"


def _what_happened_section(d: Dict[str, Any]) -> str:
    meta = d["info"].get("meta", {}) or {}
    injection = None
    spec = meta.get("injection")
    if isinstance(spec, str) and "@" in spec:
        kind, _, at = spec.partition("@")
        injection = (kind, int(at)) if at.isdigit() else None
    lines = what_happened(d["alerts"], injection, [r["step"] for r in d["probe_rounds"]])
    head = f"Injected: {esc(injection[0])} at step {injection[1]}. " if injection else ""
    if not lines:
        body = '<p class="ok">No capability left its expected band.</p>'
    else:
        body = "<ul>" + "".join(f"<li>{esc(x)}</li>" for x in lines) + "</ul>"
    return f'<div class="card" id="what-happened"><h3>What happened</h3><p>{head}</p>{body}</div>'


def _ladder_capabilities(d: Dict[str, Any]) -> Dict[str, Dict[str, List[Tuple[int, float]]]]:
    """The reference runs' capability series (`<cap>/bpb` -> run -> points), from the ladder CSV
    the run was judged against; each capability is the mean over the same tasks as the run's."""
    import csv

    path = ((d["info"].get("config") or {}).get("alerts") or {}).get("reference_csv")
    if not path or not Path(path).is_file():
        return {}
    cap_of = {r["task"]: r["capability"] for r in d["probe_results"]}
    acc: Dict[Tuple[str, str, int], List[float]] = defaultdict(list)
    try:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                cap = cap_of.get(row["task"])
                if cap is None or row["metric"] != names.CAP_BPB:
                    continue
                try:
                    v = float(row["value"])
                except ValueError:
                    continue
                if math.isfinite(v):
                    acc[
                        (
                            f"{cap}/{names.CAP_BPB}",
                            f"{row['source']}/{row['model']}",
                            int(row["step"]),
                        )
                    ].append(v)
    except (OSError, KeyError, csv.Error):
        return {}
    out: Dict[str, Dict[str, List[Tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for (key, run, step), vals in sorted(acc.items(), key=lambda kv: kv[0][2]):
        out[key][run].append((step, sum(vals) / len(vals)))
    return out


def _capability_section(d: Dict[str, Any], spans) -> str:
    caps: Dict[str, List[Tuple[int, float]]] = defaultdict(list)
    for r in d["probe_rounds"]:
        for cap, v in (r["capabilities"] or {}).items():
            caps[cap].append((r["step"], v))
    for name, rows in d["series"].items():  # also from metrics, if rounds lack them
        cap = names.split_capability_key(name)
        if cap is not None and cap not in caps:
            caps[cap] = [(s, v) for s, _, v in rows]
    exp = defaultdict(list)
    for e in d["expectations"]:
        exp[e["name"]].append(e)
    if not caps:
        return '<p class="muted">No probe rounds recorded (probes off, or the run ended before the first round).</p>'
    ladder = _ladder_capabilities(d)
    charts = []
    # bits per byte of every capability first (what moves before take-off), then accuracy
    keys = sorted(
        (k for k in caps if k.rsplit("/", 1)[-1] in names.CAPABILITY_SERIES),
        key=lambda k: (k.rsplit("/", 1)[-1] != names.CAP_BPB, k),
    )
    if not keys:  # a store written before the capability series: one score per capability
        keys = sorted(caps)
    for i, key in enumerate(keys):
        cap, _, series = key.rpartition("/")
        label = (
            names.describe_capability_series(series)
            if series in names.CAPABILITY_SERIES
            else "capability score"
        )
        c = Chart(f"{cap or key} · {label}", y_label=label).phase_spans(spans)
        rows = exp.get(names.capability_key(key), [])
        c.band(
            "expected band",
            [(e["step"], e["low"], e["high"]) for e in rows],
            color=PALETTE[i % len(PALETTE)],
        )
        c.line("expected", [(e["step"], e["expected"]) for e in rows], color="#6b7280", dashed=True)
        for run, pts in sorted(ladder.get(key, {}).items()):
            c.line(f"reference {run}", pts, color="#9ca3af", dashed=True)
        c.line(key, caps[key], color=PALETTE[i % len(PALETTE)])
        _mark(
            c,
            [
                a
                for a in d["alerts"]
                if a.get("capability") == (cap or key)
                and (not series or a.get("metric") in (series, None))
            ],
        )
        charts.append(c.render())
    return '<div class="grid">' + "".join(f'<div class="card">{c}</div>' for c in charts) + "</div>"


def _tasks_section(d: Dict[str, Any], spans) -> str:
    by_task: Dict[str, Dict[str, Any]] = {}
    for r in d["probe_results"]:
        t = by_task.setdefault(
            r["task"],
            {"capability": r["capability"], "metrics": defaultdict(list), "n_docs": r["n_docs"]},
        )
        t["metrics"][r["metric"]].append(r)
    if not by_task:
        return ""
    exp = defaultdict(list)
    for e in d["expectations"]:
        exp[e["name"]].append(e)
    parts = []
    for cap in sorted({t["capability"] for t in by_task.values()}):
        charts = []
        for task in sorted(k for k, t in by_task.items() if t["capability"] == cap):
            t = by_task[task]
            with_exp = [m for m in t["metrics"] if names.probe_key(task, m) in exp]
            metric = (
                with_exp or [m for m in PRIMARY_ORDER if m in t["metrics"]] or sorted(t["metrics"])
            )[0]
            rows = t["metrics"][metric]
            c = Chart(
                f"{task} · {metric} (n={t['n_docs']})",
                width=360,
                height=200,
                y_label=names.describe_capability_series(metric)
                if metric in names.CAPABILITY_SERIES
                else metric,
            )
            c.phase_spans(spans)
            e = exp.get(names.probe_key(task, metric), [])
            c.band("expected band", [(x["step"], x["low"], x["high"]) for x in e])
            c.band(
                "± stderr",
                [
                    (r["step"], r["value"] - r["stderr"], r["value"] + r["stderr"])
                    for r in rows
                    if r["value"] is not None and r["stderr"] is not None
                ],
                color="#9ca3af",
            )
            c.line(
                "expected", [(x["step"], x["expected"]) for x in e], color="#6b7280", dashed=True
            )
            c.line(metric, [(r["step"], r["value"]) for r in rows])
            _mark(c, [a for a in d["alerts"] if a.get("task") == task])
            charts.append(c.render())
        parts.append(
            f'<h3>{esc(cap)}</h3><div class="grid">'
            + "".join(f'<div class="card">{c}</div>' for c in charts)
            + "</div>"
        )
    # last values table
    metrics = sorted({m for t in by_task.values() for m in t["metrics"]})
    head = "".join(f"<th>{esc(m)}</th>" for m in metrics)
    body = []
    for task in sorted(by_task, key=lambda k: (by_task[k]["capability"], k)):
        t = by_task[task]
        cells = "".join(
            f'<td class="num">{_num(t["metrics"][m][-1]["value"]) if m in t["metrics"] else ""}</td>'
            for m in metrics
        )
        body.append(
            f'<tr><td>{esc(t["capability"])}</td><td>{esc(task)}</td><td class="num">{t["n_docs"]}</td>'
            f"{cells}</tr>"
        )
    parts.append(
        "<details><summary>last probe values per task</summary><table><thead><tr><th>capability</th>"
        f"<th>task</th><th>docs</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></details>"
    )
    return "".join(parts)


def _indicators_section(d: Dict[str, Any], spans) -> str:
    series = d["series"]
    charts = []
    loss = series.get(names.LOSS, [])
    c = Chart("training loss", y_label="loss", width=560).phase_spans(spans)
    c.line(names.LOSS, [(s, v) for s, _, v in loss], color="#111827")
    exp_loss = [e for e in d["expectations"] if e["name"] == names.LOSS]
    c.band("expected band", [(e["step"], e["low"], e["high"]) for e in exp_loss])
    _mark(
        c,
        [
            a
            for a in d["alerts"]
            if _alert_matches(a, metrics=(names.LOSS, "loss")) or not a.get("capability")
        ],
    )
    charts.append(c.render())
    quiet: List[str] = []
    for name, title, log_y in INDICATORS:
        rows = series.get(name)
        if not rows or all(v is None for _, _, v in rows):
            continue
        if name in QUIET_WHEN_ZERO and all(v == 0 for _, _, v in rows):
            quiet.append(title)
            continue
        vals = [v for _, _, v in rows if v is not None and math.isfinite(v)]
        use_log = log_y and bool(vals) and min(vals) > 0
        c = Chart(title, y_label=name, log_y=use_log).phase_spans(spans)
        c.line(name, [(s, v) for s, _, v in rows])
        _mark(c, [a for a in d["alerts"] if a.get("metric") == name])
        charts.append(c.render())
    for prefix, title, log_y in FAMILIES:
        members = sorted((n for n in series if n.startswith(prefix)), key=lambda n: (len(n), n))
        if not members:
            continue
        vals = [v for n in members for _, _, v in series[n] if v is not None and math.isfinite(v)]
        c = Chart(
            title + (f" ({len(members)}, first 10)" if len(members) > 10 else ""),
            log_y=log_y and bool(vals) and min(vals) > 0,
        ).phase_spans(spans)
        for n in members[:10]:
            c.line(n[len(prefix) :], [(s, v) for s, _, v in series[n]])
        charts.append(c.render())
    note = f'<p class="ok">Zero throughout the run: {esc(", ".join(quiet))}.</p>' if quiet else ""
    return (
        note
        + '<div class="grid">'
        + "".join(f'<div class="card">{c}</div>' for c in charts)
        + "</div>"
    )


def _alerts_section(alerts: List[Dict[str, Any]]) -> str:
    if not alerts:
        return '<p class="ok">No alerts fired in this run.</p>'
    rows = []
    for a in sorted(alerts, key=lambda a: (a["step"], a["rule"])):
        where = (
            "/".join(x for x in (a.get("capability"), a.get("task"), a.get("metric")) if x) or "run"
        )
        band = a.get("band")
        band_s = f"[{_num(band[0])}, {_num(band[1])}]" if band else _num(None)
        rows.append(
            f'<tr data-rule="{esc(a["rule"])}"><td class="num">{a["step"]}</td>'
            f'<td class="num">{_num(a.get("tokens"))}</td><td>{_sev_badge(a["severity"])}</td>'
            f"<td>{esc(a['rule'])}</td><td>{esc(where)}</td><td>{esc(a.get('phase') or '')}</td>"
            f'<td class="num">{_num(a.get("observed"))}</td><td class="num">{_num(a.get("expected"))}</td>'
            f'<td class="num">{band_s}</td><td>{esc(a.get("message") or "")}</td></tr>'
        )
    return (
        '<table id="alerts"><thead><tr><th>step</th><th>tokens</th><th>severity</th><th>rule</th>'
        "<th>capability / task / metric</th><th>phase</th><th>observed</th><th>expected</th><th>band</th>"
        f"<th>explanation</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _events_section(events: List[Dict[str, Any]]) -> str:
    if not events:
        return '<p class="ok">No internal monitor errors.</p>'
    rows = "".join(
        f'<tr><td class="num">{e["step"]}</td><td>{esc(e["kind"])}</td><td>{esc(e["key"])}</td>'
        f"<td><code>{esc(e['message'] or '')}</code></td></tr>"
        for e in events
    )
    return (
        "<table><thead><tr><th>step</th><th>kind</th><th>part</th><th>message</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def build_html(d: Dict[str, Any]) -> str:
    series = d["series"]
    steps = [s for rows in series.values() for s, _, _ in rows] + [
        r["step"] for r in d["probe_rounds"]
    ]
    last_step = max(steps) if steps else 0
    spans = _phase_spans(d["phases"], last_step)
    tokens = [t for rows in series.values() for _, t, _ in rows if t is not None]
    info = d["info"]
    meta = info.get("meta", {}) or {}
    created = info.get("created")
    counts = defaultdict(int)
    for a in d["alerts"]:
        counts[a["severity"]] += 1
    loss = [v for _, _, v in series.get(names.LOSS, []) if v is not None]
    kpis = [
        ("steps", f"{last_step:,}"),
        ("tokens", f"{max(tokens):,}" if tokens else "n/a"),
        (
            "parameters",
            f"{meta['params'] / 1e6:.2f}M"
            if isinstance(meta.get("params"), (int, float))
            else "n/a",
        ),
        ("last loss", fmt(loss[-1]) if loss else "n/a"),
        ("probe rounds", str(len(d["probe_rounds"]))),
        ("phase", d["phases"][-1]["phase"] if d["phases"] else "n/a"),
        ("critical", str(counts["critical"])),
        ("warning", str(counts["warning"])),
        ("internal errors", str(len(d["events"]))),
    ]
    kpi_html = "".join(
        f'<div class="kpi"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for k, v in kpis
    )
    phase_legend = "".join(
        f'<span><i style="background:{c}"></i>{p}</span>'
        for p, c in PHASE_COLORS.items()
        if any(s[2] == p for s in spans)
    )
    status = (
        "critical alerts fired"
        if counts["critical"]
        else "warnings fired"
        if counts["warning"]
        else "healthy: no warnings or criticals"
    )
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(created)) if created else "?"
    config_json = esc(json.dumps(info.get("config", {}), indent=2, default=str))
    meta_json = esc(json.dumps(meta, indent=2, default=str))
    other_runs = [r for r in d["runs"] if r != d["run"]]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>FineLine report: {esc(d["run"])}</title>
<style>{CSS}</style>
<script>{SCRIPT}</script>
</head><body>
<header><h1>FineLine monitor report: {esc(d["run"])}</h1>
<div class="sub">started {esc(when)} · {esc(status)}{" · other runs in this store: " + esc(", ".join(other_runs)) if other_runs else ""}</div></header>
<main>
<div class="kpis">{kpi_html}</div>
<div class="legend muted">phases: {phase_legend or "none recorded"} · ▼ alert markers:
<span style="color:{SEVERITY_COLORS["critical"]}">critical</span>, <span style="color:{SEVERITY_COLORS["warning"]}">warning</span>
· shaded bands: expected range for the current phase</div>
{_what_happened_section(d)}
<h2 id="alerts-h">Alerts</h2>
{_alerts_section(d["alerts"])}
<h2>Capabilities</h2>
<p class="muted">Per capability: bits per byte of the gold continuation (mean over its tasks, lower is better) and
accuracy above chance (higher is better; 0 is chance). Shaded: the band expected from the run's own fit,
where one could be formed (an accuracy is judged only once it is above chance). Dashed grey: the reference runs
(pilot models).</p>
{_capability_section(d, spans)}
<h2>Loss and indicators</h2>
{_indicators_section(d, spans)}
<h2>Probe tasks</h2>
{_tasks_section(d, spans) or '<p class="muted">No probe results.</p>'}
<h2>Monitor errors</h2>
{_events_section(d["events"])}
<h2>Run</h2>
<details><summary>config</summary><pre>{config_json}</pre></details>
<details><summary>metadata</summary><pre>{meta_json}</pre></details>
<pre id="js-errors" data-count="0"></pre>
</main></body></html>
"""


def render_report(out_dir: Path, run: Optional[str] = None, output: Optional[Path] = None) -> Path:
    """Write OUT/report.html from OUT/run.db (read-only) and return its path.

    `run` picks one run when the store holds several (default: the latest).
    Written to a temporary file and renamed, so a browser never shows half a report.
    """
    out_dir = Path(out_dir)
    d = _load(out_dir, run)
    text = build_html(d)
    path = Path(output) if output is not None else out_dir / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
