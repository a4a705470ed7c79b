"""The Megatron-LM hook's wrapping logic, on megatron-core (Megatron-LM is not on PyPI).

A stand-in `training` module has `train_step` and `training_log` with the signatures of
megatron/training/training.py (NVIDIA/Megatron-LM main), and a `train()` loop that calls
them the way Megatron-LM's does (looked up on the module at call time, `iteration`
incremented before `training_log`). A real megatron-core GPTModel trains under TP=2 on
two gloo ranks; the hook must build the monitor from train_step's model/optimizer, step
it once per iteration from training_log, and probe on schedule."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ds_helpers as H  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = r"""
import sys, types, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/hooks")
out = sys.argv[2]
torch.set_num_threads(1)
import examples._common as C
C.init_cpu_distributed()
from fineline_monitor.integrations.megatron_cpu_patches import apply_megatron_cpu_patches
apply_megatron_cpu_patches()
from megatron.core import parallel_state as ps
ps.initialize_model_parallel(tensor_model_parallel_size=2)
from examples.megatron_core_pretrain import build_model, padded_vocab

# ---- stand-in for megatron.training.training (signatures of Megatron-LM main) ----
training = types.ModuleType("fake_megatron_training")
def train_step(forward_step_func, data_iterator, model, optimizer, opt_param_scheduler, config,
               forward_backward_func, iteration=None):
    optimizer.zero_grad(set_to_none=True)
    loss = forward_step_func(data_iterator, model[0])
    loss.backward()
    from fineline_monitor.integrations.megatron import tp_grad_norm
    grad_norm = tp_grad_norm(model)
    optimizer.step()
    return {"lm loss": loss.detach()}, 0, False, False, 0, grad_norm, None, None
calls = []
def training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale, report_memory_flag,
                 skipped_iter, grad_norm, params_norm, num_zeros_in_grad, max_attention_logit,
                 pg_collection=None, is_first_iteration=False):
    calls.append(iteration)
    return report_memory_flag
def train(forward_step_func, model, optimizer, data_iterator, train_iters):
    iteration = 0
    while iteration < train_iters:
        out = training.train_step(forward_step_func, data_iterator, model, optimizer, None, None, None,
                                  iteration=iteration)
        loss_dict, skipped_iter, _, _, _, grad_norm, nz, mal = out
        iteration += 1
        training.training_log(loss_dict, {}, optimizer.param_groups[0]["lr"], iteration, 1.0, True,
                              skipped_iter, grad_norm, None, nz, mal, pg_collection=None,
                              is_first_iteration=iteration == 1)
training.train_step, training.training_log, training.train = train_step, training_log, train

# ---- the user's pretrain script: two added lines ----
from megatron_lm import install as fineline_install
tok = C.tokenizer(__import__("pathlib").Path(out))
hook = fineline_install(C.monitor_config(__import__("pathlib").Path(out), 2, run_name="megatron-lm-hook"),
                        tokenizer=tok, training_module=training)

torch.manual_seed(0)
model = [build_model(padded_vocab(len(tok), 16), 2, 1, 256)]
optimizer = torch.optim.AdamW(model[0].parameters(), lr=3e-3)
data = C.batches(C.token_stream(tok), 4, 32)
mask = torch.triu(torch.ones(32, 32, dtype=torch.bool), 1)[None, None]
def forward_step(it, m):
    b = next(it)
    return m(b[:, :-1], torch.arange(32).unsqueeze(0).expand(4, -1), mask, labels=b[:, 1:]).float().mean()
training.train(forward_step, model, optimizer, data, 4)
assert calls == [1, 2, 3, 4], calls
assert hook.monitor is not None and not hook.monitor.monitor.disabled_parts, hook.monitor.monitor.disabled_parts
hook.uninstall()
assert training.train_step is train_step and training.training_log is training_log
if dist.get_rank() == 0:
    print("HOOK_OK")
"""


def test_megatron_lm_hook_wraps_train_step_and_training_log(tmp_path):
    script = tmp_path / "hook_run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    p = H.torchrun(str(script), [str(H.REPO), str(out)], timeout=200)
    assert p.returncode == 0, H.tail(p)
    assert "HOOK_OK" in p.stdout, H.tail(p)
    con = sqlite3.connect(out / "run.db")
    assert [r[0] for r in con.execute("select step from probe_rounds order by step")] == [1, 2, 4]
    loss_steps = [
        r[0] for r in con.execute("select step from metrics where name='train/loss' order by step")
    ]
    assert loss_steps == [1, 2, 3, 4]
    gn = [r[0] for r in con.execute("select value from metrics where name='optim/grad_norm'")]
    assert len(gn) == 4 and all(v > 0 for v in gn)
