"""Render the generated parts of the docs from their sources, so no figure is pasted by hand.

A generated part sits between two markers in a Markdown file under docs/ (or README.md):

    <!-- BEGIN GENERATED: name -->
    ...
    <!-- END GENERATED: name -->

`RENDERERS` maps each name to (JSON file, render function). The JSON file is what a
benchmark wrote (`benchmarks/*.py --json`, under docs/data/); the function turns its parsed
content into Markdown. A renderer whose source is code rather than a measurement (the
configuration reference, read from the MonitorConfig dataclasses) has None as its file.

    python scripts/render_docs.py            # rewrite every generated part in place
    python scripts/render_docs.py --check    # exit 1 and name the stale parts

tests/unit/test_docs_generated.py runs the check, so a table that differs from its JSON
fails the test suite.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "docs" / "data"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BLOCK = re.compile(
    r"(<!-- BEGIN GENERATED: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- END GENERATED: (?P=name) -->)",
    re.S,
)


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def _provenance(d: Dict[str, Any]) -> str:
    m = d.get("machine", {})
    gpu = m.get("gpu") or "no GPU"
    torch = f", torch {m['torch']}" if m.get("torch") else ""
    size = f" Size: {d['size']}." if d.get("size") else ""
    return (
        f"*Measured {d['date']} on {m.get('cpus', '?')} CPU cores ({gpu}{torch}, Python {m.get('python', '?')})"
        f" with `{d['command']}`.{size}*"
    )


def render_config(_: Any) -> str:
    from fineline_monitor.core.config import reference_markdown

    return reference_markdown()


def render_probe_speed(d: Dict[str, Any]) -> str:
    f = d["figures"]
    rows = [
        "| figure | measured |",
        "|---|---|",
        f"| model | GPT-2 style, {f['params_m']:.2f}M parameters |",
        f"| requests | {f['requests']:,} from {f['tasks']} tasks x {f['docs_per_task']} documents |",
        f"| probe round vs lm-eval `HFLM.loglikelihood`, wall time | **{f['speed_ratio_wall']:.2f}x** "
        f"({f['lm_eval_s']:.2f} s against {f['round_s']:.2f} s) |",
        f"| the same, CPU time | {f['speed_ratio_cpu']:.2f}x |",
        f"| the same, cold (tokenize and plan included) | {f['speed_ratio_cold']:.2f}x |",
        f"| largest difference of a request's log-likelihood | {f['max_abs_dlogprob']:.1e} |",
        f"| `is_greedy` equal / `acc`, `acc_norm` equal | {'yes' if f['is_greedy_equal'] else 'NO'} / "
        f"{'yes' if f['acc_equal'] else 'NO'} |",
        f"| probe tokens/s vs training tokens/s (fwd+bwd+AdamW) | {f['probe_train_ratio']:.2f}x "
        f"({f['probe_tokens_per_s']:,.0f} against {f['train_tokens_per_s']:,.0f}) |",
    ]
    return "\n".join(rows) + "\n\n" + _provenance(d)


def render_overhead(d: Dict[str, Any]) -> str:
    f = d["figures"]
    p = f["per_step"]
    rows = [
        "| figure | target | measured |",
        "|---|---|---|",
        f"| time inside `monitor.step` (indicators on, probes off) / the training step, medians; {f['model']}, "
        f"{f['params_m']:.1f}M parameters, batch {f['batch']}, {1e3 * p['step_s_median']:.0f} ms steps "
        f"| <= 1% | **{p['median_pct']:.2f}%** ({p['plain_ms']:.1f} ms on an ordinary step, "
        f"{p['collect_ms']:.1f} ms on a collect step) |",
        f"| the same from totals (preemptions inside the call included) | | {p['direct_pct']:.2f}% |",
        f"| A/B median block time (a cross-check; noisy on a shared machine) | | {p['ab_pct']:+.2f}% |",
    ]
    w = f.get("whole_run")
    if w:
        rounds = ", ".join(f"step {r['step']} ({r['seconds']:.1f} s)" for r in w["rounds"])
        rows.append(
            f"| whole run at MonitorConfig defaults ({w['model']}, batch {w['batch']}, {w['minutes']:g} min, "
            f"`probe_max_overhead` {w['budget']}): time inside the monitor / the loop's own time | <= 2% "
            f"| **{w['pct_train']:.2f}%** over {w['steps']:,} steps ({w['indicator_pct']:.2f}% indicators); "
            f"rounds at {rounds}; the same rounds every {w['probe_every']} steps without the budget: "
            + (f"{w['fixed_pct']:.1f}%" if w["fixed_pct"] is not None else "n/a")
            + " |"
        )
    else:
        rows.append(
            "| whole run at MonitorConfig defaults | <= 2% | not run at this size (`--skip-whole`) |"
        )
    return "\n".join(rows) + "\n\n" + _provenance(d)


def render_long_run_memory(d: Dict[str, Any]) -> str:
    f = d["figures"]
    rows = ["| step | Python heap (traced) | RSS |", "|---|---|---|"]
    for c in f["checkpoints"]:
        heap = f"{c['py_heap_mb']:.2f} MiB" if "py_heap_mb" in c else "not traced"
        rows.append(f"| {c['step']:,} | {heap} | {c['rss_mb']:.1f} MiB |")
    heap = f"{f['heap_growth_mb']:+.3f} MiB heap, " if f.get("heap_growth_mb") is not None else ""
    tail = (
        f"Growth from step {f['growth_from_step']:,} to {f['steps']:,}: {heap}{f['rss_growth_mb']:+.1f} MiB RSS, "
        f"while the store holds the full record on disk ({f['store_metric_rows']:,} metric rows, "
        f"{f['store_probe_rows']:,} probe-result rows, {f['store_mb']:.1f} MiB); "
        f"{f['steps_per_s']:,.0f} steps/s."
    )
    return "\n".join(rows) + "\n\n" + tail + "\n\n" + _provenance(d)


def _aq_row(label: str, d: Dict[str, Any]) -> str:
    f = d["figures"]
    fl = f["faults"]
    return (
        f"| {label} | {f['criticals_healthy']} | {f['warnings_per_50_run_rounds']:.2f} ({f['warnings_healthy']}) "
        f"| {f['warnings_per_50_curve_rounds']:.3f} | {fl['drop']['recall_3_rounds']:.3f} / "
        f"{fl['drift']['recall_3_rounds']:.3f} / {fl['stall']['recall_3_rounds']:.3f} / "
        f"**{f['recall_3_rounds_all']:.3f}** | {f['recall_2_rounds_all']:.3f} |"
    )


_AQ_HEAD = (
    "| split | criticals on healthy runs | warnings per 50 run-rounds (count) | per 50 curve-rounds "
    "| recall within 3 rounds: drop / drift / stall / all | all within 2 rounds |\n|---|---|---|---|---|---|"
)


def _aq_table(label: str, d: Dict[str, Any]) -> str:
    f = d["figures"]
    extra = (
        f"\n\n{f['run_rounds']:,} run-rounds ({f['curve_rounds']:,} curve-rounds) of {f['runs']} healthy runs; "
        f"{f['faults_per_kind']} faults per kind, replay `{f['replay']}`, sizing `{f['sizing']}`."
    )
    return _AQ_HEAD + "\n" + _aq_row(label, d) + extra + "\n\n" + _provenance(d)


def render_alert_quality(d: Dict[str, Any]) -> str:
    return _aq_table(f"{d['figures']['split']}", d)


def render_alert_quality_tune(d: Dict[str, Any]) -> str:
    return _aq_table(f"{d['figures']['split']} (the runs the detector was tuned on)", d)


def render_alert_quality_scale2(d: Dict[str, Any]) -> str:
    return _aq_table(f"{d['figures']['split']}, faults {d['figures']['scale']:g}x larger", d)


def render_alert_quality_by_size(d: Dict[str, Any]) -> str:
    f = d["figures"]["faults"]
    labels: List[str] = []
    for k in ("drop", "drift", "stall"):
        for lab in f[k]["by_local_size"]:
            if lab not in labels:
                labels.append(lab)
    order = ["< 4", "4-8", "8-16", ">= 16"]
    labels.sort(key=lambda x: order.index(x) if x in order else len(order))
    rows = [
        "| kind | " + " | ".join(f"{lab} local sigmas" for lab in labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for k in ("drop", "drift", "stall"):
        cells = []
        for lab in labels:
            c = f[k]["by_local_size"].get(lab)
            cells.append(
                f"{c['caught'] / c['injected']:.2f} ({c['caught']}/{c['injected']})" if c else "-"
            )
        rows.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n\n" + _provenance(d)


def render_healthy_warnings(d: Dict[str, Any]) -> str:
    f = d["figures"]
    rows = [
        "| split | warnings on healthy runs | followed by a sustained shift | of those, on bpb curves |",
        "|---|---|---|---|",
        f"| {f['split']} | {f['warnings']} | {f['sustained']} (at least {_pct(f['sustained_share'], 0)} of the "
        f"next {f['after_rounds']} rounds on the bad side of the level before) | {f['sustained_on_bpb']} |",
    ]
    return "\n".join(rows) + "\n\n" + _provenance(d)


def render_analyze_speed(d: Dict[str, Any]) -> str:
    f = d["figures"]
    rows = [
        "| figure | target | measured |",
        "|---|---|---|",
        f"| `fineline-monitor analyze` over the whole table ({f['rows']:,} rows, {f['runs']} runs), "
        f"default `--jobs` ({f['jobs_default']} workers) | <= 20 s | **{f['seconds_default_jobs']:.1f} s** wall |",
        f"| the same with `--jobs 1` | | {f['seconds_jobs_1']:.1f} s |",
        f"| warnings / criticals over the table | | {f['warnings']} / {f['criticals']} |",
    ]
    if f.get("seconds_with_ladder") is not None:
        rows.insert(
            4,
            f"| the same with a reference ladder ({', '.join(f['ladder_runs'])}), default `--jobs` "
            f"| <= 20 s | **{f['seconds_with_ladder']:.1f} s** wall |",
        )
    return "\n".join(rows) + "\n\n" + _provenance(d)


Renderer = Callable[[Any], str]


def render_fault_table(doc: Dict[str, Any]) -> str:
    """The reliability fault table, recorded by the reliability tests after their assertions."""
    cols = ("injected", "survived", "bad_inputs", "rows_lost", "hangs")
    lines = [
        f"Recorded with `{doc['command']}` ({doc['environment']}): {doc['passed']} tests passed.",
        "",
        "| area | fault or bad input tried | what happened | " + " | ".join(doc["columns"]) + " |",
        "|" + "---|" * (3 + len(cols)),
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['area']} | {r['what']} | {r['happened']} | "
            + " | ".join(str(r[c]) for c in cols)
            + " |"
        )
    t = doc["totals"]
    lines.append("| **total** | | | " + " | ".join(f"**{t[c]}**" for c in doc["columns"]) + " |")
    gaps = doc.get("known_gaps", [])
    if gaps:
        lines += [
            "",
            "Known gaps (strict xfails: such a test fails once its gap is fixed, and then becomes a plain test):",
        ]
        lines += [f"- `{g['test']}`: {g['reason'].removeprefix('reason: ')}" for g in gaps]
    return "\n".join(lines)


def render_ladder_prediction(d: Dict[str, Any]) -> str:
    f = d["figures"]
    rows = [
        "| metric | expected from | 25% of the run | 50% | 75% | 100% (last checkpoint) |",
        "|---|---|---|---|---|---|",
    ]
    for name, hows in sorted(f["prediction_error"].items()):
        for how in ("ladder", "own-run"):
            cells = [f"{c['median']:.2f} (n={c['n']})" for c in hows[how].values()]
            rows.append(f"| {name} | {how} | " + " | ".join(cells) + " |")
    return (
        "\n".join(rows)
        + f"\n\nMedian |predicted - observed| over the curves of {f['runs_with_ladder']} held-out runs "
        f"that have smaller runs of their family (of {f['runs']}).\n\n" + _provenance(d)
    )


def render_ladder_quality(d: Dict[str, Any]) -> str:
    f = d["figures"]
    q = f["quality"]
    labels = ["< 6", "6-10", ">= 10"]
    rows = [
        "| | criticals on healthy runs | warnings per 50 run-rounds | fault | recall within 3 rounds | "
        + " | ".join(f"size {lab} sigma" for lab in labels)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(labels),
    ]
    for mode in ("off", "on"):
        h = q[mode]["healthy"]
        for i, kind in enumerate(("drop", "drift", "stall")):
            k = q[mode][kind]
            head = (
                f"| ladder {mode} | {h['criticals']} | {h['warnings_per_50_run_rounds']:.2f} ({h['warnings']})"
                if i == 0
                else "| | | "
            )
            cells = []
            for lab in labels:
                c = k["by_size"].get(lab)
                cells.append(f"{c['recall']:.2f} ({c['caught']}/{c['n']})" if c else "-")
            rows.append(
                f"{head} | {kind} | **{k['recall']:.3f}** ({k['caught']}/{k['n']}) | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(rows) + "\n\n" + _provenance(d)


def render_ladder_frontier(d: Dict[str, Any]) -> str:
    """Warnings against recall for the ladder off, confirmed by the own-run fit (the
    default) and deciding alone: the default run's JSON and the `--set ladder_confirm_z=0` one."""
    alone = json.loads(
        (REPO / "docs" / "data" / "bench-alert-quality-ladder-alone.json").read_text()
    )
    rows = [
        "| ladder | warnings per 50 run-rounds | drop >= 10 sigma | drift 6-10 | drift >= 10 | stall | "
        "stall >= 10 sigma |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(k: Dict[str, Any], lab: Optional[str] = None) -> str:
        c = (
            k
            if lab is None
            else k["by_size"].get(lab, {"recall": float("nan"), "caught": 0, "n": 0})
        )
        return f"{c['recall']:.2f} ({c['caught']}/{c['n']})"

    for label, q in (
        ("off", d["figures"]["quality"]["off"]),
        ("on, confirmed by the own-run fit (default)", d["figures"]["quality"]["on"]),
        ("on, deciding alone", alone["figures"]["quality"]["on"]),
    ):
        rows.append(
            f"| {label} | {q['healthy']['warnings_per_50_run_rounds']:.2f} | {cell(q['drop'], '>= 10')} | "
            f"{cell(q['drift'], '6-10')} | {cell(q['drift'], '>= 10')} | {cell(q['stall'])} | "
            f"{cell(q['stall'], '>= 10')} |"
        )
    return "\n".join(rows) + "\n\n" + _provenance(d) + "\n\n" + _provenance(alone)


def render_detector(_: Any) -> str:
    from fineline_monitor.core.config import detector_markdown

    return detector_markdown()


RENDERERS: Dict[str, Tuple[Optional[str], Renderer]] = {
    "config-reference": (None, render_config),
    "detector-settings": (None, render_detector),
    "bench-ladder-prediction": (
        "docs/data/bench-alert-quality-ladder.json",
        render_ladder_prediction,
    ),
    "bench-ladder-quality": ("docs/data/bench-alert-quality-ladder.json", render_ladder_quality),
    "bench-ladder-frontier": ("docs/data/bench-alert-quality-ladder.json", render_ladder_frontier),
    "fault-table": ("docs/data/fault-table.json", render_fault_table),
    "bench-probe-speed": ("docs/data/bench-probe-speed.json", render_probe_speed),
    "bench-overhead": ("docs/data/bench-overhead.json", render_overhead),
    "bench-long-run-memory": ("docs/data/bench-long-run-memory.json", render_long_run_memory),
    "bench-alert-quality": ("docs/data/bench-alert-quality.json", render_alert_quality),
    "bench-alert-quality-tune": (
        "docs/data/bench-alert-quality-tune.json",
        render_alert_quality_tune,
    ),
    "bench-alert-quality-scale2": (
        "docs/data/bench-alert-quality-scale2.json",
        render_alert_quality_scale2,
    ),
    "bench-alert-quality-by-size": (
        "docs/data/bench-alert-quality.json",
        render_alert_quality_by_size,
    ),
    "bench-healthy-warnings": ("docs/data/bench-healthy-warnings.json", render_healthy_warnings),
    "bench-analyze-speed": ("docs/data/bench-analyze-speed.json", render_analyze_speed),
}


def render(name: str) -> str:
    path, fn = RENDERERS[name]
    data = json.loads((REPO / path).read_text()) if path else None
    return fn(data).rstrip("\n") + "\n"


def pages() -> List[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks(text: str) -> List[Tuple[str, str]]:
    """(name, body) of every generated part of a page."""
    return [(m.group("name"), m.group("body")) for m in BLOCK.finditer(text)]


def rewrite(text: str) -> str:
    def sub(m: "re.Match[str]") -> str:
        name = m.group("name")
        if name not in RENDERERS:
            raise KeyError(f"no renderer named {name!r} (known: {', '.join(sorted(RENDERERS))})")
        path = RENDERERS[name][0]
        if path and not (REPO / path).exists():
            print(
                f"skipped {name}: {path} does not exist (run its benchmark with --json)",
                file=sys.stderr,
            )
            return m.group(0)
        return m.group(1) + render(name) + m.group(4)

    return BLOCK.sub(sub, text)


def stale() -> List[str]:
    """`page: name` of every generated part that differs from what its renderer makes now."""
    out = []
    for page in pages():
        if not page.exists():
            continue
        for name, body in blocks(page.read_text()):
            path = RENDERERS[name][0] if name in RENDERERS else None
            if (
                name not in RENDERERS
                or (path and not (REPO / path).exists())
                or body != render(name)
            ):
                out.append(f"{page.relative_to(REPO)}: {name}")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 naming the stale parts"
    )
    args = ap.parse_args(argv)
    if args.check:
        bad = stale()
        for b in bad:
            print(f"stale: {b}")
        return 1 if bad else 0
    for page in pages():
        if page.exists():
            text = page.read_text()
            new = rewrite(text)
            if new != text:
                page.write_text(new)
                print(f"rewrote {page.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
