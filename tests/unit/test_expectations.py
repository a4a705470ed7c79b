"""Metric kinds and task tables, and the frozen-fit detector (`lagged_detect`) on synthetic and real curves."""

from dataclasses import replace

import numpy as np
from _alert_helpers import dev_path

from fineline_monitor.core.config import DetectorParams
from fineline_monitor.core.expectations import (
    ACC,
    LOSS,
    base_task,
    capability_for,
    chance_for,
    metric_kind,
)
from fineline_monitor.core.trajectory import read_trajectory


def test_metric_kinds_and_task_tables():
    assert (
        metric_kind("bpb") == LOSS and metric_kind("acc") == ACC and metric_kind("len_norm") == ACC
    )
    assert metric_kind("pct_stereotype") is None
    assert chance_for("piqa") == 0.5 and chance_for("arc_easy_rc_5shot") == 0.25
    assert (
        capability_for("hendrycksTest-anatomy") == "examination"
        and capability_for("piqa_rc_0shot") == "commonsense"
    )
    assert base_task("arc_easy_val_rc_5shot") == base_task("arc_easy") == "arc_easy"


def _lag_window(xs, ys, W=24):
    from fineline_monitor.core.expectations import lagged_detect

    X = np.full((1, W), np.nan)
    G = np.full((1, W), np.nan)
    n = len(xs)
    X[0, W - n :], G[0, W - n :] = xs, ys
    return lagged_detect(X, G, np.full((1, W), np.nan), np.isfinite(G), np.array([0.002]))


def test_lagged_detect_drop_stall_drift_and_healthy():
    """Frozen fits expose a sustained drop and a drift that a refitting one-step model
    would absorb; a healthy noisy curve stays within the band."""
    rng = np.random.default_rng(3)
    x = np.log(np.geomspace(1e9, 1e11, 24))  # evenly spaced in log tokens, 0.2 apart
    healthy = 0.3 + 0.02 * (x - x[0]) + rng.normal(0, 0.004, x.size)
    d = _lag_window(x, healthy)
    assert np.nanmin(d.z) > -4 and 0.003 < d.noise[0] < 0.006
    drop = healthy.copy()
    drop[-3:] -= 0.04  # 10 noise sigma, sustained for 3 rounds
    assert _lag_window(x, drop).z[0, 2] < -4
    # (stalls: see test_expectations_profile.py)
    drift = healthy - np.r_[np.zeros(21), 0.015 * np.arange(1, 4)]
    assert _lag_window(x, drift).z[0, 2] < -4
    # a lag-k verdict needs 5 fit points before the k judged ones
    z6 = _lag_window(x[:6], healthy[:6]).z[0]
    assert np.isfinite(z6[0]) and np.isnan(z6[1:]).all()
    assert np.isnan(_lag_window(x[:5], healthy[:5]).z).all()


def test_lagged_detect_real_curves_false_alarm_rate():
    """Healthy real OLMo ladder curves: the 3-round statistic rarely crosses 4 sigma."""
    from fineline_monitor.core.expectations import lagged_detect

    traj = read_trajectory(dev_path())
    curves = [
        c
        for c in traj.curves
        if c.metric in ("bpb", "len_norm") and "final" in c.source and len(c) > 60
    ][:60]
    hits = total = 0
    for c in curves:
        sgn = -1.0 if c.metric == "bpb" else 1.0
        x = np.log(c.tokens + 1)
        for i in range(30, len(c), 5):
            X = x[i - 24 : i][None]
            G = sgn * c.values[i - 24 : i][None]
            d = lagged_detect(
                X, G, np.full_like(X, np.nan), np.ones_like(X, bool), np.array([0.002])
            )
            total += 1
            hits += bool(d.z[0, 2] < -4 and d.zpt[0, 2] < -1)
    assert total > 500 and hits / total < 0.01


def test_local_noise_follows_the_local_slope_where_first_differences_do_not():
    """Early in a run a bpb curve falls fast and its slope changes every round; the
    local-line (in log tokens) residual scale must recover the true noise there, while
    detrended first differences (1.4826 MAD / sqrt 2, computed here) count the changing
    slope as noise."""
    from fineline_monitor.core.expectations import _local_noise, lagged_detect

    rng = np.random.default_rng(3)
    tokens = np.arange(1, 25) * 2e8
    x = np.log(tokens + 1.0)
    true_sigma = 0.003
    clean = 0.9 + 2.0 * (tokens / 2e8) ** -0.8  # steep, strongly curved start
    rows = [-(clean + rng.normal(0, true_sigma, size=clean.size)) for _ in range(200)]
    G = np.array(rows)
    X = np.broadcast_to(x, G.shape).copy()
    U = np.ones_like(G, dtype=bool)
    s_local, n = _local_noise(X, G, U)
    assert (n == 22).all()
    assert 0.6 * true_sigma < np.median(s_local) < 1.6 * true_sigma
    V = np.full(G.shape, np.nan)
    pre = G[:, :-3]  # the detector's noise reads the points before the 3 judged ones
    d = np.diff(pre, axis=1)
    dev = np.abs(d - np.median(d, axis=1)[:, None])
    first = 1.4826 * np.median(dev, axis=1) / np.sqrt(2.0)
    local = lagged_detect(
        X, G, V, U, np.zeros(len(G)), replace(DetectorParams(), max_calibration=0.0)
    ).noise
    assert np.median(first) > 2 * np.median(local)


def test_self_calibration_widens_the_band_only_for_wandering_curves():
    """A curve whose deviations are correlated over rounds (a slow wander on top of the
    trend) is judged with a wider sigma, capped at `max_calibration`; an iid-noise curve keeps its own."""
    from fineline_monitor.core.expectations import lagged_detect

    rng = np.random.default_rng(5)
    n, W = 300, 24
    x = np.log(np.arange(1, W + 1) * 1e9)
    trend = 0.05 * x
    iid = trend + rng.normal(0, 0.01, size=(n, W))
    walk = (
        trend
        + np.cumsum(rng.normal(0, 0.02, size=(n, W)), axis=1)
        + rng.normal(0, 0.01, size=(n, W))
    )
    X = np.broadcast_to(x, (n, W)).copy()
    U = np.ones((n, W), dtype=bool)
    V = np.full((n, W), np.nan)
    fl = np.zeros(n)
    for G in (iid, walk):
        off = lagged_detect(X, G, V, U, fl, replace(DetectorParams(), max_calibration=0.0)).noise
        on = lagged_detect(X, G, V, U, fl, replace(DetectorParams(), max_calibration=1.5)).noise
        ratio = np.median(on / off)
        assert (on >= off - 1e-12).all() and (on <= 1.5 * off + 1e-12).all()
        if G is iid:
            assert ratio < 1.1
        else:
            assert ratio > 1.3


def test_local_noise_is_consistent_and_resists_an_outlier():
    """The winsorised local-line scale estimates the noise sigma without bias on Gaussian
    noise around a curved trend, and one wild checkpoint barely moves it."""
    import numpy as np

    from fineline_monitor.core.expectations import _local_noise

    rng = np.random.default_rng(0)
    N, W, sigma = 4000, 24, 0.01
    X = np.log(np.arange(1, W + 1) * 1e9)[None, :].repeat(N, 0)
    trend = 0.3 + 0.05 * (X - X[:, :1])
    G = trend + sigma * rng.standard_normal((N, W))
    m = np.ones((N, W), dtype=bool)
    est, n = _local_noise(X, G, m)
    assert n.min() == W - 2
    assert abs(np.mean(est) / sigma - 1.0) < 0.05, np.mean(est) / sigma
    G2 = G.copy()
    G2[:, 10] += 50 * sigma  # one outlier checkpoint per curve (it enters 3 of 22 residuals)
    est2, _ = _local_noise(X, G2, m)
    # bounded influence: a plain RMS would grow ~10x, the clipped one stays within 2x
    assert np.median(est2 / est) < 2.0, np.median(est2 / est)
