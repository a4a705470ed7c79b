"""The Megatron-LM hook closes the monitor when the training script exits without calling
uninstall() (pretrain() just returns): the textfile exporter then says the run finished,
so the "training stalled" alert does not fire after a normal end. Megatron-LM's module is
a stand-in here (its hook logic is tested with megatron-core in tests/integration)."""

import subprocess
import sys
import textwrap

from _alert_helpers import REPO

SCRIPT = textwrap.dedent("""
    import sys, types
    from fineline_monitor import FineLineMonitor, MonitorConfig
    from fineline_monitor.integrations.megatron_lm import install
    training = types.SimpleNamespace(train_step=lambda *a, **k: None, training_log=lambda *a, **k: None)
    hook = install(training_module=training)
    cfg = MonitorConfig(run_name="mlm", out_dir=sys.argv[1], probe_every=0,
                        sinks={"enabled": ["prometheus"], "prometheus_mode": "textfile"})
    hook.monitor = FineLineMonitor(config=cfg)  # what the first train_step call builds
    hook.monitor.step(step=1, loss=2.0, tokens=4096, lr=1e-3)
    if sys.argv[2] == "uninstall":
        hook.uninstall()
    # else: the script ends, as pretrain_gpt.py does
""")


def _finished(tmp_path, how):
    out = tmp_path / how
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(out), how], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [l for l in (out / "metrics.prom").read_text().splitlines() if l.startswith("fineline_run_finished")]
    return lines


def test_monitor_closed_at_exit_without_uninstall(tmp_path):
    assert _finished(tmp_path, "exit") == ['fineline_run_finished{run="mlm"} 1.0']


def test_uninstall_closes_once(tmp_path):
    assert _finished(tmp_path, "uninstall") == ['fineline_run_finished{run="mlm"} 1.0']
