"""Cut tests/data/trajectories-excerpt.csv.gz out of the shared reference trajectories.

The test suite ships this excerpt so that a plain clone runs every test that needs real
capability curves; benchmarks keep reading the whole table from ../shared by path.

    python scripts/make_trajectory_excerpt.py [--src ../shared/reference-trajectories/dev.csv.gz]

The excerpt keeps whole curves (every step) of a few runs and a few tasks, values unchanged,
in the same tidy format (source,model,params,step,tokens,task,metric,value,stderr). It is
deterministic: the same source table gives byte-identical output.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "reference-trajectories" / "dev.csv.gz"
OUT = REPO / "tests" / "data" / "trajectories-excerpt.csv.gz"
SIZE_LIMIT = 300_000

PYTHIA_SOURCE = "pythia-v1/0shot"
# one Pythia family at four sizes (standard, not deduped)
PYTHIA_MODELS = ("pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b-bf16")
PYTHIA_TASKS = (
    "arc_challenge",
    "arc_easy",
    "lambada_openai",
    "logiqa",
    "piqa",
    "sciq",
    "winogrande",
    "wsc",
)

OLMO_SOURCE = "allenai/OLMo@ladder-1xC:peteish-final-new"
# the whole 1x-Chinchilla ladder (one schedule, five sizes), and one long 10xC run whose
# curves have hundreds of points (the one-step-ahead and false-alarm tests need long curves)
OLMO_MODELS = tuple(
    f"olmo-ladder-final-{s}-1xC" for s in ("190M", "370M", "600M", "760M", "1B")
) + ("olmo-ladder-final-190M-10xC",)
# bpb curves on which benchmarks/alert_quality.py can inject a stall (the fit-floor test needs
# ten), and one evaluation reported under two names (commonsense_qa, csqa_rc_0shot)
OLMO_TASKS = (
    "arc_challenge_rc_0shot",
    "commonsense_qa",
    "csqa_rc_0shot",
    "hellaswag_rc_0shot",
    "hellaswag_rc_5shot",
    "mmlu_other_var",
    "mmlu_stem_var",
    "piqa_rc_0shot",
    "piqa_rc_5shot",
    "socialiqa_rc_5shot",
)


def keep(row: dict) -> bool:
    if row["source"] == PYTHIA_SOURCE:
        return row["model"] in PYTHIA_MODELS and row["task"] in PYTHIA_TASKS
    if row["source"] == OLMO_SOURCE:
        return row["model"] in OLMO_MODELS and row["task"] in OLMO_TASKS
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    if not a.src.exists():
        print(f"source table not found: {a.src}", file=sys.stderr)
        return 2
    buf = io.StringIO()
    with gzip.open(a.src, "rt", newline="") as f:
        r = csv.DictReader(f)
        w = csv.DictWriter(buf, fieldnames=r.fieldnames, lineterminator="\n")
        w.writeheader()
        for row in r:
            if keep(row):
                w.writerow(row)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same rows give the same bytes
    with open(a.out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as g:
        g.write(buf.getvalue().encode())
    for lic in sorted(a.src.parent.glob("LICENSE-*")):
        shutil.copyfile(lic, a.out.parent / lic.name)
    size = a.out.stat().st_size
    print(f"wrote {a.out} ({size} bytes)")
    if size > SIZE_LIMIT:
        print(f"excerpt is over {SIZE_LIMIT} bytes: keep fewer runs or tasks", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
