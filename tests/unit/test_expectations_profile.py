"""The frozen profile fit of `lagged_detect` (a family of curvatures instead of one line)."""

from dataclasses import replace

import numpy as np

from fineline_monitor.core.config import DetectorParams
from fineline_monitor.core.expectations import lagged_detect


def _det(X, G, **params):
    n, W = G.shape
    return lagged_detect(
        X,
        G,
        np.full((n, W), np.nan),
        np.isfinite(G),
        np.full(n, 1e-4),
        replace(DetectorParams(), **params),
    )


def test_stall_is_detectable_where_the_window_pins_the_shape_down():
    """A curve growing steadily in log tokens stops growing for 3 rounds: the profile fit,
    whose window rules out a saturating shape, sees it."""
    rng = np.random.default_rng(0)
    W, n = 24, 200
    x = np.log(np.geomspace(1e9, 1e11, W))
    sig = 0.003
    G = 0.3 + 0.15 * (x - x[0]) + rng.normal(0, sig, (n, W))  # 10 sigma per round of growth
    G[:, -3:] = (0.3 + 0.15 * (x[-4] - x[0])) + rng.normal(
        0, sig, (n, 3)
    )  # stalled at round -4's level
    X = np.broadcast_to(x, G.shape).copy()
    new = _det(X, G)
    assert np.mean(new.z[:, 2] < -4) > 0.9
    healthy = G.copy()
    healthy[:, -3:] = 0.3 + 0.15 * (x[-3:] - x[0]) + rng.normal(0, sig, (n, 3))
    assert np.mean(_det(X, healthy).z[:, 2] < -4) < 0.05
    # level_last is the fit at its own last point; the stall holds it
    assert np.median(np.abs(new.level_last - G[:, -4])) < 2 * sig


def test_healthy_saturating_curve_does_not_alarm():
    """An early, strongly curved power-law bpb curve (signed: higher is better) with iid
    noise: the line would over-extrapolate the gain; the profile keeps the saturating shape."""
    rng = np.random.default_rng(1)
    t = np.arange(1, 60) * 2e8
    clean = -(0.9 + 2.0 * (t / 2e8) ** -0.8)
    rows, xs = [], []
    x_all = np.log(t + 1.0)
    for _ in range(40):
        y = clean + rng.normal(0, 0.003, clean.size)
        for i in range(24, clean.size + 1, 2):
            rows.append(y[i - 24 : i])
            xs.append(x_all[i - 24 : i])
    G, X = np.array(rows), np.array(xs)
    d = _det(X, G)
    alarm = (d.z[:, 1:] < -4) & (d.zpt[:, 1:] < -1)
    assert alarm.any(1).mean() < 0.01
    # the straight line alone (no gain uncertainty) would page on this curve
    line = _det(X, G, shapes=(0.0,), shape_gain_uncertainty=0.0)
    assert ((line.z[:, 1:] < -4) & (line.zpt[:, 1:] < -1)).any(1).mean() > alarm.any(1).mean()


def test_profile_is_never_more_alarming_than_the_plausible_line():
    """The line is one of the shapes; where it is plausible (nearly always on a straight
    curve), the profile's verdict is at most as alarming as the line's (an alarm needs
    every plausible shape to agree)."""
    rng = np.random.default_rng(2)
    W, n = 24, 300
    x = np.log(np.geomspace(1e9, 1e11, W))
    G = 0.02 * (x - x[0]) + rng.normal(0, 0.004, (n, W))
    G[:, -2:] -= rng.uniform(0, 0.05, (n, 1))
    X = np.broadcast_to(x, G.shape).copy()
    # same sigma for both (no fit-residual floor, which depends on the best shape's SSE)
    prof = _det(X, G, fit_floor=0.0)
    line = _det(X, G, shapes=(0.0,), fit_floor=0.0)
    ok = np.isfinite(line.z)
    # on a straight curve the line is plausible in almost every window
    assert np.mean(prof.z[ok] >= line.z[ok] - 1e-9) > 0.97


def test_fit_floor_below_one_uncovers_stalls_on_real_curves():
    """Stalls injected (the benchmark's own injector) into the curves of three short real
    OLMo runs after a steep start: with the misfit floor at the full residual scatter of
    the shapes (fit_floor=1) the two-parameter shapes' misfit on a steep start
    widens the band past the stall; the default (0.75) catches more of them, and the
    healthy originals stay as quiet."""
    import random
    import sys

    from _alert_helpers import REPO, dev_path

    from fineline_monitor.analyze import replay_run
    from fineline_monitor.core.config import AlertConfig
    from fineline_monitor.core.trajectory import read_trajectory

    sys.path.insert(0, str(REPO / "benchmarks"))
    import alert_quality as aq

    traj = read_trajectory(str(dev_path()))
    models = (
        "olmo-ladder-final-190M-1xC",
        "olmo-ladder-final-600M-1xC",
        "olmo-ladder-final-760M-1xC",
    )
    runs = {k: v for k, v in traj.runs().items() if k[1] in models}
    assert len(runs) == len(models)
    curves = sorted(
        (c for cs in runs.values() for c in cs), key=lambda c: (c.model, c.task, c.metric)
    )
    faults = []
    rng = random.Random(0)
    for c in curves:
        got = aq.inject(c, "stall", rng)
        if got is not None:
            faults.append(got)
    assert len(faults) >= 10

    def caught_and_healthy_alerts(cfg):
        caught = 0
        for fc, t0 in faults:
            alerts, _ = replay_run([fc], cfg)
            steps = fc.steps.tolist()
            caught += any(a.step in steps and t0 <= steps.index(a.step) <= t0 + 2 for a in alerts)
        healthy = sum(len(replay_run(cs, cfg)[0]) for cs in runs.values())
        return caught, healthy

    caught, healthy = caught_and_healthy_alerts(AlertConfig())
    caught_full, healthy_full = caught_and_healthy_alerts(AlertConfig(detector={"fit_floor": 1.0}))
    assert caught > caught_full
    assert healthy <= healthy_full + 1


def test_backtest_all_positions_at_once_equals_fitting_each_position():
    """The back-test (`_backtest_z`, all positions at once) against fitting each position in turn:
    for every column j in [F, W-K), a line through the last F usable points before j."""
    from fineline_monitor.core.expectations import _backtest_z, _fit_mask

    rng = np.random.default_rng(5)
    N, W, F, K, min_fit = 400, 48, 10, 3, 5
    X = np.sort(rng.uniform(20, 24, (N, W)), axis=1)
    X[::7] = 21.0  # flat x: the slope is 0 there
    G = 0.3 + 0.05 * (X - 20) + rng.normal(0, 0.01, (N, W))
    ok = rng.random((N, W)) > 0.2
    ok[::5, :30] = False  # short histories
    noise = rng.uniform(0.005, 0.02, N)
    want = np.full((N, W), np.nan)
    for j in range(F, W - K):
        fm, n = _fit_mask(ok, j, F)
        nn = np.maximum(n, 1.0)
        xb = np.where(fm, X, 0.0).sum(1) / nn
        yb = np.where(fm, G, 0.0).sum(1) / nn
        dx = np.where(fm, X - xb[:, None], 0.0)
        sxx = (dx * dx).sum(1)
        flat = sxx <= 1e-12
        b = np.where(
            flat, 0.0, (dx * np.where(fm, G - yb[:, None], 0.0)).sum(1) / np.where(flat, 1.0, sxx)
        )
        e = G[:, j] - (yb + b * (X[:, j] - xb))
        lev = 1.0 / nn + np.where(flat, 0.0, (X[:, j] - xb) ** 2 / np.where(flat, 1.0, sxx))
        want[:, j] = np.where(
            ok[:, j] & (n >= min_fit), np.minimum(e, 0.0) / (noise * np.sqrt(1.0 + lev)), np.nan
        )
    got = _backtest_z(X, G, ok, noise, F=F, K=K, min_fit=min_fit)
    assert np.array_equal(np.isfinite(got), np.isfinite(want))
    assert np.isfinite(want).sum() > N * 10
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=0, atol=1e-9)
