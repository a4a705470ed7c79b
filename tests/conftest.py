"""Shared test set-up: keep torch to a couple of threads on the 2-core CI machine, and
give tests the path of the excerpt of real trajectories the repository ships in tests/data."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
TRAJECTORY_EXCERPT = REPO / "tests" / "data" / "trajectories-excerpt.csv.gz"


@pytest.fixture(scope="session")
def reference_trajectories() -> Path:
    """10 public runs (Pythia, OLMo ladder); see tests/data/README.md."""
    return TRAJECTORY_EXCERPT


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
