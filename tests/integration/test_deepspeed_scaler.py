"""Mixed precision with the real DeepSpeed engine on the CPU (gloo, one process): a bf16
engine has no loss scaler and skips no step, so the monitor stores no loss scale and no
skipped step, and steps once per optimizer step with the mean micro-batch loss and the
engine's gradient norm. (fp16 needs a GPU in DeepSpeed: tests/gpu/test_deepspeed_fp16_gpu.py;
the adapter's bookkeeping against a stand-in engine: tests/unit/test_deepspeed_step_unit.py.)"""

from __future__ import annotations

import pytest

pytest.importorskip("deepspeed")

import _ds_helpers as H  # noqa: E402

from fineline_monitor import metric_names as names  # noqa: E402

pytestmark = [pytest.mark.timeout(360)]

STEPS = 4


def test_bf16_engine_reports_no_scale_and_no_skipped_step(tmp_path):
    got = H.run_scaler_worker(tmp_path / "out", "bf16", STEPS)
    eng = got["engine"]
    assert eng["bf16_enabled"] and not eng["fp16_enabled"]
    assert [r["global_step"] for r in eng["steps"]] == list(range(1, STEPS + 1))
    assert all(r["skipped_steps"] == 0 for r in eng["steps"])
    assert sorted(got["stored"][names.LOSS]) == list(range(1, STEPS + 1))
    H.check_one_row_per_optimizer_step(got)
    assert got["stored"][names.LOSS_SCALE] == {}, "a bf16 engine has no loss scale to report"
    assert all(v == 0 for v in got["stored"][names.SKIPPED_STEPS].values()), got["stored"][
        names.SKIPPED_STEPS
    ]
