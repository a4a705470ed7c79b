from fineline_monitor.core.cadence import should_collect, should_probe


def test_step_cadence_with_start_anchor():
    fired = [s for s in range(0, 101) if should_probe(s, every=25, first_step=0)]
    assert fired == [0, 25, 50, 75, 100]
    fired = [s for s in range(0, 101) if should_probe(s, every=25, first_step=0, at_start=False)]
    assert fired == [25, 50, 75, 100]


def test_resumed_run_anchors_on_its_first_step_only_when_asked():
    assert should_probe(37, every=25, first_step=37)
    assert not should_probe(38, every=25, first_step=37)


def test_token_cadence_fires_on_crossing_not_equality():
    tokens = [i * 3000 for i in range(1, 20)]
    last = None
    fired = []
    for s, t in enumerate(tokens, start=1):
        if should_probe(s, every=0, tokens=t, every_tokens=10_000, last_probe_tokens=last, at_start=False):
            fired.append(t)
            last = t
    assert fired == [12000, 21000, 30000, 42000, 51000]


def test_collect():
    assert [s for s in range(25) if should_collect(s, 10)] == [0, 10, 20]
    assert not should_collect(5, 0)


def test_budgeted_interval_keeps_probe_share_under_budget():
    from fineline_monitor.core.cadence import budgeted_interval

    # cheap rounds: the configured cadence stands
    assert budgeted_interval(500, round_seconds=1.0, step_seconds=1.0, max_overhead=0.02) == 500
    # a 60 s round on 0.25 s steps needs 12,000 steps for 2%: the next multiple of 500
    iv = budgeted_interval(500, round_seconds=60.0, step_seconds=0.25, max_overhead=0.02)
    assert iv == 12000 and 60.0 / (iv * 0.25) <= 0.02
    iv = budgeted_interval(500, round_seconds=61.0, step_seconds=0.25, max_overhead=0.02)
    assert iv == 12500 and 61.0 / (iv * 0.25) <= 0.02
    # budget off, or no timing yet: the fixed cadence
    assert budgeted_interval(500, 60.0, 0.25, 0.0) == 500
    assert budgeted_interval(500, 60.0, 0.0, 0.02) == 500
    assert budgeted_interval(0, 60.0, 0.25, 0.02) == 0
