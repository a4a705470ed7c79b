"""`import fineline_monitor` must stay cheap: no deepspeed, megatron, wandb, prometheus_client."""

import subprocess
import sys

HEAVY = ("deepspeed", "megatron", "wandb", "prometheus_client", "lightning", "lm_eval")


def _imported_after(code: str) -> set:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return {m.split(".")[0] for m in out}


def test_package_import_pulls_no_framework():
    mods = _imported_after("import fineline_monitor")
    assert not (set(HEAVY) & mods), sorted(set(HEAVY) & mods)


def test_core_is_free_of_torch():
    mods = _imported_after(
        "import fineline_monitor.core.config, fineline_monitor.core.store, "
        "fineline_monitor.core.types, fineline_monitor.core.cadence"
    )
    assert "torch" not in mods


def test_cli_parser_builds_without_frameworks():
    mods = _imported_after("from fineline_monitor.cli import build_parser; build_parser()")
    assert not (set(HEAVY) & mods), sorted(set(HEAVY) & mods)


def test_analyze_path_is_free_of_torch():
    """`fineline-monitor analyze` (parser + offline replay) never imports torch: it runs on
    machines without it and its time budget has no room for a 2-3 s import."""
    mods = _imported_after(
        "from fineline_monitor.cli import build_parser; build_parser()\n"
        "import fineline_monitor.analyze, fineline_monitor.probes.tasks, fineline_monitor.probes.metrics"
    )
    assert "torch" not in mods


def test_probes_package_names_resolve_lazily():
    mods = _imported_after(
        "from fineline_monitor.probes import ProbeRunner, DEFAULT_SUITE, HFScorer"
    )
    assert "torch" in mods  # the scorers do need it, once asked for
