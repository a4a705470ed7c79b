"""Every generated part of the docs equals what its renderer makes from its source now.

The parts are the blocks between `<!-- BEGIN GENERATED: name -->` and
`<!-- END GENERATED: name -->` in README.md and docs/*.md; `scripts/render_docs.py` holds
the renderers (benchmark JSON under docs/data/, or the MonitorConfig dataclasses). A figure
edited by hand, a benchmark re-run without re-rendering, or a config field changed without
re-rendering fails here, naming the page and the block.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _render_docs():
    spec = importlib.util.spec_from_file_location(
        "render_docs", REPO / "scripts" / "render_docs.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


render_docs = _render_docs()


def _all_blocks():
    return [
        (page, name, body)
        for page in render_docs.pages()
        if page.exists()
        for name, body in render_docs.blocks(page.read_text())
    ]


def test_every_generated_block_is_current():
    stale = render_docs.stale()
    assert not stale, f"stale generated docs (run `python scripts/render_docs.py`): {stale}"


def test_every_renderer_is_used_and_every_block_has_one():
    used = {name for _, name, _ in _all_blocks()}
    assert used, "no generated block found in README.md or docs/*.md"
    assert set(render_docs.RENDERERS) <= used, (
        f"renderers no page uses: {set(render_docs.RENDERERS) - used}"
    )
    assert used <= set(render_docs.RENDERERS), (
        f"blocks without a renderer: {used - set(render_docs.RENDERERS)}"
    )


@pytest.mark.parametrize(
    "name", sorted(n for n, (p, _) in render_docs.RENDERERS.items() if p and n.startswith("bench-"))
)
def test_benchmark_json_says_where_it_came_from(name):
    path, _ = render_docs.RENDERERS[name]
    data = json.loads((REPO / path).read_text())
    for key in ("benchmark", "command", "date", "machine", "figures"):
        assert data.get(key) not in (None, ""), f"{path}: `{key}` missing"
    assert data["command"].startswith("python benchmarks/"), data["command"]


def test_a_changed_figure_is_stale(tmp_path, monkeypatch):
    """The check compares figures, not just the presence of a block: change one number in a
    copy of a benchmark's JSON and the block rendered from the original is stale."""
    name = "bench-alert-quality"
    path, fn = render_docs.RENDERERS[name]
    data = json.loads((REPO / path).read_text())
    before = fn(data)
    data["figures"]["warnings_per_50_run_rounds"] += 0.5
    assert fn(data) != before
    copy = tmp_path / "bench.json"
    copy.write_text(json.dumps(data))
    monkeypatch.setitem(render_docs.RENDERERS, name, (str(copy), fn))
    assert any(s.endswith(f": {name}") for s in render_docs.stale())


def test_a_changed_fault_count_makes_the_reliability_table_stale(tmp_path, monkeypatch):
    """The fault table (recorded by the reliability tests, not a benchmark) is checked alike."""
    name = "fault-table"
    path, fn = render_docs.RENDERERS[name]
    data = json.loads((REPO / path).read_text())
    data["totals"]["faults injected"] += 1
    copy = tmp_path / "fault-table.json"
    copy.write_text(json.dumps(data))
    monkeypatch.setitem(render_docs.RENDERERS, name, (str(copy), fn))
    assert "docs/reliability.md: fault-table" in render_docs.stale()
