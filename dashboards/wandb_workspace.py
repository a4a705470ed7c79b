"""The FineLine W&B workspace, as code (wandb-workspaces).

Sections: alerts and loss, one section per capability (capability score with its expected
band, then each task's probe metrics), optimization-state indicators, monitor health.
Every key is a registered metric name (fineline_monitor/metric_names.py) as the W&B sink
logs it (fineline_monitor/sinks/wandb_sink.py); x axis tokens.

    python dashboards/wandb_workspace.py --entity ENTITY --project PROJECT [--save]

Without --save it only builds the workspace and prints its sections (no network); with --save
it creates the saved view in your project (needs WANDB_API_KEY).
"""

from __future__ import annotations

import argparse
import re
from typing import Dict, List, Optional

from fineline_monitor import metric_names as names

CAPABILITY_TASKS: Dict[str, List[str]] = {
    "commonsense": ["hellaswag", "piqa", "winogrande", "socialiqa", "csqa", "copa"],
    "knowledge": ["triviaqa", "naturalqs", "sciq", "openbookqa", "arc_easy"],
    "reading": ["boolq", "squad", "coqa", "drop"],
    "math": ["gsm8k", "minerva_math", "basic_skills_arithmetic"],
    "code": ["codex_humaneval", "codex_mbpp", "mt_mbpp", "basic_skills_coding"],
    "examination": ["mmlu", "arc_challenge"],
}
X = names.TOKENS


def build_workspace(
    entity: str,
    project: str,
    name: str = "FineLine monitor",
    capabilities: Optional[Dict[str, List[str]]] = None,
):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    caps = capabilities or CAPABILITY_TASKS

    def line(
        title: str, ys: List[str], log_y: bool = False, regex: Optional[str] = None
    ) -> "wr.LinePlot":
        unknown = [y for y in ys if not names.is_registered(y)]
        if unknown:
            raise ValueError(f"panel {title!r} plots keys the W&B sink never logs: {unknown}")
        kw = {"metric_regex": regex} if regex else {}
        return wr.LinePlot(title=title, x=X, y=ys, log_y=log_y or None, **kw)

    def per_item(metric: str) -> str:
        return re.escape(names.per_item(metric, "")) + ".*"

    sections = [
        ws.Section(
            name="Loss and alerts",
            is_open=True,
            panels=[
                line("training loss", [names.LOSS]),
                line("loss z-score", [names.LOSS_Z]),
                line(
                    "alerts fired",
                    [names.alert_count_key("critical"), names.alert_count_key("warning")],
                ),
                line(
                    "training phase (0 warmup, 1 stable, 2 decay, 3 anneal, 4 rewarm)",
                    [names.PHASE_INDEX],
                ),
                line("learning rate", [names.LR]),
            ],
        )
    ]
    for cap, tasks in caps.items():
        panels = []
        for series in (names.CAP_BPB, names.CAP_ACC):
            score = names.capability_series_key(cap, series)
            panels.append(
                line(
                    f"{cap}: {names.describe_capability_series(series)}, vs expected band",
                    [score, f"{score}_expected", f"{score}_low", f"{score}_high"],
                )
            )
        for t in tasks:
            acc, acc_norm, bpb = (f"probe_{cap}/{t}/{m}" for m in ("acc", "acc_norm", "bpb"))
            panels.append(
                line(
                    f"{t} accuracy", [acc, acc_norm, f"{acc}_expected", f"{acc}_low", f"{acc}_high"]
                )
            )
            panels.append(line(f"{t} gold bits per byte", [bpb]))
        sections.append(ws.Section(name=f"Capability: {cap}", is_open=cap == "math", panels=panels))
    sections.append(
        ws.Section(
            name="Optimization-state indicators",
            is_open=True,
            panels=[
                line("gradient norm", [names.GRAD_NORM], log_y=True),
                line("update / parameter ratio", [names.UPDATE_RATIO], log_y=True),
                line("update ratio per group", [], log_y=True, regex=per_item(names.UPDATE_RATIO)),
                line("parameter norm", [names.PARAM_NORM]),
                line("max attention logit", [names.ATTN_LOGIT_MAX], log_y=True),
                line(
                    "max attention logit per layer",
                    [],
                    log_y=True,
                    regex=per_item(names.ATTN_LOGIT_MAX),
                ),
                line("output logits", [names.OUTPUT_LOGIT_MAX, names.OUTPUT_LOGSUMEXP_MEAN]),
                line("grad RMS / Adam eps (min)", [names.GRAD_RMS_OVER_EPS_MIN], log_y=True),
                line("activation RMS per layer", [], regex=per_item(names.ACT_RMS)),
                line(
                    "non-finite losses / gradients",
                    [names.NONFINITE_LOSS, names.NONFINITE_GRAD, names.SKIPPED_STEPS],
                ),
                line("loss scale", [names.LOSS_SCALE], log_y=True),
                line("Hessian trace", [names.HESSIAN_TRACE]),
            ],
        )
    )
    sections.append(
        ws.Section(
            name="Monitor health",
            panels=[
                line("probe round seconds", [names.PROBE_SECONDS]),
                line(
                    "tokens/s: training and probes", [names.TOKENS_PER_S, names.PROBE_TOKENS_PER_S]
                ),
                line("monitor internal errors", [names.INTERNAL_ERROR]),
            ],
        )
    )
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
    ap.add_argument(
        "--save", action="store_true", help="create the view in W&B (needs WANDB_API_KEY)"
    )
    args = ap.parse_args()
    w = build_workspace(args.entity, args.project)
    for sec in w.sections:
        print(f"{sec.name}: {len(sec.panels)} panels")
    if args.save:
        w.save_as_new_view()
        print(w.url)


if __name__ == "__main__":
    main()
