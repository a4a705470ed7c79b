"""fp16 loss scaling with the real DeepSpeed engine (DeepSpeed runs fp16 only on an
accelerator): the first steps overflow at the huge initial scale, DeepSpeed skips them and
halves the scale; the monitor reports each skipped step and the engine's scale, one row
per optimizer step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (DeepSpeed fp16)"
    ),
]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
pytest.importorskip("deepspeed")

import _ds_helpers as H  # noqa: E402

from fineline_monitor import metric_names as names  # noqa: E402

STEPS = 8


def test_fp16_engine_skipped_steps_and_scale_reach_the_store(tmp_path):
    got = H.run_scaler_worker(tmp_path / "out", "fp16", STEPS, env={"CUDA_VISIBLE_DEVICES": "0"})
    eng = got["engine"]
    assert eng["fp16_enabled"]
    steps = eng["steps"]
    skipped_by_engine = {
        r["global_step"]
        for i, r in enumerate(steps)
        if r["skipped_steps"] > (steps[i - 1]["skipped_steps"] if i else 0)
    }
    assert skipped_by_engine, "a 2**32 initial scale must overflow at least once"
    stored = got["stored"]
    assert {s for s, v in stored[names.SKIPPED_STEPS].items() if v > 0} == skipped_by_engine
    for r in steps:
        assert stored[names.LOSS_SCALE][r["global_step"]] == r["loss_scale"], r
    scales = [r["loss_scale"] for r in steps]
    assert scales[-1] < scales[0], scales  # the scaler backed off
    H.check_one_row_per_optimizer_step(
        {
            "engine": {"steps": [r for r in steps if r["global_step"] not in skipped_by_engine]},
            "stored": stored,
        }
    )
