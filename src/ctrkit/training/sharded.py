"""Embedding tables sharded over the ranks by TorchRec (``embedding_backend="torchrec"``).

For id spaces whose tables, with their optimizer state, do not fit one device. Each table of a model's
:class:`~ctrkit.nn.embedding.FeatureEmbedding` and :class:`~ctrkit.nn.embedding.FeatureLinear` is replaced by a
:class:`TorchRecTable`: the same lookup (ids of any shape -> vectors), through a TorchRec ``EmbeddingCollection``
holding that one table. TorchRec's planner shards every table row-wise over the ranks and its
``DistributedModelParallel`` sends each id to the rank that owns its row; FBGEMM's fused kernels apply the
optimizer inside the backward pass, at the rows the batch read, so no full-table gradient or optimizer step
exists. The dense layers stay replicated and are averaged by DDP.

The table optimizer follows the run's: lazy Adam on GPUs, exact Adagrad, or exact row-wise Adagrad (one
accumulator per row: the state for tables of billions of rows); FBGEMM's CPU kernels have no Adam.
A rank's loss is the mean over its share of a global batch; TorchRec's collectives divide the table gradients
they send back by the number of ranks (``torchrec.distributed.comm_ops``' gradient division, on by default, as
DDP averages), so a step of N ranks is the step of one process on the global batch, as with the plain tables,
and the optimizer state is the same whatever the number of ranks (which lets a checkpoint resume on another).
With that division turned off, each table scales its gradients by 1 / ranks itself.
The model keeps its own classes: :func:`unshard` gathers every table back into an ``nn.Embedding``, so the
trained model saves and scores as a plain bundle (on any machine, without TorchRec). A model whose tables would
not fit host memory is built inside :func:`ctrkit.nn.embedding.tables_on` ("meta"): its tables are then
allocated only as shards, initialised as the plain tables would be (normal, or zero for first-order weights).

Checkpoints are distributed (:func:`checkpoint_state`, :func:`load_checkpoint_state`, written and read by
:mod:`ctrkit.training.checkpoint` with ``torch.distributed.checkpoint``): each rank saves the shards it holds
of every table and of its fused optimizer state, so no rank ever gathers a table, and a checkpoint resumes on
any number of ranks (DCP reshards the rows on load).

Not covered yet: the large-batch rule's per-row learning rates and clipping (the fused update has no hook for
them), and tables whose width is not a multiple of 4 are padded to one (FBGEMM's kernels need it; the 1-wide
first-order table costs 4 floats per row).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ctrkit.nn.embedding import FeatureEmbedding, FeatureLinear

BACKENDS = ("plain", "torchrec")
INSTALL = ("pip install 'ctrkit[torchrec]' with the FBGEMM build that matches this torch: fbgemm-gpu for CUDA, "
           "fbgemm-gpu-cpu for CPUs (docs/distributed.md)")


def require() -> None:
    """Raise a RuntimeError that says what to install when TorchRec or FBGEMM cannot be imported."""
    try:
        import fbgemm_gpu  # noqa: F401
        import torchrec  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: an FBGEMM build for another torch fails to load
        raise RuntimeError(f"--embedding-backend torchrec needs TorchRec and FBGEMM for torch {torch.__version__}: "
                           f"{INSTALL}. Import failed: {exc}") from exc


class TorchRecTable(nn.Module):
    """``forward(ids)`` -> [*ids.shape, dim], like ``nn.Embedding``, through a TorchRec EmbeddingCollection."""

    def __init__(self, name: str, num_embeddings: int, embedding_dim: int, sparse: bool = True,
                 init_std: float = 0.0) -> None:
        super().__init__()
        from torchrec import EmbeddingCollection, EmbeddingConfig

        self.name, self.num_embeddings, self.embedding_dim = name, num_embeddings, embedding_dim
        self.sparse = sparse  # the gradient kind of the nn.Embedding it replaced, given back by unshard()
        self.width = 4 * math.ceil(embedding_dim / 4)
        self.grad_scale = self.lr_scale = 1.0
        self.collection = EmbeddingCollection(
            tables=[EmbeddingConfig(name=name, embedding_dim=self.width, num_embeddings=num_embeddings,
                                    feature_names=[name], init_fn=partial(_init, std=init_std))],
            device=torch.device("meta"))

    @property
    def weight(self) -> torch.Tensor:
        """The table's parameter (a TorchRec ShardedTensor once sharded)."""
        return self.collection.embeddings[self.name].weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from torchrec import KeyedJaggedTensor

        flat = ids.reshape(-1).long()
        kjt = KeyedJaggedTensor(keys=[self.name], values=flat,
                                lengths=torch.ones(flat.numel(), dtype=torch.int32, device=flat.device))
        out = self.collection(kjt)[self.name].values()
        if self.grad_scale != 1.0 and out.requires_grad:
            out.register_hook(lambda g: g * self.grad_scale)
        return out[:, :self.embedding_dim].reshape(*ids.shape, self.embedding_dim)


def _init(weight: torch.Tensor, std: float) -> torch.Tensor:
    """How TorchRec initialises each shard of a table built on "meta": as the plain table would be."""
    return nn.init.normal_(weight, std=std) if std > 0 else nn.init.zeros_(weight)


def _holders(model: nn.Module) -> list[FeatureEmbedding | FeatureLinear]:
    return [m for m in model.modules() if isinstance(m, (FeatureEmbedding, FeatureLinear))]


def _process_group() -> None:
    """TorchRec shards over a process group: outside torchrun, a group of this one process."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def _local_shards(model: nn.Module) -> dict[str, list[tuple[Any, torch.Tensor]]]:
    """Each sharded table's (shard metadata, local tensor) pairs held by this rank, by state-dict key."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return {k: [(s.metadata, s.tensor) for s in v.local_shards()] for k, v in model.state_dict().items()
            if isinstance(v, ShardedTensor)}


def shard(model: nn.Module, device: torch.device, optimizer: str, lr: float, eps: float,
          betas: tuple[float, float] = (0.9, 0.999)) -> nn.Module:
    """Replace ``model``'s tables by row-wise sharded TorchRec tables (starting from their current weights)
    updated by FBGEMM's fused ``optimizer``; returns the DistributedModelParallel that trains it."""
    require()
    from torchrec.distributed.comm_ops import get_gradient_division
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingType
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    if optimizer == "adam" and device.type != "cuda":
        raise ValueError("FBGEMM's CPU kernels have no Adam for the sharded tables: train with --optimizer "
                         "adagrad on CPUs, or on GPUs")
    _process_group()
    start: dict[str, torch.Tensor] = {}
    tables = []
    for k, holder in enumerate(_holders(model)):
        old = holder.table
        if not isinstance(old, nn.Embedding):
            continue
        new = TorchRecTable(f"table_{k}", *old.weight.shape, sparse=old.sparse, init_std=holder.init_std)
        new.grad_scale = 1.0 if get_gradient_division() else 1.0 / dist.get_world_size()
        holder.table = new
        tables.append(new)
        if not old.weight.is_meta:  # built with real weights: the shards start from them
            start[new.name] = old.weight.detach().to("cpu")
    if not tables:
        raise ValueError("the model has no embedding tables to shard")
    for t in tables:
        # row-wise Adagrad averages g^2 over the stored width: a table padded to it gets its learning rate and
        # eps scaled back, so that its update is the one of its real width
        t.lr_scale = math.sqrt(t.embedding_dim / t.width) if optimizer == "rowwise_adagrad" else 1.0
        rule, kwargs = _optimizer(optimizer, lr * t.lr_scale, eps * t.lr_scale, betas)
        apply_optimizer_in_backward(rule, [t.weight], kwargs)
    size = dist.get_world_size()
    memory = {"hbm_cap": torch.cuda.get_device_properties(device).total_memory} if device.type == "cuda" else {}
    topology = Topology(world_size=size, compute_device=device.type,
                        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", size)), **memory)
    rows = {t.name: ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value]) for t in tables}
    plan = EmbeddingShardingPlanner(topology=topology, constraints=rows).collective_plan(model, None, dist.group.WORLD)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # sharding draws each shard's initial values (replaced below when the model came with weights); the
        # run's random stream stays as it was, so the dense layers see the draws of a plain run
        net = DistributedModelParallel(model, device=device, plan=plan)
    owner = {f"{t.name}.weight": t for t in tables}
    with torch.no_grad():
        for key, shards in _local_shards(model).items():
            table = next(t for suffix, t in owner.items() if key.endswith(suffix))
            if table.name not in start:
                continue
            full = start[table.name]
            for meta, tensor in shards:
                (r0, c0), (nr, nc) = meta.shard_offsets, meta.shard_sizes
                part = torch.zeros(nr, nc)
                cols = max(0, min(nc, full.shape[1] - c0))
                part[:, :cols] = full[r0:r0 + nr, c0:c0 + cols]
                tensor.copy_(part)
    return net


def _optimizer(name: str, lr: float, eps: float, betas: tuple[float, float]) -> tuple[type, dict[str, Any]]:
    """The torch / TorchRec optimizer class that TorchRec maps to FBGEMM's fused update of that name."""
    if name == "adam":
        return torch.optim.Adam, {"lr": lr, "betas": betas, "eps": eps}
    if name == "rowwise_adagrad":
        from torchrec.optim import RowWiseAdagrad

        return RowWiseAdagrad, {"lr": lr, "eps": eps}
    return torch.optim.Adagrad, {"lr": lr, "eps": eps}


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model.to(device)`` for every weight but the tables built on "meta" (see
    :func:`~ctrkit.nn.embedding.tables_on`), which :func:`shard` allocates on the ranks."""
    return model._apply(lambda t: t if t.is_meta else t.to(device))


def dense_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The parameters the fused table optimizer does not update (for the dense optimizer)."""
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    return [p for _, p in in_backward_optimizer_filter(net.named_parameters()) if p.requires_grad]


def set_table_lr(net: nn.Module, lr: float) -> None:
    """Give the fused table optimizers a new learning rate (FBGEMM reads it at the next step)."""
    scale = {path: t.lr_scale for path, t in net.named_modules() if isinstance(t, TorchRecTable)}
    fused = net.fused_optimizer  # type: ignore[attr-defined]
    for key, opt in fused.optimizers:  # keyed by the path of each table's collection
        owner = key.removesuffix(".collection")
        factor = next((v for path, v in scale.items() if path == owner or path.endswith("." + owner)), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * factor
    fused.zero_grad()


def snapshot(model: nn.Module) -> dict[str, Any]:
    """A copy of the weights on this rank: plain tensors, and each sharded table as a ShardedTensor over copies
    of this rank's shards (the form :func:`checkpoint_state` saves and reshards)."""
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

    out: dict[str, Any] = {}
    for k, v in model.state_dict().items():
        if isinstance(v, ShardedTensor):
            shards = [Shard(s.tensor.detach().clone(), copy.deepcopy(s.metadata)) for s in v.local_shards()]
            out[k] = ShardedTensor._init_from_local_shards_and_global_metadata(
                shards, sharded_tensor_metadata=copy.deepcopy(v.metadata()), process_group=v._process_group)
        else:
            out[k] = v.detach().clone()
    return out


@torch.no_grad()
def restore(model: nn.Module, state: dict[str, Any]) -> None:
    """Put back the weights of :func:`snapshot` (each rank its own shards)."""
    shards = _local_shards(model)
    for k, v in model.state_dict().items():
        if k in shards:
            for (_, t), saved in zip(shards[k], state[k].local_shards(), strict=True):
                t.copy_(saved.tensor)
        else:
            v.copy_(state[k])


def table_optimizer(model: nn.Module) -> Any:
    """The fused optimizers of ``model``'s sharded tables as one TorchRec ``CombinedOptimizer``, its state keyed
    by each table's state-dict key (the optimizer DistributedModelParallel drives, reached from the model)."""
    from torchrec.optim.fused import FusedOptimizerModule
    from torchrec.optim.keyed import CombinedOptimizer

    fused = [(path, m.fused_optimizer) for path, m in model.named_modules() if isinstance(m, FusedOptimizerModule)]
    if not fused:
        raise ValueError("the model has no sharded tables (was it sharded by shard()?)")
    return CombinedOptimizer(fused)


def checkpoint_state(model: nn.Module, best: dict[str, Any] | None) -> dict[str, Any]:
    """The state dict that a distributed checkpoint saves for sharded ``model``: its weights ("model": each table a
    ShardedTensor of row shards, the dense weights plain), the fused optimizer's per-table state ("table_optim",
    sharded as its table) and, when there is one, the :func:`snapshot` of the best weights ("best")."""
    out: dict[str, Any] = {"model": model.state_dict(), "table_optim": table_optimizer(model).state_dict()["state"]}
    if best is not None:
        out["best"] = best
    return out


@torch.no_grad()
def load_checkpoint_state(model: nn.Module, read: Callable[[dict[str, Any]], None],
                          best: bool) -> dict[str, Any] | None:
    """Fill sharded ``model`` and its fused optimizer from a checkpoint: ``read(state)`` loads a
    :func:`checkpoint_state` (laid out for this run's ranks) in place. Returns the best weights it held (as
    :func:`snapshot`), or None when ``best`` says it held none."""
    opt = table_optimizer(model)
    target = checkpoint_state(model, snapshot(model) if best else None)
    read(target)
    model.load_state_dict(target["model"])
    opt.load_state_dict({"state": target["table_optim"]})
    return target.get("best")


@torch.no_grad()
def unshard(model: nn.Module) -> nn.Module:
    """Gather every sharded table back into an ``nn.Embedding`` on every rank: the model is
    then a plain one, saved and scored like any other."""
    shards = _local_shards(model)
    for holder in _holders(model):
        table = holder.table
        if not isinstance(table, TorchRecTable):
            continue
        key = next(k for k in shards if k.endswith(f"{table.name}.weight"))
        device = shards[key][0][1].device if shards[key] else torch.device("cpu")
        full = torch.zeros(table.num_embeddings, table.width, device=device)
        for meta, tensor in shards[key]:
            (r0, c0), (nr, nc) = meta.shard_offsets, meta.shard_sizes
            full[r0:r0 + nr, c0:c0 + nc] = tensor
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(full)  # each row is held by one rank and zero on the others
        plain = nn.Embedding(table.num_embeddings, table.embedding_dim, sparse=table.sparse, device=device)
        plain.weight.copy_(full[:, :table.embedding_dim])
        holder.table = plain
    return model
