"""Sharded embedding tables (``--embedding-backend torchrec``) at a size one device cannot hold: samples/s and peak
memory per rank.

Run under torchrun, one process per GPU (or per CPU worker with ``--device cpu``, to check the harness)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    torchrun --standalone --nproc-per-node 2 bench/bench_sharded.py --buckets 2500000000 [--out bench/results]

Model: ``--model`` (default ``dnn``: no first-order table) over ``--fields`` categorical fields, one of them
hashed into ``--buckets`` rows (the id space, embedding 16, fp32: 2.5e9 rows are 160 GB) and the others small;
built with its tables on "meta" so that only the shards are ever allocated, trained by
:class:`~ctrkit.training.step.TrainStep` with row-wise Adagrad (its state is one float per row). Data: global
batches of ``--batch`` rows drawn on each rank from the same seeded generator (the big field's ids Zipf-like
over the whole space, so most rows are touched once or never, as in a real hashed space), the label a planted
logistic function of two small fields; each rank trains on its share. The first ``--warmup`` steps are not
timed. The run ends without gathering the shards (a bundle of such a table needs its own export).

Prints a line per rank and writes ``<out>/sharded.json`` (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ctrkit.data.dataset import Batch  # noqa: E402
from ctrkit.models import build_model  # noqa: E402
from ctrkit.nn.embedding import FeatureSpec, tables_on  # noqa: E402
from ctrkit.training.distributed import setup  # noqa: E402
from ctrkit.training.step import TrainStep  # noqa: E402

SMALL = 1000  # ids of each of the other fields


def batches(spec: FeatureSpec, buckets: int, rows: int, seed: int, device: torch.device):
    """Endless global batches: field 0 hashed over ``buckets`` ids (heavy-tailed), the others uniform over
    :data:`SMALL`; label = Bernoulli(sigmoid(planted weights of fields 1 and 2))."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n_small = spec.n_sparse - 1
    w = torch.randn(2, SMALL, generator=g)
    while True:
        u = torch.rand(rows, generator=g, dtype=torch.float64)
        big = torch.clamp((u ** 4 * buckets).long(), max=buckets - 1)  # most rows near the head, a long tail
        small = torch.randint(0, SMALL, (rows, n_small), generator=g)
        logit = w[0, small[:, 0]] + w[1, small[:, 1]] - 1.5
        label = (torch.rand(rows, generator=g) < torch.sigmoid(logit)).float()
        offsets = buckets + SMALL * torch.arange(n_small)
        ids = torch.cat([big[:, None], small + offsets], dim=1)
        yield Batch(ids=ids.to(device), dense=torch.zeros(rows, 0, device=device), label=label.to(device))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--buckets", type=int, default=2_500_000_000, help="rows of the hashed field's block")
    ap.add_argument("--fields", type=int, default=26)
    ap.add_argument("--embed", type=int, default=16)
    ap.add_argument("--model", default="dnn")
    ap.add_argument("--batch", type=int, default=65536, help="global batch (split over the ranks)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--optimizer", default="rowwise_adagrad")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    world, device = setup(args.device)
    sizes = (args.buckets, *([SMALL] * (args.fields - 1)))
    spec = FeatureSpec(n_ids=sum(sizes), field_sizes=sizes, sparse_names=tuple(f"C{i}" for i in range(args.fields)),
                       dense_names=())
    torch.manual_seed(0)
    with tables_on("meta"):
        model = build_model(args.model, spec, embed_dim=args.embed, sparse_grad=True, emb_l2_scope="batch",
                            batch_norm=False, dropout=0.0)
    from ctrkit.training import sharded

    sharded.to_device(model, device)
    t0 = time.perf_counter()
    step = TrainStep(model, device, lr=args.lr, optimizer=args.optimizer, embedding_backend="torchrec",
                     compile="off")
    shard_seconds = time.perf_counter() - t0
    share = torch.tensor_split(torch.arange(args.batch), world.size)[world.rank]
    stream = batches(spec, args.buckets, args.batch, seed=1, device=torch.device("cpu"))
    losses, timed = [], 0.0
    for i in range(args.steps):
        b = next(stream)
        mine = Batch(ids=b.ids[share].to(device), dense=b.dense[share].to(device), label=b.label[share].to(device))
        if i == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dist.barrier()
            start = time.perf_counter()
        step(mine)
        if (mean := step.loss_mean()) is not None:
            losses.append(mean)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    timed = time.perf_counter() - start
    samples = args.batch * (args.steps - args.warmup)
    mine_stats = {"rank": world.rank, "device": str(device),
                  "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                  "memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "max RSS",
                  "shard_rows": sum(int(m.shard_sizes[0]) for v in sharded._local_shards(model).values()
                                    for m, _ in v),
                  "shard_seconds": round(shard_seconds, 2)}
    every = [None] * world.size
    dist.all_gather_object(every, mine_stats)
    if world.main:
        table_gb = args.buckets * 4 * (4 * -(-args.embed // 4)) / 1e9
        report = {"command": "torchrun ... bench/bench_sharded.py " + " ".join(sys.argv[1:]),
                  "machine": platform.node(), "ranks": world.size, "device": str(device),
                  "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                  "torch": torch.__version__, "buckets": args.buckets, "table_gb_fp32": round(table_gb, 1),
                  "global_batch": args.batch, "timed_steps": args.steps - args.warmup,
                  "samples_per_s": round(samples / timed, 1), "loss_first_last": [losses[:1], losses[-1:]],
                  "per_rank": every}
        for r in every:
            print(f"rank {r['rank']}: {r['shard_rows']:,} table rows, peak memory {r['peak_memory_gb']} GB, "
                  f"sharding {r['shard_seconds']} s")
        print(f"{world.size} ranks, {args.buckets:,} hashed rows ({table_gb:.1f} GB fp32): "
              f"{report['samples_per_s']:,.0f} samples/s at global batch {args.batch}")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sharded.json").write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
