"""Pipeline parallelism on GPUs: megatron-core's forward-only schedule in the probe scorer.

megatron-core's pipeline schedules allocate on CUDA, so these run only with >= 2 GPUs
(NCCL). What they check:
  1. PP=2 example: trains through the 1F1B schedule, probes through the forward-only
     schedule (every stage joins every forward, only the last has losses), records;
  2. the PP=2 scorer's per-token log-probabilities and greedy flags, broadcast from the
     last stage, are the same on both stages and equal a PP=1 model with the same
     weights (stage state dicts merged, layers renumbered) within 1e-4.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
import _ds_helpers as H  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2,
        reason="pipeline parallelism needs >= 2 CUDA devices (megatron's schedules are CUDA-only)",
    ),
]

ENV = {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(2))}


def test_pp2_example_trains_probes_records(tmp_path):
    out = tmp_path / "pp2"
    p = H.torchrun(
        "examples/megatron_core_pretrain.py",
        ["--tp", "1", "--pp", "2", "--steps", "4", "--probe-every", "2", "--out", str(out)],
        timeout=300,
        env=ENV,
    )
    assert p.returncode == 0, H.tail(p)
    assert "disabled={}" in p.stdout, H.tail(p)
    # the loss owner (last stage) writes the store
    con = sqlite3.connect(out / "run.db")
    assert [r[0] for r in con.execute("select step from probe_rounds order by step")] == [1, 2, 4]


SCRIPT = r"""
import datetime, os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
local = int(os.environ["LOCAL_RANK"]); torch.cuda.set_device(local)
dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=120))
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from examples.megatron_core_pretrain import build_model
from fineline_monitor.integrations.megatron import MegatronTokenScorer
ps.initialize_model_parallel(pipeline_model_parallel_size=2); model_parallel_cuda_manual_seed(0)
torch.manual_seed(0)
m = build_model(128, 1, 2, 64).cuda()
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, 128, (5, 16), generator=g); tg = torch.randint(0, 128, (5, 16), generator=g)
lp, gr = MegatronTokenScorer(m, micro_batch_size=2).token_logprobs(ids, tg)
both = [None, None]; dist.all_gather_object(both, (lp, gr))
assert torch.equal(both[0][0], both[1][0]) and torch.equal(both[0][1], both[1][1])
sds = [None, None]; dist.all_gather_object(sds, {k: v.cpu() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)})
n0 = len(m.decoder.layers) if ps.is_pipeline_first_stage() else None
n0s = [None, None]; dist.all_gather_object(n0s, n0)
merged = dict(sds[0])
for k, v in sds[1].items():
    if k.startswith("decoder.layers."):
        i, rest = k[len("decoder.layers."):].split(".", 1)
        k = f"decoder.layers.{int(i) + n0s[0]}.{rest}"
    merged[k] = v
ps.destroy_model_parallel(); ps.initialize_model_parallel(); model_parallel_cuda_manual_seed(0)
full = build_model(128, 1, 1, 64).cuda()
res = full.load_state_dict(merged, strict=False); assert not res.unexpected_keys, res
lp1, gr1 = MegatronTokenScorer(full).token_logprobs(ids, tg)
assert (lp1 - lp).abs().max().item() < 1e-4, (lp1 - lp).abs().max()
assert torch.equal(gr1, gr)
if dist.get_rank() == 0:
    print("PP_OK")
"""


def test_pp2_scorer_equals_pp1_same_weights(tmp_path):
    script = tmp_path / "pp_check.py"
    script.write_text(SCRIPT)
    p = H.torchrun(str(script), [str(H.REPO)], timeout=300, env=ENV)
    assert p.returncode == 0, H.tail(p)
    assert "PP_OK" in p.stdout, H.tail(p)
