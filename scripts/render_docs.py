"""Generate the measured tables of the documentation from their recorded JSON.

A generated block sits between two markers in a markdown file:

    <!-- BEGIN GENERATED: fault-table -->
    ...
    <!-- END GENERATED: fault-table -->

    python scripts/render_docs.py           # rewrite every block from its JSON
    python scripts/render_docs.py --check   # exit 1 and name the stale blocks

RENDERERS maps a block's name to its JSON file and the function that renders it; add an
entry to generate another table. tests/unit/test_docs_generated.py fails when a block
differs from what its JSON renders.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = ("README.md", "docs/*.md")


def render_fault_table(doc: dict) -> str:
    cols = ("injected", "survived", "bad_inputs", "rows_lost", "hangs")
    lines = [f"Recorded with `{doc['command']}` ({doc['environment']}): {doc['passed']} tests passed.", "",
             "| area | fault or bad input tried | what happened | " + " | ".join(doc["columns"]) + " |",
             "|" + "---|" * (3 + len(cols))]
    for r in doc["rows"]:
        lines.append(f"| {r['area']} | {r['what']} | {r['happened']} | " + " | ".join(str(r[c]) for c in cols) + " |")
    t = doc["totals"]
    lines.append("| **total** | | | " + " | ".join(f"**{t[c]}**" for c in doc["columns"]) + " |")
    gaps = doc.get("known_gaps", [])
    if gaps:
        lines += ["", "Known gaps (strict xfails: such a test fails once its gap is fixed, and then becomes a plain test):"]
        lines += [f"- `{g['test']}`: {g['reason'].removeprefix('reason: ')}" for g in gaps]
    return "\n".join(lines)


# name -> (JSON file relative to the repository, render function)
RENDERERS: Dict[str, Tuple[str, Callable[[dict], str]]] = {
    "fault-table": ("docs/data/fault-table.json", render_fault_table),
}

_BLOCK = re.compile(r"(<!-- BEGIN GENERATED: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- END GENERATED: (?P=name) -->)",
                    re.S)


def render(name: str, repo: Path = REPO) -> str:
    path, fn = RENDERERS[name]
    return fn(json.loads((repo / path).read_text())).rstrip("\n") + "\n"


def doc_files(repo: Path = REPO) -> List[Path]:
    out: List[Path] = []
    for pattern in DOC_FILES:
        out += sorted(repo.glob(pattern))
    return out


def blocks(text: str) -> List[Tuple[str, str]]:
    """(name, body) of every generated block in a markdown text."""
    return [(m["name"], m["body"]) for m in _BLOCK.finditer(text)]


def regenerate(text: str, repo: Path = REPO) -> str:
    def sub(m):
        if m["name"] not in RENDERERS:
            raise KeyError(f"no renderer named {m['name']!r} (known: {', '.join(RENDERERS)})")
        return m.group(1) + render(m["name"], repo) + m.group(4)

    return _BLOCK.sub(sub, text)


def stale(repo: Path = REPO) -> List[str]:
    """'file: name' of every block whose text differs from what its JSON renders."""
    out = []
    for f in doc_files(repo):
        text = f.read_text()
        for name, body in blocks(text):
            if name not in RENDERERS or body != render(name, repo):
                out.append(f"{f.relative_to(repo)}: {name}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report stale blocks (exit 1 if any)")
    a = ap.parse_args(argv)
    if a.check:
        bad = stale()
        for b in bad:
            print(f"stale generated block: {b} (run python scripts/render_docs.py)")
        return 1 if bad else 0
    for f in doc_files():
        text = f.read_text()
        new = regenerate(text)
        if new != text:
            f.write_text(new)
            print(f"rewrote {f.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
