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
        if should_probe(
            s, every=0, tokens=t, every_tokens=10_000, last_probe_tokens=last, at_start=False
        ):
            fired.append(t)
            last = t
    assert fired == [12000, 21000, 30000, 42000, 51000]


def test_collect():
    assert [s for s in range(25) if should_collect(s, 10)] == [0, 10, 20]
    assert not should_collect(5, 0)


def test_probe_budget_next_step_keeps_the_whole_run_within_budget():
    from fineline_monitor.core.cadence import probe_budget_next_step as nxt

    # within budget (1 s spent + a 1 s round <= 2% of 500 s): the round runs
    assert (
        nxt(
            1000,
            every=500,
            max_overhead=0.02,
            monitor_seconds=1.0,
            train_seconds=500.0,
            round_seconds=1.0,
            step_seconds=0.5,
        )
        is None
    )
    # a 60 s anchor round on 0.25 s steps: the next round waits until 120 s <= 2% of the
    # training time, i.e. 24,000 steps after the anchor: the first multiple of 500 past it
    step = nxt(
        500,
        every=500,
        max_overhead=0.02,
        monitor_seconds=60.0,
        train_seconds=125.0,
        round_seconds=60.0,
        step_seconds=0.25,
    )
    assert step == 24000
    train_then = 125.0 + (step - 500) * 0.25
    assert (60.0 + 60.0) / train_then <= 0.02 < (60.0 + 60.0) / (train_then - 500 * 0.25)
    # per-step indicator time eats into what each step earns: later, never earlier
    later = nxt(
        500,
        every=500,
        max_overhead=0.02,
        monitor_seconds=60.0,
        train_seconds=125.0,
        round_seconds=60.0,
        step_seconds=0.25,
        monitor_step_seconds=0.001,
    )
    assert later > step
    # indicators alone above the budget still leave rounds reachable (half a step's share)
    assert (
        nxt(
            500,
            every=500,
            max_overhead=0.02,
            monitor_seconds=60.0,
            train_seconds=125.0,
            round_seconds=60.0,
            step_seconds=0.25,
            monitor_step_seconds=1.0,
        )
        is not None
    )
    # token cadence (every=0): a plain step count, not rounded
    assert (
        nxt(
            10,
            every=0,
            max_overhead=0.5,
            monitor_seconds=1.0,
            train_seconds=0.0,
            round_seconds=1.0,
            step_seconds=1.0,
        )
        == 14
    )
    # budget off, or no round measured yet: no postponement
    assert (
        nxt(
            500,
            every=500,
            max_overhead=0.0,
            monitor_seconds=60.0,
            train_seconds=1.0,
            round_seconds=60.0,
            step_seconds=0.25,
        )
        is None
    )
    assert (
        nxt(
            500,
            every=500,
            max_overhead=0.02,
            monitor_seconds=0.0,
            train_seconds=1.0,
            round_seconds=0.0,
            step_seconds=0.25,
        )
        is None
    )


def test_should_probe_not_before():
    assert not should_probe(1000, every=500, not_before=1500, first_step=0)
    assert should_probe(1500, every=500, not_before=1500, first_step=0)
    # a postponed token-cadence round runs at not_before (the crossing happened meanwhile)
    assert should_probe(
        30, every=0, every_tokens=100, tokens=3000, last_probe_tokens=1000, not_before=30
    )
