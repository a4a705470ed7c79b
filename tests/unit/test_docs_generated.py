"""The measured tables of the documentation are generated from recorded JSON
(scripts/render_docs.py): a table edited by hand, or a JSON re-recorded without rendering,
fails here."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _render_docs():
    spec = importlib.util.spec_from_file_location("render_docs", REPO / "scripts" / "render_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rd = _render_docs()


def test_every_generated_block_matches_its_json():
    assert rd.stale() == [], "run python scripts/render_docs.py"


@pytest.mark.parametrize("name", sorted(rd.RENDERERS))
def test_every_renderer_has_a_block_in_the_docs(name):
    where = [f for f in rd.doc_files() if name in dict(rd.blocks(f.read_text()))]
    assert where, f"no <!-- BEGIN GENERATED: {name} --> block in {rd.DOC_FILES}"


def test_a_changed_figure_makes_its_block_stale(tmp_path):
    """The check itself can fail: copy the docs, change one recorded count, expect staleness."""
    for rel in ["README.md", *(str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*") if p.is_file())]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes((REPO / rel).read_bytes())
    assert rd.stale(tmp_path) == []
    path = tmp_path / rd.RENDERERS["fault-table"][0]
    doc = json.loads(path.read_text())
    doc["totals"]["faults injected"] += 1
    path.write_text(json.dumps(doc))
    assert rd.stale(tmp_path) == ["docs/reliability.md: fault-table"]
