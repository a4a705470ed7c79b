"""Expectation sources: a new one is one registered class, and the engine uses it."""

from __future__ import annotations

import json

import pytest
from _alert_helpers import make_round

from fineline_monitor.core.alerts import AlertEngine
from fineline_monitor.core.config import AlertConfig
from fineline_monitor.core.sources import SOURCES, ExpectationSource, Verdict, register_source

CAPS = {"piqa": "commonsense"}


@pytest.fixture
def ceiling_source():
    """A source that expects every bpb curve at or below a fixed ceiling (what a team might
    know from an earlier run), counting the rounds it judged."""

    @register_source
    class BpbCeiling(ExpectationSource):
        name = "bpb_ceiling"
        takes_over = "always"

        def __init__(self, ceiling: float):
            self.ceiling = ceiling
            self.judged = 0

        @classmethod
        def build(cls, ctx):
            return cls(1.0)

        def evaluate(self, block, so_far, open_):
            out = Verdict.empty(len(block))
            for i, c in enumerate(block.curves):
                if c.metric == "bpb" and block.eligible[i] and open_[i]:
                    out.has[i] = True
                    out.expected[i], out.low[i], out.high[i] = self.ceiling, 0.0, self.ceiling
                    out.z[i] = (self.ceiling - block.y[i]) / 0.01
                    out.bad[i] = block.y[i] > self.ceiling
                    self.judged += 1
            return out

        def describe(self, verdict, i):
            return f"bpb ceiling {self.ceiling:g}"

        def state_dict(self):
            return {"judged": self.judged}

        def load_state_dict(self, sd):
            self.judged = int(sd.get("judged", 0))

    try:
        yield BpbCeiling
    finally:
        SOURCES.pop(BpbCeiling.name, None)


def _feed(eng, bpbs):
    out = []
    for r, b in enumerate(bpbs, start=1):
        rnd = make_round(r * 100, r * 10**8, {"piqa": 0.3}, CAPS, bpb={"piqa": b})
        out.append(eng.observe_probe(rnd, {}))
    return out


def test_a_registered_source_is_used_by_the_engine(ceiling_source):
    """Four rounds are too few for the own-run fit: without the new source nothing is
    judged; with it, bpb above the ceiling fires after `hysteresis` rounds, the alert
    names the source, and its state is in the engine's state_dict."""
    eng = AlertEngine(AlertConfig(), run="r")
    assert [s.name for s in eng.sources][-1] == "bpb_ceiling"
    fired = _feed(eng, [1.5, 1.4, 1.35, 1.3])
    first = next(i for i, f in enumerate(fired) if f)
    assert first == 1  # hysteresis 2: the second bad round
    a = fired[first][0]
    assert a.metric == "bpb" and a.expected == 1.0 and "bpb ceiling 1" in a.message
    assert sum(len(f) for f in fired[first + 1 :]) == 0  # de-duplicated like any capability rule
    sd = json.loads(json.dumps(eng.state_dict()))
    assert sd["sources"]["bpb_ceiling"] == {"judged": 4}
    eng2 = AlertEngine(AlertConfig(), run="r")
    eng2.load_state_dict(sd)
    assert eng2.sources[-1].judged == 4

    SOURCES.pop("bpb_ceiling")
    without = AlertEngine(AlertConfig(), run="r")
    assert sum(len(f) for f in _feed(without, [1.5, 1.4, 1.35, 1.3])) == 0


def test_a_source_must_say_its_name_and_how_it_takes_over():
    class Nameless(ExpectationSource):
        pass

    with pytest.raises(ValueError, match="name"):
        register_source(Nameless)

    class Odd(ExpectationSource):
        name = "odd"
        takes_over = "sometimes"

    with pytest.raises(ValueError, match="takes_over"):
        register_source(Odd)
    assert "odd" not in SOURCES


def test_built_in_sources_in_order():
    eng = AlertEngine(AlertConfig(), run="r")
    assert [s.name for s in eng.sources] == ["own", "paired"]  # no reference run configured
    own = eng.sources[0]
    assert own.sustained and not own.per_round  # the base verdict: whole blocks at once


def test_docs_list_the_detector_settings_as_the_code_has_them():
    """docs/alerts-engine.md's settings table is `detector_markdown()`; regenerate it when a
    DetectorParams field changes."""
    from pathlib import Path

    from fineline_monitor.core.config import detector_markdown

    doc = (Path(__file__).resolve().parents[2] / "docs" / "alerts-engine.md").read_text()
    assert detector_markdown() in doc, (
        "docs/alerts-engine.md: paste detector_markdown() into Detector settings"
    )
