"""Reliability suite set-up: the fault table, and a tiny real model shared by the tests.

The fault table is the issue's "done when": every test here records what it tried
(faults injected, faults survived, bad inputs tried, store rows lost, hangs) through the
session-scoped `fault_table` fixture, *after* its assertions passed (a failing test
records nothing as survived, so the table cannot claim more than the tests proved). A
test that fails records nothing. At session end the table is written as markdown to
$FINELINE_FAULT_TABLE (default build/fault-table.md) and printed in the terminal summary;
with $FINELINE_FAULT_TABLE_JSON set, a green run of the whole suite also writes that JSON
(docs/data/fault-table.json), from which scripts/render_docs.py generates
docs/reliability.md's table.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ("faults injected", "faults survived", "bad inputs tried", "rows lost", "hangs")


@dataclass
class Row:
    area: str
    what: str
    happened: str
    injected: int = 0
    survived: int = 0
    bad_inputs: int = 0
    rows_lost: int = 0
    hangs: int = 0
    tests: List[str] = field(default_factory=list)


class FaultTable:
    """Rows keyed by (area, what); counts add up over the tests that share a row."""

    def __init__(self) -> None:
        self.rows: Dict[tuple, Row] = {}
        self._lock = threading.Lock()
        self.current_test = ""

    def record(
        self,
        area: str,
        what: str,
        happened: str,
        *,
        injected: int = 0,
        survived: int = 0,
        bad_inputs: int = 0,
        rows_lost: int = 0,
        hangs: int = 0,
    ) -> None:
        with self._lock:
            row = self.rows.setdefault((area, what), Row(area, what, happened))
            if happened not in row.happened.split(" / "):
                row.happened = f"{row.happened} / {happened}"
            row.injected += injected
            row.survived += survived
            row.bad_inputs += bad_inputs
            row.rows_lost += rows_lost
            row.hangs += hangs
            if self.current_test and self.current_test not in row.tests:
                row.tests.append(self.current_test)

    def totals(self) -> Dict[str, int]:
        rows = list(self.rows.values())
        return {
            "faults injected": sum(r.injected for r in rows),
            "faults survived": sum(r.survived for r in rows),
            "bad inputs tried": sum(r.bad_inputs for r in rows),
            "rows lost": sum(r.rows_lost for r in rows),
            "hangs": sum(r.hangs for r in rows),
        }

    def markdown(self) -> str:
        head = "| area | fault or bad input tried | what happened | " + " | ".join(COLUMNS) + " |"
        lines = [head, "|" + "---|" * (3 + len(COLUMNS))]
        for r in sorted(self.rows.values(), key=lambda r: (r.area, r.what)):
            lines.append(
                f"| {r.area} | {r.what} | {r.happened} | {r.injected} | {r.survived} | "
                f"{r.bad_inputs} | {r.rows_lost} | {r.hangs} |"
            )
        t = self.totals()
        lines.append("| **total** | | | " + " | ".join(f"**{t[c]}**" for c in COLUMNS) + " |")
        return "\n".join(lines) + "\n"


_TABLE = FaultTable()


@pytest.fixture(scope="session")
def fault_table() -> FaultTable:
    return _TABLE


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _TABLE.current_test = item.nodeid.split("::", 1)[-1]


def _table_path() -> Path:
    return Path(os.environ.get("FINELINE_FAULT_TABLE") or REPO / "build" / "fault-table.md")


_PASSED: List[str] = []
_KNOWN_GAPS: Dict[str, str] = {}  # strict xfails: node id -> what is known to be wrong


def pytest_runtest_logreport(report):
    if report.when != "call" or "tests/reliability/" not in report.nodeid.replace("\\", "/"):
        return
    if report.passed and not hasattr(report, "wasxfail"):
        _PASSED.append(report.nodeid)
    elif report.skipped and hasattr(report, "wasxfail"):
        _KNOWN_GAPS[report.nodeid.split("::", 1)[-1]] = report.wasxfail


def _write_json(path: Path) -> None:
    """The recorded run that docs/reliability.md is generated from (scripts/render_docs.py)."""
    import platform

    import torch

    doc = {
        "command": "FINELINE_FAULT_TABLE_JSON=docs/data/fault-table.json .venv/bin/pytest -q tests/reliability",
        "environment": f"torch {torch.__version__.split('+')[0]} CPU, gloo, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPU cores",
        "passed": len(_PASSED),
        "known_gaps": [{"test": k, "reason": v} for k, v in sorted(_KNOWN_GAPS.items())],
        "columns": list(COLUMNS),
        "rows": [
            {
                "area": r.area,
                "what": r.what,
                "happened": r.happened,
                "injected": r.injected,
                "survived": r.survived,
                "bad_inputs": r.bad_inputs,
                "rows_lost": r.rows_lost,
                "hangs": r.hangs,
                "tests": sorted(r.tests),
            }
            for r in sorted(_TABLE.rows.values(), key=lambda r: (r.area, r.what))
        ],
        "totals": _TABLE.totals(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")


def pytest_sessionfinish(session, exitstatus):
    if not _TABLE.rows:
        return
    json_path = os.environ.get("FINELINE_FAULT_TABLE_JSON")
    # Only a whole, green run of the suite may become the documented table: a failed or
    # partial (-k, one file) run would publish rows the other tests did not back.
    if (
        json_path
        and exitstatus == 0
        and not session.config.option.keyword
        and not session.config.option.markexpr
        and session.testsfailed == 0
    ):
        _write_json(Path(json_path))
    path = _table_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_TABLE.markdown())
    except OSError:  # a read-only checkout must not fail the run over a report file
        pass


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _TABLE.rows:
        return
    terminalreporter.section("fineline fault table (tests/reliability)")
    terminalreporter.write(_TABLE.markdown())
    terminalreporter.write_line(f"written to {_table_path()}")


# ---- a tiny real model and tokenizer ------------------------------------------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A stitch in time saves nine, and nine is more than three.",
    "def add(a, b):\n    return a + b\n",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The capital of France is Paris; the capital of Italy is Rome.",
    "If x = 3 and y = 4 then x + y = 7 and x * y = 12.",
    "She opened the door, looked outside, and saw the rain.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE trained here on a few sentences: no download, a second to build."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS * 4, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    return tok


def tiny_gpt2(vocab_size: int, seed: int = 0, n_positions: int = 64):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


@pytest.fixture(autouse=True)
def _few_threads():
    # The CI machine has 2 cores shared with other jobs; 1 thread keeps runs deterministic too.
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
