"""The FineLine W&B workspace, as code (wandb-workspaces).

Sections: alerts and loss, one section per capability (capability score with its expected
band, then each task's probe metrics), optimization-state indicators, monitor health.
Every key is one the W&B sink logs (fineline_monitor/sinks/wandb_sink.py); x axis tokens.

    python dashboards/wandb_workspace.py --entity ENTITY --project PROJECT [--save]

Without --save it only builds the workspace and prints its sections (no network); with --save
it creates the saved view in your project (needs WANDB_API_KEY).
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional

CAPABILITY_TASKS: Dict[str, List[str]] = {
    "commonsense": ["hellaswag", "piqa", "winogrande", "socialiqa", "csqa", "copa"],
    "knowledge": ["triviaqa", "naturalqs", "sciq", "openbookqa", "arc_easy"],
    "reading": ["boolq", "squad", "coqa", "drop"],
    "math": ["gsm8k", "minerva_math", "basic_skills_arithmetic"],
    "code": ["codex_humaneval", "codex_mbpp", "mt_mbpp", "basic_skills_coding"],
    "examination": ["mmlu", "arc_challenge"],
}
X = "train/tokens"


def build_workspace(entity: str, project: str, name: str = "FineLine monitor",
                    capabilities: Optional[Dict[str, List[str]]] = None):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    caps = capabilities or CAPABILITY_TASKS

    def line(title: str, ys: List[str], log_y: bool = False, regex: Optional[str] = None) -> "wr.LinePlot":
        kw = {"metric_regex": regex} if regex else {}
        return wr.LinePlot(title=title, x=X, y=ys, log_y=log_y or None, **kw)

    sections = [ws.Section(name="Loss and alerts", is_open=True, panels=[
        line("training loss", ["train/loss"]),
        line("loss z-score", ["train/loss_z"]),
        line("alerts fired", ["alerts/critical", "alerts/warning"]),
        line("training phase (0 warmup, 1 stable, 2 decay, 3 anneal, 4 rewarm)", ["train/phase_index"]),
        line("learning rate", ["train/lr"]),
    ])]
    for cap, tasks in caps.items():
        panels = [line(f"{cap}: score vs expected band", [f"capability/{cap}", f"capability/{cap}_expected",
                                                          f"capability/{cap}_low", f"capability/{cap}_high"])]
        for t in tasks:
            panels.append(line(f"{t} accuracy", [f"probe_{cap}/{t}/acc", f"probe_{cap}/{t}/acc_norm",
                                                 f"probe_{cap}/{t}/acc_expected", f"probe_{cap}/{t}/acc_low",
                                                 f"probe_{cap}/{t}/acc_high"]))
            panels.append(line(f"{t} gold bits per byte", [f"probe_{cap}/{t}/bpb"]))
        sections.append(ws.Section(name=f"Capability: {cap}", is_open=cap == "math", panels=panels))
    sections.append(ws.Section(name="Optimization-state indicators", is_open=True, panels=[
        line("gradient norm", ["optim/grad_norm"], log_y=True),
        line("update / parameter ratio", ["optim/update_ratio"], log_y=True),
        line("update ratio per group", [], log_y=True, regex=r"optim/update_ratio/.*"),
        line("parameter norm", ["optim/param_norm"]),
        line("max attention logit", ["stability/attn_logit_max"], log_y=True),
        line("max attention logit per layer", [], log_y=True, regex=r"stability/attn_logit_max/.*"),
        line("output logits", ["stability/output_logit_max", "stability/output_logsumexp_mean"]),
        line("grad RMS / Adam eps (min)", ["optim/grad_rms_over_eps_min"], log_y=True),
        line("activation RMS per layer", [], regex=r"stability/act_rms/.*"),
        line("non-finite losses / gradients", ["optim/nonfinite_loss", "optim/nonfinite_grad",
                                               "optim/skipped_steps"]),
        line("loss scale", ["optim/loss_scale"], log_y=True),
        line("Hessian trace", ["optim/hessian_trace"]),
    ]))
    sections.append(ws.Section(name="Monitor health", panels=[
        line("probe round seconds", ["monitor/probe_seconds"]),
        line("tokens/s: training and probes", ["train/tokens_per_s", "monitor/probe_tokens_per_s"]),
        line("monitor internal errors", ["fineline/internal_error"]),
    ]))
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections)


def panel_keys(workspace) -> List[str]:
    """Every metric key the workspace's panels plot (for the consistency test)."""
    keys: List[str] = []
    for sec in workspace.sections:
        for p in sec.panels:
            keys.extend(y if isinstance(y, str) else str(y) for y in (p.y or []))
    return keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entity", required=True)
    ap.add_argument("--project", default="fineline")
    ap.add_argument("--save", action="store_true", help="create the view in W&B (needs WANDB_API_KEY)")
    args = ap.parse_args()
    w = build_workspace(args.entity, args.project)
    for sec in w.sections:
        print(f"{sec.name}: {len(sec.panels)} panels")
    if args.save:
        w.save_as_new_view()
        print(w.url)


if __name__ == "__main__":
    main()
