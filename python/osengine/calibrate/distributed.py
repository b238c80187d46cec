"""Calibration over several processes with torch.distributed (gloo on CPUs, NCCL on GPUs).

    torchrun --nproc-per-node 2 -m osengine.cli quantize MODEL --recipe w8a8-static --out DIR

Every process loads the model and the same calibration samples, then keeps every world_size-th batch (global batch
g goes to rank g mod world_size), so a batch holds the same samples as in a one-process run. Each block runs on
the local batches; what the block's decisions need from all samples is reduced across processes before it is used:

    channel minima and maxima of each site (SiteData.channel_min / channel_max: OS+'s shift and amax, SmoothQuant)
    OS+'s error of every grid candidate (SiteData.error: sums of squared errors and token counts); the search
        batches are the one-process run's (global batches 0 .. search_batches - 1), held by the ranks they fall to
    the static activation observers' ranges (minmax: min / max; quantile: the mean over batches)
    GPTQ's Hessians (sums of x x^T, accumulated in float64 so that the order of the sum does not show)

Reductions leave identical values on every process, so every process makes the same decisions and holds the same
quantized model; rank 0 writes the folder. The result equals the one-process run on the same samples: channel
extremes and minmax ranges exactly, sums up to float reduction order. Not supported with several processes (refused
with a message): strategies that compute their own statistics (Strategy.distributed False: os1, outliertune and
plugins unless they declare it), the activation observer "search", osplus shift_quantile, prefix detection
("auto" detects on every process's full copy of the samples, which is allowed), and resumable progress.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..plugins.api import PluginError, Reduction


class ProcessGroupReduction(Reduction):
    """Reductions over the default torch.distributed process group (all_reduce)."""

    def __init__(self):
        import torch.distributed as dist

        self._dist = dist
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self._device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        buffer = t.detach().to(self._device).clone()
        self._dist.all_reduce(buffer, op=op)
        return buffer.to(t.device)

    def min(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, self._dist.ReduceOp.MIN)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, self._dist.ReduceOp.MAX)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, self._dist.ReduceOp.SUM)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` on every process (same shape and dtype everywhere)."""
        buffer = t.detach().to(self._device).clone()
        self._dist.broadcast(buffer, src=0)
        return buffer.to(t.device)

    def barrier(self) -> None:
        self._dist.barrier()


def reduction_from_environment(device: str = "cpu") -> Optional[ProcessGroupReduction]:
    """The process group torchrun (or the caller) set up: initialised here from the environment (WORLD_SIZE, RANK,
    MASTER_ADDR, MASTER_PORT) when it is not yet; None for a single process."""
    import torch.distributed as dist

    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    if dist.get_world_size() <= 1:
        return None
    return ProcessGroupReduction()


def local_batches(batches: list, masks: list, search_batches: int, reduction: Reduction) -> tuple:
    """(this process's batches, their masks, how many of them are search batches): global batch g belongs to rank
    g mod world_size; the search batches are the global batches below `search_batches`."""
    world, rank = reduction.world_size, reduction.rank
    if world == 1:
        return batches, masks, search_batches
    if len(batches) < world:
        raise PluginError(f"{len(batches)} calibration batches cannot be shared by {world} processes; give at least "
                          f"{world} batches (samples / batch size)")
    mine = list(range(rank, len(batches), world))
    return [batches[g] for g in mine], [masks[g] for g in mine], sum(1 for g in mine if g < search_batches)


def reduce_observed_ranges(block: torch.nn.Module, reduction: Reduction) -> None:
    """The static activation observers of a block after observing the local batches: their ranges over every
    process's batches (minmax: extremes; quantile: the mean of the per-batch ranges, weighted by batch counts)."""
    from ..quant.observers import ActQuantizer

    for m in block.modules():
        if not isinstance(m, ActQuantizer) or m.spec.dynamic:
            continue
        if m.spec.observer == "search":
            raise PluginError("the activation observer 'search' needs every calibration token in one process; it is "
                              "not supported with several processes (torch.distributed)")
        if m.spec.observer == "minmax":
            m.lo.copy_(reduction.min(m.lo))
            m.hi.copy_(reduction.max(m.hi))
            m.batches.copy_(reduction.sum(m.batches))
        else:
            n = m.batches.double()
            totals = reduction.sum(torch.stack([m.lo.double() * n, m.hi.double() * n, n]))
            m.lo.copy_((totals[0] / totals[2]).to(m.lo.dtype))
            m.hi.copy_((totals[1] / totals[2]).to(m.hi.dtype))
            m.batches.copy_(totals[2].to(m.batches.dtype))
