"""The figures a benchmark measured, written as JSON for the docs' generated tables.

Every script in benchmarks/ takes `--json PATH` (default docs/data/bench-<name>.json) and
writes one object: which script, the machine it ran on, when, the exact command line,
the size it ran at, and its figures. `scripts/render_docs.py` turns these files into the
tables of docs/benchmarks.md, docs/alert-quality.md and docs/reliability-adjacent pages, so
a figure in the docs is always the one a benchmark wrote.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, Optional

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "docs" / "data"


def add_json_argument(parser, name: str) -> None:
    """`--json PATH`: where the figures go (default docs/data/bench-<name>.json); `--json ''` skips."""
    parser.add_argument(
        "--json",
        default=str(DATA_DIR / f"bench-{name}.json"),
        metavar="PATH",
        help=f"write the figures as JSON here (default docs/data/bench-{name}.json; '' skips)",
    )


def machine() -> Dict[str, Any]:
    """What the figures depend on: CPU count, platform, Python and torch versions, any GPU."""
    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # a benchmark without torch (alert quality) still records the machine
        info["torch"] = None
    return info


def write(
    path: Optional[str],
    name: str,
    figures: Dict[str, Any],
    *,
    size: str = "",
    argv: Optional[list] = None,
) -> Optional[Path]:
    """Write the figures of one run; `size` says when the run was smaller than the script's default."""
    if not path:
        return None
    argv = sys.argv if argv is None else argv
    rel = Path(argv[0]).resolve()
    try:
        script = str(rel.relative_to(REPO))
    except ValueError:
        script = argv[0]
    doc = {
        "benchmark": name,
        "command": " ".join(shlex.quote(a) for a in ["python", script, *argv[1:]]),
        "size": size,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "machine": machine(),
        "figures": figures,
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(f"figures written to {out}")
    return out
