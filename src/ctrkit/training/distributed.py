"""Data-parallel training under ``torchrun``: one process per GPU (NCCL) or per CPU worker (gloo), same code.

A process started by ``torchrun`` (``WORLD_SIZE`` > 1 in its environment) joins the process group on first use.
Every rank reads the same global batch order and trains on its own contiguous slice of each global batch, so a
step of N ranks on a global batch is the step of one process on that batch. Dense weights are averaged by
:class:`~torch.nn.parallel.DistributedDataParallel`; embedding tables with row-sparse gradients stay out of DDP's
buckets and their sparse gradients are all-gathered and averaged here (:func:`allreduce_sparse_`), so the
row-sparse optimizer updates exactly the rows the global batch read. Batch norm layers become SyncBatchNorm on
GPUs; on CPUs (gloo) torch has none, so there each rank normalises with the statistics of its own share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# NVLink multicast (NVLS) is kept off in every process started on a GPU host
GPU_HOST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among ``size`` processes (1: not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains."""
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, bundles and reports, and computes validation metrics."""
        return self.rank == 0


def world() -> World:
    """This process's place in the run: from the initialised process group, else from torchrun's variables."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: str) -> tuple[World, torch.device]:
    """Join the process group when launched by torchrun (NCCL for CUDA, gloo for CPU); returns the world and the
    device of this rank (``cuda`` becomes ``cuda:LOCAL_RANK``)."""
    w = world()
    dev = torch.device(device)
    if not w.distributed:
        return w, dev
    if dev.type == "cuda":
        for k, v in GPU_HOST_ENV.items():
            os.environ.setdefault(k, v)
        dev = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return world(), dev


def wrap(model: torch.nn.Module, device: torch.device, tables: list[torch.nn.Parameter]) -> torch.nn.Module:
    """``model`` in DDP for the dense weights (batch norm synchronised on GPUs); ``tables`` (row-sparse
    embedding weights) are left to :func:`allreduce_sparse_`; empty weights (of absent numeric features), which
    get no gradient, are left out too."""
    if device.type == "cuda":  # batch statistics over the global batch; torch has no SyncBatchNorm on CPUs
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    skip = {id(p) for p in tables}
    model._ddp_params_and_buffers_to_ignore = [  # type: ignore[assignment]
        n for n, p in model.named_parameters() if id(p) in skip or p.numel() == 0]
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def allreduce_sparse_(params: list[torch.nn.Parameter]) -> None:
    """Replace each parameter's row-sparse gradient by its mean over the ranks (all-gather of the rows and values,
    then one coalesce), the gradient one process would get from the whole global batch."""
    size = dist.get_world_size()
    for p in params:
        if p.grad is None:
            g = torch.sparse_coo_tensor(torch.zeros((1, 0), dtype=torch.long, device=p.device),
                                        torch.zeros((0, *p.shape[1:]), dtype=p.dtype, device=p.device), p.shape)
        else:
            g = p.grad.coalesce()
        rows, vals = g.indices()[0], g.values()
        n = torch.tensor([rows.numel()], device=p.device)
        counts = [torch.zeros_like(n) for _ in range(size)]
        dist.all_gather(counts, n)
        top = int(max(c.item() for c in counts))
        pad_rows = torch.zeros(top, dtype=rows.dtype, device=p.device)
        pad_vals = torch.zeros((top, *vals.shape[1:]), dtype=vals.dtype, device=p.device)
        pad_rows[:len(rows)], pad_vals[:len(rows)] = rows, vals
        all_rows = [torch.empty_like(pad_rows) for _ in range(size)]
        all_vals = [torch.empty_like(pad_vals) for _ in range(size)]
        dist.all_gather(all_rows, pad_rows)
        dist.all_gather(all_vals, pad_vals)
        k = [int(c.item()) for c in counts]
        rows = torch.cat([r[:m] for r, m in zip(all_rows, k, strict=True)])
        vals = torch.cat([v[:m] for v, m in zip(all_vals, k, strict=True)])
        p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), vals / size, p.shape, is_coalesced=False,
                                         check_invariants=False).coalesce()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a no-op outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def total(value: float) -> float:
    """The sum of ``value`` over the ranks (``value`` itself outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())
