"""The frozen profile fit of `lagged_detect` (a family of curvatures instead of one line)."""

import numpy as np

from fineline_monitor.core.expectations import lagged_detect


def _det(X, G, **kw):
    n, W = G.shape
    return lagged_detect(X, G, np.full((n, W), np.nan), np.isfinite(G), np.full(n, 1e-4), **kw)


def test_stall_is_detectable_where_the_window_pins_the_shape_down():
    """A curve growing steadily in log tokens stops growing for 3 rounds. The old line +
    growth_unc detector cannot reach 4 sigma by construction (z < 1/0.35); the profile
    fit, whose window rules out a saturating shape, sees it."""
    rng = np.random.default_rng(0)
    W, n = 24, 200
    x = np.log(np.geomspace(1e9, 1e11, W))
    sig = 0.003
    G = 0.3 + 0.15 * (x - x[0]) + rng.normal(0, sig, (n, W))  # 10 sigma per round of growth
    G[:, -3:] = (0.3 + 0.15 * (x[-4] - x[0])) + rng.normal(0, sig, (n, 3))  # stalled at round -4's level
    X = np.broadcast_to(x, G.shape).copy()
    new = _det(X, G)
    old = _det(X, G, shapes=None, F=8)
    assert np.mean(new.z[:, 2] < -4) > 0.9
    assert np.mean(old.z[:, 2] < -4) < 0.05  # (without noise z < 1/0.35 exactly)
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
    for rep in range(40):
        y = clean + rng.normal(0, 0.003, clean.size)
        for i in range(24, clean.size + 1, 2):
            rows.append(y[i - 24:i])
            xs.append(x_all[i - 24:i])
    G, X = np.array(rows), np.array(xs)
    d = _det(X, G)
    alarm = (d.z[:, 1:] < -4) & (d.zpt[:, 1:] < -1)
    assert alarm.any(1).mean() < 0.01
    # the straight line without its growth slack would page on this curve
    line = _det(X, G, shapes=None, F=10, growth_unc=0.0)
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
