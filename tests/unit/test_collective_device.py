"""collective_device: CUDA for a NCCL-only group, CPU for gloo or a mixed group (the real
NCCL run is tests/gpu/test_nccl_collectives.py)."""

import torch
import torch.distributed as dist

from fineline_monitor.distributed import collective_device


def test_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, want in (("nccl", "cuda:3"), ("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu")):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert str(collective_device(None)) == want, backend


def test_no_process_group_means_cpu():
    assert not dist.is_initialized()
    assert collective_device(None).type == "cpu"


def test_the_model_device_wins_over_the_current_device(monkeypatch):
    """A script that never called torch.cuda.set_device has the current device cuda:0 on
    every rank; NCCL needs each rank's own GPU, which is where its model is."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert str(collective_device(None, torch.device("cuda", 2))) == "cuda:2"
    assert str(collective_device(None, torch.device("cpu"))) == "cuda:0"  # a CPU model says nothing
