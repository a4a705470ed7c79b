"""The monitor's own collectives on a NCCL-only process group (what DeepSpeed, Megatron and
Accelerate start): NCCL takes no CPU tensors, so every small all-reduce must be placed on
the current CUDA device. One GPU is enough: a one-rank NCCL group runs the same code path
(DistContext is told world_size=2 so it does not short-circuit)."""

import os
import socket

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NCCL)"),
]


@pytest.fixture
def nccl_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def test_monitor_collectives_run_on_nccl(nccl_group):
    from fineline_monitor.distributed import DistContext, collective_device
    from fineline_monitor.integrations._scoring import _reduce_over_job

    assert collective_device(None).type == "cuda"
    ctx = DistContext(rank=0, world_size=2, dp_rank=0, dp_size=1, timeout_s=60)
    assert ctx.max_values([1.0, 3.5]) == [1.0, 3.5]
    assert ctx._logging_rank_global() == 0
    assert ctx.broadcast_from_logger({"actions": ["stop"]}) == {"actions": ["stop"]}
    assert _reduce_over_job(2.0, "MAX", ctx) == 2.0
