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
    return Curve(source="t", model="m", task="arc_easy", metric="acc", steps=steps,
                 tokens=steps.astype(float) * 1e6, values=np.asarray(values, float), stderr=np.full(n, np.nan))


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
