"""The monitor's view of the job's ranks: who logs, which group is data-parallel.

Framework adapters build a DistContext from their own parallel state (DeepSpeed's
groups, megatron's parallel_state); plain torch gets `DistContext.detect()`. Every
helper here is a collective over a group and must be called on every rank of it,
from step-derived decisions only.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from typing import Any, List, Optional

log = logging.getLogger("fineline_monitor")


def module_device(module: Any) -> Any:
    """The device of a module's first parameter; None without one (or without a module)."""
    try:
        p = next(iter(module.parameters()), None) if module is not None else None
    except Exception:  # noqa: BLE001 - not a module
        return None
    return None if p is None else p.device


def collective_device(group: Any = None, hint: Any = None) -> Any:
    """Where a tensor must live for a collective over `group`: a CUDA device for a NCCL-only
    group (NCCL takes no CPU tensors: "No backend type associated with device type cpu";
    DeepSpeed, Megatron and Accelerate start NCCL-only groups), the CPU for gloo and for a
    group with both (`cpu:gloo,cuda:nccl`). Which CUDA device: `hint` (the model's, set by
    the monitor) when it is one, else the device the group was bound to, else the current
    one; a script that never called torch.cuda.set_device still has its model on its own
    GPU, while the current device would be cuda:0 on every rank."""
    import torch
    import torch.distributed as dist

    try:
        backend = str(dist.get_backend(group)).lower()
    except Exception:  # noqa: BLE001 - no process group: nothing to place for
        return torch.device("cpu")
    if "nccl" not in backend or "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    if hint is not None and getattr(hint, "type", None) == "cuda":
        return hint
    try:
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        bound = getattr(pg, "bound_device_id", None)
    except Exception:  # noqa: BLE001
        bound = None
    if bound is not None:
        return bound
    return torch.device("cuda", torch.cuda.current_device())


def bounded_all_reduce(
    t: Any, op: str = "SUM", *, group: Any = None, timeout_s: float, what: str = "all_reduce"
) -> Any:
    """All-reduce `t` in place (op SUM, MIN or MAX) over `group` and wait at most `timeout_s`:
    a rank that stopped calling it raises TimeoutError here (gloo raises on its own) instead
    of hanging its peers' next collectives. Returns `t`."""
    import torch.distributed as dist

    work = dist.all_reduce(t, op=getattr(dist.ReduceOp, op), group=group, async_op=True)
    if not work.wait(
        timeout=datetime.timedelta(seconds=timeout_s)
    ):  # pragma: no cover - gloo raises instead
        raise TimeoutError(f"{what} did not complete in {timeout_s:.0f}s")
    return t


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: Any = None  # torch.distributed ProcessGroup over data-parallel replicas, None = WORLD
    is_logging_rank: bool = True  # the rank that owns the loss: logs, pages, writes the store
    timeout_s: float = 300.0
    _logger_src: Optional[int] = field(default=None, init=False, repr=False, compare=False)
    _coll_device: Any = field(default=None, init=False, repr=False, compare=False)
    device_hint: Any = field(
        default=None, repr=False, compare=False
    )  # the model's device (monitor sets it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def detect(cls, timeout_s: float = 300.0) -> "DistContext":
        """Plain data parallelism over the default group, rank 0 logs."""
        try:
            import torch.distributed as dist
        except ImportError:  # pragma: no cover - torch is a core dependency
            return cls(timeout_s=timeout_s)
        if not (dist.is_available() and dist.is_initialized()):
            return cls(timeout_s=timeout_s)
        rank, world = dist.get_rank(), dist.get_world_size()
        return cls(
            rank=rank,
            world_size=world,
            dp_rank=rank,
            dp_size=world,
            dp_group=None,
            is_logging_rank=(rank == 0),
            timeout_s=timeout_s,
        )

    # ---- collectives (no-ops on one process) -----------------------------------------
    def _dist(self):
        import torch.distributed as dist

        return dist

    def max_values(self, values: List[float]) -> List[float]:
        """Element-wise maximum of `values` over all ranks (a collective)."""
        if not self.distributed:
            return list(values)
        import torch

        dist = self._dist()
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True)
        self._wait(work)
        return t.cpu().tolist()

    def _device(self) -> Any:
        """The device of the monitor's world-group tensors (a group's backend never changes)."""
        if self._coll_device is None:
            self._coll_device = collective_device(None, self.device_hint)
        return self._coll_device

    def _wait(self, work: Any) -> None:
        """Wait for a monitor collective. Past `timeout_s` we say so, once, and keep waiting:
        abandoning it would leave the slow rank to finish it later with other values, and the
        ranks' next collectives would no longer match (a hang or a dead job). The wait stays
        bounded by the process group's own timeout, which fails the job rather than hang it."""
        try:
            done = work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
                raise
            done = False
        if done is False:
            if not getattr(self, "_warned_slow", False):
                self._warned_slow = True
                log.warning(
                    "fineline_monitor: a monitor collective took longer than dist_timeout_s=%.0fs; "
                    "a rank is slow; still waiting (bounded by the process-group timeout)",
                    self.timeout_s,
                )
            work.wait()

    def broadcast_from_logger(self, obj: Any) -> Any:
        """The logging rank's `obj` on every rank (world group)."""
        if not self.distributed:
            return obj
        dist = self._dist()
        if self._logger_src is None:
            # Which global rank logs never changes: find it once (a collective, so on every
            # rank at the same call), not on every broadcast.
            self._logger_src = self._logging_rank_global()
        src = self._logger_src
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def _logging_rank_global(self) -> int:
        if not self.distributed:
            return 0
        import torch

        dist = self._dist()
        t = torch.tensor(
            [float(self.rank) if self.is_logging_rank else float(self.world_size)],
            device=self._device(),
        )
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def all_gather_dp(self, obj: Any) -> List[Any]:
        """Gather a picklable object from every data-parallel rank (in dp-rank order)."""
        if self.dp_size <= 1:
            return [obj]
        dist = self._dist()
        out: List[Optional[Any]] = [None] * self.dp_size
        dist.all_gather_object(out, obj, group=self.dp_group)
        return out
