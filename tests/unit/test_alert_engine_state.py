"""Saved alert-engine states load across format versions and the engine carries on as if
it had never stopped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from _alert_helpers import make_round

from fineline_monitor.core.alerts import AlertEngine
from fineline_monitor.core.config import AlertConfig
from fineline_monitor.core.expectations import ReferenceCurves
from fineline_monitor.core.trajectory import Curve

DATA = Path(__file__).parent / "data"
CAPS = {"hellaswag": "commonsense", "piqa": "commonsense", "winogrande": "commonsense"}


def _reference(fix):
    r = fix["reference"]
    n = len(r["steps"])
    return ReferenceCurves(
        [
            Curve(
                source="pilot",
                model="small",
                params=1.0,
                task="piqa",
                metric="acc",
                steps=np.array(r["steps"]),
                tokens=np.array(r["tokens"]),
                values=np.array(r["values"]),
                stderr=np.full(n, np.nan),
            )
        ]
    )


def _source(eng, name):
    return next(s for s in eng.sources if s.name == name)


def _carry_on(eng, fix):
    out = []
    for rd in fix["rounds_after"]:
        gold = {t: {int(d): v for d, v in g.items()} for t, g in rd["gold"].items()}
        eng.observe_metrics(rd["step"], rd["tokens"], 3e-4, rd["metrics"])
        out += [
            {
                "step": a.step,
                "task": a.task,
                "metric": a.metric,
                "rule": a.rule,
                "severity": a.severity,
                "expected": a.expected,
            }
            for a in eng.observe_probe(
                make_round(rd["step"], rd["tokens"], rd["accs"], CAPS, gold=gold), {}
            )
        ]
    return out


def test_state_v2_loads_and_the_engine_carries_on_as_it_would_have():
    """A state saved by the v2 engine (window rows plus a dict of metadata per curve, rule
    book as lists; 30 rounds with a calibrated reference run and paired documents) loads,
    and the next 15 rounds (two tasks drop from the first of them) give the alerts and the
    expected values the uninterrupted v2 engine gave."""
    fix = json.loads((DATA / "alert_engine_state_v2.json").read_text())
    old = fix["state"]
    assert old["version"] == 2 and fix["alerts_after"]
    eng = AlertEngine(AlertConfig(), run="r", reference=_reference(fix))
    eng.load_state_dict(old)
    # what the v2 state kept per curve is where the sources look for it now
    piqa = next(m for m in old["meta"] if m["key"] == "probe/piqa/acc")
    cal = _source(eng, "reference").calibration["probe/piqa/acc"]
    assert piqa["offset"] is not None and (cal.offset, cal.scatter) == (
        piqa["offset"],
        piqa["s_cal"],
    )
    assert _source(eng, "paired").anchors == old["paired_anchor"] and old["paired_anchor"]
    assert [c.taken_off for c in eng.curves] == [m["taken"] for m in old["meta"]]
    eng.pop_expectations()
    got = _carry_on(eng, fix)
    want = fix["alerts_after"]
    assert [(a["step"], a["task"], a["metric"], a["rule"], a["severity"]) for a in got] == [
        (a["step"], a["task"], a["metric"], a["rule"], a["severity"]) for a in want
    ]
    assert np.allclose(
        [a["expected"] for a in got], [a["expected"] for a in want], rtol=1e-9, atol=1e-12
    )
    rows = [r for r in eng.pop_expectations() if r["name"].startswith("probe/")]
    want_rows = [r for r in fix["expectations_after"] if r["name"].startswith("probe/")]
    assert len(want_rows) >= 15 * 3
    assert [r["name"] for r in rows] == [r["name"] for r in want_rows]
    for f in ("expected", "low", "high"):
        assert np.allclose([r[f] for r in rows], [r[f] for r in want_rows], rtol=1e-9, atol=1e-12)


def test_state_v3_round_trips_and_carries_on_like_the_uninterrupted_engine():
    """Save (JSON) and load mid-run: the next rounds give what the engine that never
    stopped gives."""
    fix = json.loads((DATA / "alert_engine_state_v2.json").read_text())
    eng = AlertEngine(AlertConfig(), run="r", reference=_reference(fix))
    eng.load_state_dict(fix["state"])
    fix_half = dict(fix, rounds_after=fix["rounds_after"][:5])
    _carry_on(eng, fix_half)
    sd = json.loads(json.dumps(eng.state_dict()))
    assert sd["version"] == 3 and set(sd["sources"]) == {"own", "paired", "reference"}
    rest = dict(fix, rounds_after=fix["rounds_after"][5:])
    eng2 = AlertEngine(AlertConfig(), run="r", reference=_reference(fix))
    eng2.load_state_dict(sd)
    assert eng2.state_dict() == sd
    assert _carry_on(eng2, rest) == _carry_on(eng, rest)
