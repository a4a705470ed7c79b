"""Two patches that let megatron-core 0.16 run a GPTModel on the CPU (gloo), for tests and
for `examples/megatron_core_pretrain.py --cpu-patches` only. Never applied implicitly.

Why they are needed: megatron-core hard-codes CUDA in two places that a CPU forward and
backward pass go through.

  * `GlobalMemoryBuffer.get_tensor` allocates its scratch buffer with
    `device=torch.cuda.current_device()` (used by the tensor-parallel linear layers for
    the all-gather of sequence-parallel inputs and by the attention's score buffer).
    Patched: allocate an ordinary CPU tensor of the requested shape.
  * `CudaRNGStatesTracker.fork` swaps the *CUDA* RNG state around dropout in
    tensor-parallel regions. Patched: a null context (the CPU RNG is used as is). With
    dropout at 0, as in every test and example here, this changes no number.

Pipeline schedules (`get_forward_backward_func`) also allocate on "cuda" and are *not*
patched: pipeline-parallel runs need a GPU (see tests/gpu/).
"""

from __future__ import annotations

import contextlib

_APPLIED = False


def apply_megatron_cpu_patches() -> None:
    """Patch the two CUDA-only spots of megatron-core for CPU runs. Idempotent."""
    global _APPLIED
    if _APPLIED:
        return
    import torch
    from megatron.core import utils as mcore_utils
    from megatron.core.tensor_parallel import random as mcore_random

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):  # noqa: ARG001
        # The original keeps one CUDA buffer per (name, dtype) and returns views of it;
        # on the CPU a fresh tensor is simplest and always correct.
        return torch.empty(tuple(tensor_shape), dtype=dtype)

    def fork(self, name="model-parallel-rng"):  # noqa: ARG001
        return contextlib.nullcontext()

    mcore_utils.GlobalMemoryBuffer.get_tensor = get_tensor
    mcore_random.CudaRNGStatesTracker.fork = fork
    _APPLIED = True
