"""The W&B workspace-as-code builds offline and plots only keys the W&B sink logs."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytest.importorskip("wandb_workspaces")

from fineline_monitor.sinks.wandb_sink import wandb_key  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location(
        "fl_wandb_workspace", REPO / "dashboards" / "wandb_workspace.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def logged_key_patterns(mod):
    """Keys the sink can log, as regexes: monitor names mapped by wandb_key plus the sink's own."""
    task_cap = {t: c for c, ts in mod.CAPABILITY_TASKS.items() for t in ts}
    pats = [
        r"train/(loss|loss_z|lr|tokens|tokens_per_s|step|phase_index)",
        r"alerts/(critical|warning|info)",
        r"optim/(grad_norm|param_norm|update_ratio|nonfinite_loss|nonfinite_grad|loss_scale|skipped_steps|"
        r"grad_rms_over_eps_min|hessian_trace)",
        r"stability/(attn_logit_max|output_logit_max|output_logsumexp_mean)",
        r"monitor/(probe_seconds|probe_tokens_per_s)",
        r"fineline/internal_error",
    ]
    for t in task_cap:
        k = re.escape(wandb_key(f"probe/{t}/X", task_cap)[:-1])
        pats.append(k + r"(acc|acc_norm|bpb)(_stderr|_expected|_low|_high)?")
    for c in mod.CAPABILITY_TASKS:
        pats.append(
            re.escape(f"capability/{c}/") + r"(bpb|acc_above_chance)(_expected|_low|_high)?"
        )
    return [re.compile(p + "$") for p in pats]


def test_workspace_builds_and_uses_only_logged_keys():
    mod = _load()
    w = mod.build_workspace("my-team", "fineline")
    names = [s.name for s in w.sections]
    assert names[0] == "Loss and alerts" and "Capability: math" in names and len(names) == 9
    keys = mod.panel_keys(w)
    pats = logged_key_patterns(mod)
    unknown = [k for k in keys if not any(p.match(k) for p in pats)]
    assert not unknown, unknown
    for sec in w.sections:
        for p in sec.panels:
            assert p.x == "train/tokens"
