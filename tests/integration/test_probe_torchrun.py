"""`probe` CLI on one process and under torchrun --nproc_per_node=2 (gloo, CPU): same JSON."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS = "piqa:rc_0shot,winogrande:rc_0shot,arc_easy:rc_0shot,gsm8k:gold_bpb_5shot"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from fineline_monitor.probes._testing import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")), n_positions=128)


def _env():
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop("WORLD_SIZE", None)
    return env


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args):
    return [sys.executable, "-m", "fineline_monitor.probes.cli", "probe", *args]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_ranks_equal_one_rank(model_dir, tmp_path):
    common = ["--hf-model", model_dir, "--tasks", TASKS, "--limit", "7", "--batch-size", "3"]
    one = tmp_path / "one.json"
    r = subprocess.run(
        _cli(*common, "--output", str(one)), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "probe [" in r.stderr  # progress bar on stderr
    two = tmp_path / "two.json"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "fineline_monitor.probes.cli",
        "probe",
        *common,
        "--output",
        str(two),
    ]
    r2 = subprocess.run(torchrun, env=_env(), capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert list(a["tasks"]) == TASKS.split(",")
    assert len(a["requests"]) == len(b["requests"]) > 7 * 6
    assert {(q["task"], q["doc_id"], q["choice"]) for q in a["requests"]} == {
        (q["task"], q["doc_id"], q["choice"]) for q in b["requests"]
    }  # no duplicates, none lost
    for qa, qb in zip(a["requests"], b["requests"]):
        assert (qa["task"], qa["doc_id"], qa["choice"]) == (qb["task"], qb["doc_id"], qb["choice"])
        assert qa["n_tokens"] == qb["n_tokens"] and qa["n_bytes"] == qb["n_bytes"]
        assert qa["is_greedy"] == qb["is_greedy"]
        assert abs(qa["logprob"] - qb["logprob"]) < 1e-5
    assert a["tokens_scored"] == b["tokens_scored"]
    for name, ta in a["tasks"].items():
        tb = b["tasks"][name]
        assert ta["n_docs"] == tb["n_docs"] == 7 and ta["capability"] == tb["capability"]
        for k, v in ta["metrics"].items():
            if k in ("acc", "acc_norm"):
                assert v == tb["metrics"][k], (name, k)
            else:
                assert abs(v - tb["metrics"][k]) < 1e-6, (name, k)


@pytest.mark.slow
def test_cli_user_requests_file_and_errors(model_dir, tmp_path):
    p = tmp_path / "mine.jsonl"
    rows = [
        {
            "doc_id": d,
            "idx": i,
            "label": 1,
            "request": {"context": f"Question {d}: 2+2 =", "continuation": c},
        }
        for d in range(3)
        for i, c in enumerate([" 3", " 4", " five"])
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "o.json"
    r = subprocess.run(
        _cli("--hf-model", model_dir, "--requests", str(p), "--output", str(out), "--no-progress"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    j = json.loads(out.read_text())
    assert j["tasks"]["mine"]["n_docs"] == 3 and set(j["tasks"]["mine"]["metrics"]) >= {
        "acc",
        "acc_norm",
        "bpb",
    }
    assert [(q["doc_id"], q["choice"]) for q in j["requests"]] == [
        (d, i) for d in range(3) for i in range(3)
    ]
    bad = subprocess.run(
        _cli("--hf-model", model_dir, "--tasks", "helaswag", "--output", str(out)),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "did you mean" in bad.stderr and "hellaswag" in bad.stderr
    lst = subprocess.run(
        [sys.executable, "-m", "fineline_monitor.probes.cli", "tasks"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        lst.returncode == 0
        and "examination:" in lst.stdout
        and "hellaswag:rc_0shot  (default suite)" in lst.stdout
    )
