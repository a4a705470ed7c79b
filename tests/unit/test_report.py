"""The HTML report: built from a run store, self-contained, and renders in real Chromium.

The store here is written through RunStore's public writing API with a run that has
everything a report must show (phases, probe rounds for all six capabilities, expected
bands, a warning and a critical alert, an internal error), so every section is exercised.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from fineline_monitor.core.store import RunStore
from fineline_monitor.core.types import CAPABILITIES, Alert, ProbeRound, TaskResult
from fineline_monitor.report import render_report
from fineline_monitor.report.cli import add_parser

TASKS = {
    "commonsense": ["hellaswag", "piqa"],
    "knowledge": ["arc_easy"],
    "reading": ["boolq"],
    "math": ["gsm8k"],
    "code": ["codex_humaneval"],
    "examination": ["mmlu"],
}


def make_store(out: Path, run: str = "report-run", steps: int = 120) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    st = RunStore(out / "run.db", run)
    st.start_run(run, {"probe_every": 20, "sinks": {"enabled": ["store"]}}, {"params": 2_220_000})
    st.log_phase(0, 0, "warmup", None)
    st.log_phase(12, 12 * 1024, "stable", "warmup")
    st.log_phase(96, 96 * 1024, "decay", "stable")
    for s in range(0, steps, 5):
        tok = (s + 1) * 1024
        m = {
            "train/loss": 7.5 * (1 + s) ** -0.08 + (1.5 if s == 70 else 0.0),
            "train/lr": min(1.0, (s + 1) / 12) * 1e-3,
            "train/tokens": tok,
            "optim/grad_norm": 1.0 + 0.2 * math.sin(s / 7) + (20 if s == 70 else 0),
            "optim/update_ratio": 1e-3 * (1.2 if s < 60 else 0.8),
            "optim/update_ratio/matrices": 1.1e-3,
            "optim/update_ratio/vectors": 3e-4,
            "optim/nonfinite_loss": 0.0,
            "train/loss_z": 9.0 if s == 70 else 0.1 * math.sin(s),
        }
        for layer in range(4):
            m[f"stability/attn_logit_max/{layer}"] = 5.0 + layer + s / 30
        st.log_metrics(s, tok, m)
    st.log_metrics(75, 76 * 1024, {"train/loss": float("nan")})  # NaN must not break a chart
    for s in range(0, steps, 20):
        tasks = {}
        caps = {}
        for ci, (cap, names) in enumerate(TASKS.items()):
            for t in names:
                acc = 0.25 + 0.3 * (1 - math.exp(-s / 60)) + 0.01 * ci
                if t == "gsm8k" and s >= 80:
                    acc -= 0.12  # the regression the warning is about
                tasks[t] = TaskResult(
                    t, cap, 16, {"acc": acc, "bpb": 2.0 - acc}, {"acc": 0.05, "bpb": 0.02}
                )
            caps[f"{cap}/acc_above_chance"] = (
                sum(tasks[t].metrics["acc"] for t in names) / len(names) - 0.25
            )
        st.log_probe(
            ProbeRound(
                step=s,
                tokens=(s + 1) * 1024,
                tasks=tasks,
                requests=[],
                seconds=1.5,
                tokens_scored=9000,
                capability_scores=caps,
            )
        )
        rows = [
            {"name": f"capability/{c}", "expected": v + 0.01, "low": v - 0.05, "high": v + 0.07}
            for c, v in caps.items()
        ]
        rows += [
            {
                "name": f"probe/{t}/acc",
                "expected": tasks[t].metrics["acc"] + (0.12 if t == "gsm8k" and s >= 80 else 0),
                "low": tasks[t].metrics["acc"] - 0.05 + (0.09 if t == "gsm8k" and s >= 80 else 0),
                "high": tasks[t].metrics["acc"] + 0.18,
            }
            for t in tasks
        ]
        st.log_expectations(s, rows)
    st.log_alert(
        Alert(
            "capability_regression",
            "warning",
            100,
            "math/gsm8k acc 0.42 fell below the expected "
            "band [0.45, 0.72] for phase stable (expected 0.56)",
            tokens=101 * 1024,
            run=run,
            capability="math",
            task="gsm8k",
            metric="acc",
            observed=0.42,
            expected=0.56,
            band=[0.45, 0.72],
            phase="stable",
        )
    )
    st.log_alert(
        Alert(
            "nonfinite_loss",
            "critical",
            75,
            "loss is NaN at step 75 <script>alert(1)</script>",
            tokens=76 * 1024,
            run=run,
            metric="train/loss",
            observed=float("nan"),
            phase="stable",
        )
    )
    st.log_event(40, "internal_error", "sink:wandb", "ConnectionError: W&B unreachable")
    st.close()
    return out


@pytest.fixture
def report_dir(tmp_path) -> Path:
    return make_store(tmp_path / "out")


def test_report_contents(report_dir):
    path = render_report(report_dir)
    assert path == report_dir / "report.html"
    text = path.read_text()
    # self-contained: nothing fetched from anywhere
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "<link" not in text and "@import" not in text
    # one capability chart per capability, task charts, indicators next to the loss
    for cap in CAPABILITIES:
        assert f'aria-label="{cap} · accuracy above chance, higher is better"' in text, cap
    for t in ("hellaswag", "gsm8k", "mmlu"):
        assert f"{t} · acc" in text
    for title in (
        "training loss",
        "gradient norm",
        "update / parameter ratio per group",
        "max attention logit per layer",
        "learning rate",
    ):
        assert f'aria-label="{title}' in text, title
    # expected bands and phase shading are drawn
    assert text.count("<title>expected band</title></polygon>") >= len(CAPABILITIES)
    assert "<title>phase warmup</title>" in text and "<title>phase decay</title>" in text
    # alerts table with explanations, escaped
    assert "capability_regression" in text and "fell below the expected band" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "<script>alert(1)" not in text
    table = text[text.index('<table id="alerts"') :]
    assert table.index("nonfinite_loss") < table.index("capability_regression")  # sorted by step
    # the What happened box (no injection recorded here) names the capability that left its band
    box = text[text.index('id="what-happened"') : text.index('<h2 id="alerts-h">')]
    assert (
        "math task gsm8k left its band at step 100" in box and "observed 0.42, expected 0.56" in box
    )
    # internal errors are listed; zero-only indicators are summarised, not charted
    assert "W&amp;B unreachable" in text
    assert "Zero throughout the run: non-finite losses" in text


def test_report_cli(report_dir, capsys):
    import argparse

    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    add_parser(sub)
    args = p.parse_args(["report", str(report_dir), "--output", str(report_dir / "r2.html")])
    assert args.func(args) == 0
    assert (report_dir / "r2.html").stat().st_size > 10_000
    args = p.parse_args(["report", str(report_dir / "nowhere")])
    assert args.func(args) == 2
    assert "no run store here" in capsys.readouterr().err
    args = p.parse_args(["report", str(report_dir), "--run", "nope"])
    assert args.func(args) == 2
    assert "runs here: report-run" in capsys.readouterr().err


def test_report_of_empty_run(tmp_path):
    st = RunStore(tmp_path / "run.db", "empty")
    st.start_run("empty", {}, {})
    st.close()
    text = render_report(tmp_path).read_text()
    assert "No probe rounds recorded" in text and "No alerts fired" in text


# ---- headless Chromium ---------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (Debian package chromium); .ci/run installs it")
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _png_pixels(path: Path):
    """Decode an 8-bit RGB(A) non-interlaced PNG (what Chromium writes) with zlib only."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and ctype in (2, 6) and interlace == 0
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, bpp, rows


@pytest.mark.e2e
def test_report_renders_in_chromium_without_errors(report_dir, tmp_path):
    path = render_report(report_dir)
    url = path.resolve().as_uri()
    # 1) console: Chromium logs JS exceptions and console.error to stderr with --enable-logging
    dom = _chromium(
        tmp_path,
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=3000",
        "--dump-dom",
        url,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    # 2) the page's own error trap saw nothing, and the script ran over all charts
    assert re.search(r'<pre id="js-errors" data-count="0">\s*</pre>', dom.stdout), dom.stdout[
        -1500:
    ]
    m = re.search(r'data-rendered="(\d+)"', dom.stdout)
    assert m and int(m.group(1)) >= 6 + 7 + 3, "inline script did not run over the charts"
    # 3) a real, non-blank render
    shot = tmp_path / "report.png"
    r = _chromium(
        tmp_path, "--window-size=1400,2200", "--hide-scrollbars", f"--screenshot={shot}", url
    )
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    w, h, bpp, rows = _png_pixels(shot)
    assert (w, h) == (1400, 2200)
    colours = set()
    dark = 0
    for y in range(0, h, 7):
        row = rows[y]
        for x in range(0, w, 5):
            px = row[x * bpp : x * bpp + 3]
            colours.add(px)
            dark += sum(px) < 200
    assert len(colours) > 50, f"only {len(colours)} distinct colours: blank page?"
    assert dark > 500, "almost no dark pixels: no text or axes rendered"
    keep = os.environ.get("FINELINE_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


@pytest.mark.e2e
def test_chromium_check_catches_a_broken_page(tmp_path):
    """The console check is not vacuous: a page with a JS error is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefinedFunction();</script><p>x</p></body></html>")
    dom = _chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", bad.as_uri())
    assert any("Uncaught" in line or "CONSOLE" in line for line in dom.stderr.splitlines()), (
        dom.stderr[-2000:]
    )
