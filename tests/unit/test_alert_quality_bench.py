"""The alert-quality benchmark's own arithmetic: fault sizing where a fault lands."""

import sys

import numpy as np
from _alert_helpers import REPO

from fineline_monitor.core.trajectory import Curve

sys.path.insert(0, str(REPO / "benchmarks"))
import alert_quality as aq  # noqa: E402


def _curve(values):
    n = len(values)
    steps = np.arange(1, n + 1, dtype=np.int64) * 100
    return Curve(
        source="t",
        model="m",
        task="arc_easy",
        metric="acc",
        steps=steps,
        tokens=steps.astype(float) * 1e6,
        values=np.asarray(values, float),
        stderr=np.full(n, np.nan),
    )


def test_local_size_measures_the_deficit_in_local_noise_sigmas():
    rng = np.random.default_rng(0)
    n, t0 = 60, 30
    # noisy early, quiet late: the same absolute drop is small early and large late
    sd = np.where(np.arange(n) < t0 - 12, 0.03, 0.005)
    y = 0.3 + 0.002 * np.arange(n) + rng.normal(0, 1, n) * sd
    c = _curve(y)
    yf = y.copy()
    yf[t0:] -= 0.04
    fc = aq.head(c, t0 + 3, values=yf)
    size = aq.local_size(c, fc, t0)
    # 0.04 over a local sigma of ~0.005: ~8 sigmas (a MAD over 13 rounds is rough: 18 here);
    # over the whole-curve sigma (inflated by the noisy start) it is a few sigmas only
    assert 6.0 < size < 24.0
    assert 0.04 / aq.curve_noise(y) < size / 2
    assert aq.SIZE_LABELS[aq.size_bin(size)] in ("4-8", "8-16", ">= 16")
    assert aq.size_bin(3.9) == 0 and aq.size_bin(4.0) == 1 and aq.size_bin(16.0) == 3


def test_local_size_is_infinite_on_a_noiseless_curve():
    y = np.full(40, 0.45)
    c = _curve(y)
    yf = y.copy()
    yf[20:] -= 0.01
    assert aq.local_size(c, aq.head(c, 23, values=yf), 20) == float("inf")


def test_split_auto_is_heldout_on_the_dev_table_and_all_on_an_unseen_one():
    dev_like = [("pythia-v1/0shot", "pythia-70m"), ("pythia-v1/0shot", "pythia-410m")]
    unseen = [
        ("acme/pretrain", "acme-7B"),
        ("acme/pretrain", "acme-1B"),
    ]  # 1B: a held-out size name
    assert aq.resolve_split("auto", dev_like) == "heldout"
    assert aq.resolve_split("auto", unseen) == "all"
    assert aq.resolve_split("tune", unseen) == "tune"


def _write_table(path, model, n=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = ["source,model,params,step,tokens,task,metric,value,stderr"]
    for task, lo in (("arc_easy", 0.25), ("hellaswag", 0.25), ("piqa", 0.5), ("sciq", 0.25)):
        for i in range(n):
            step = 1000 * (i + 1)
            acc = lo + (0.8 - lo) / (1 + np.exp(-(np.log(step) - 9.5) * 2)) + rng.normal(0, 0.006)
            rows.append(
                f"acme/pretrain,{model},7e9,{step},{step * 4e6:.0f},{task},acc,{acc:.5f},0.006"
            )
    path.write_text("\n".join(rows) + "\n")


def test_benchmark_runs_on_an_unseen_table(tmp_path, capsys):
    p = tmp_path / "unseen.csv"
    _write_table(p, "acme-7B")
    assert (
        aq.main(["--data", str(p), "--faults-per-kind", "3", "--replay", "alone", "--json", ""])
        == 0
    )
    out = capsys.readouterr().out
    assert "split=all (auto): 1 of 1 runs" in out
    assert "healthy: 40 run-rounds" in out
    assert "fault drop : recall within 3 rounds" in out and "all faults: recall" in out


def test_benchmark_says_why_when_the_split_is_empty(tmp_path, capsys):
    p = tmp_path / "unseen.csv"
    _write_table(p, "acme-7B")
    assert aq.main(["--data", str(p), "--split", "heldout"]) == 2
    assert "no run of" in capsys.readouterr().err
