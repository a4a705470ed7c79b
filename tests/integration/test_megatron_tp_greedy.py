"""The TP greedy flag (local max + MAX/SUM all-reduce over the TP group, no logit gather)
equals the argmax of the full logits, on two gloo ranks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ds_helpers as H  # noqa: E402

pytestmark = [pytest.mark.integration]

SCRIPT = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
import examples._common as C
C.init_cpu_distributed()
from fineline_monitor.integrations.megatron_cpu_patches import apply_megatron_cpu_patches
apply_megatron_cpu_patches()
from megatron.core import parallel_state as ps
ps.initialize_model_parallel(tensor_model_parallel_size=2)
from examples.megatron_core_pretrain import build_model
from fineline_monitor.integrations.megatron import MegatronTokenScorer
torch.manual_seed(0)
m = build_model(64, 2, 1, 32)
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, 64, (3, 10), generator=g)
sc = MegatronTokenScorer(m)
lp, _ = sc.token_logprobs(ids, torch.zeros_like(ids))
# Full logits only for the check: gather the vocab shards of the output layer's output.
logits = []
h = m.output_layer.register_forward_hook(lambda mod, a, o: logits.append(o[0].detach()))
with torch.no_grad():
    m.eval(); m(ids, torch.arange(10).unsqueeze(0).expand(3, -1), torch.triu(torch.ones(10, 10, dtype=torch.bool), 1)[None, None])
h.remove()
parts = [torch.empty_like(logits[0]) for _ in range(2)]
dist.all_gather(parts, logits[0].contiguous())
full = torch.cat(parts, -1).transpose(0, 1)  # [b, s, V]
am = full.argmax(-1)
tg = am.clone(); tg[0, :5] = (am[0, :5] + 1) % 64  # half of row 0 not greedy
lp2, gr = sc.token_logprobs(ids, tg)
assert bool((gr == (am == tg)).all()), (gr, am == tg)
ref = torch.log_softmax(full.double(), -1).gather(-1, tg.unsqueeze(-1)).squeeze(-1)
assert (ref - lp2).abs().max().item() < 1e-5
if dist.get_rank() == 0:
    print("TPGREEDY_OK", int(gr.sum()), int(gr.numel()))
"""


def test_tp_greedy_matches_full_argmax(tmp_path):
    script = tmp_path / "tp_greedy.py"
    script.write_text(SCRIPT)
    p = H.torchrun(str(script), [str(H.REPO)], timeout=120)
    assert p.returncode == 0, H.tail(p)
    assert "TPGREEDY_OK 25 30" in p.stdout, H.tail(p)
