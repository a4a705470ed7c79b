"""Shared test set-up: keep torch to a couple of threads on the 2-core CI machine, and
give tests the path of the shared reference trajectories (skipped cleanly when absent)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRAJ = REPO.parent / "shared" / "reference-trajectories" / "dev.csv.gz"


@pytest.fixture(scope="session")
def reference_trajectories() -> Path:
    path = Path(os.environ.get("FINELINE_REFERENCE_TRAJ", DEFAULT_TRAJ))
    if not path.exists():
        pytest.skip(f"reference trajectories not found at {path} (set FINELINE_REFERENCE_TRAJ); "
                    "they live in ../shared and are never copied into the repository")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
