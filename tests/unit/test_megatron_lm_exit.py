"""The Megatron-LM hook closes the monitor when the training script exits without calling
uninstall() (pretrain() just returns): the textfile exporter then says the run finished,
so the "training stalled" alert does not fire after a normal end. A script that dies of
an uncaught exception is not marked finished (that alert is the page for a dead job).
Megatron-LM's module is a stand-in here (its hook logic is tested with megatron-core in
tests/integration)."""

import subprocess
import sys
import textwrap

from _alert_helpers import REPO

SCRIPT = textwrap.dedent("""
    import sys, types
    from pathlib import Path
    from fineline_monitor import FineLineMonitor, MonitorConfig
    from fineline_monitor.integrations.megatron_lm import install
    training = types.SimpleNamespace(train_step=lambda *a, **k: None, training_log=lambda *a, **k: None)
    hook = install(training_module=training)
    cfg = MonitorConfig(run_name="mlm", out_dir=sys.argv[1], probe_every=0,
                        sinks={"enabled": ["prometheus"], "prometheus_mode": "textfile"})
    from fineline_monitor.integrations._wrapper import MonitorPassThrough

    class Adapter(MonitorPassThrough):  # the first train_step call builds a MegatronMonitor: an adapter
        def __init__(self, monitor):
            self.monitor = monitor

        def step(self, **kw):
            return self.monitor.step(**kw)

    hook.monitor = Adapter(FineLineMonitor(config=cfg))
    hook.monitor.step(step=1, loss=2.0, tokens=4096, lr=1e-3)
    if sys.argv[2] == "uninstall":
        hook.uninstall()
        print("BEFORE EXIT", [l for l in (Path(sys.argv[1]) / "metrics.prom").read_text().splitlines()
                              if l.startswith("fineline_run_finished")])
    elif sys.argv[2] == "crash":
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    # else: the script ends, as pretrain_gpt.py does
""")


def _run(tmp_path, how):
    out = tmp_path / how
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out), how],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    finished = [
        line
        for line in (out / "metrics.prom").read_text().splitlines()
        if line.startswith("fineline_run_finished")
    ]
    return r, finished


def test_monitor_closed_at_exit_without_uninstall(tmp_path):
    r, finished = _run(tmp_path, "exit")
    assert r.returncode == 0, r.stderr
    assert finished == ['fineline_run_finished{run="mlm"} 1.0']


def test_uninstall_closes_before_the_script_ends(tmp_path):
    r, finished = _run(tmp_path, "uninstall")
    assert r.returncode == 0, r.stderr
    assert """BEFORE EXIT ['fineline_run_finished{run="mlm"} 1.0']""" in r.stdout


def test_a_crashed_script_is_not_marked_finished(tmp_path):
    r, finished = _run(tmp_path, "crash")
    assert r.returncode == 1 and "illegal memory access" in r.stderr
    assert finished == ['fineline_run_finished{run="mlm"} 0.0']
