"""Data-parallel training on 2 gloo processes (loopback): a 2-rank step on a global batch is the 1-process step on
that batch, and a checkpoint written by 2 ranks resumes in 1 process."""

from __future__ import annotations

import faulthandler
import gc
import os
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ctrkit.data.dataset import Batch, BatchIterator, EncodedData
from ctrkit.models import build_model
from ctrkit.nn.embedding import FeatureSpec
from ctrkit.training.checkpoint import load_checkpoint
from ctrkit.training.distributed import allreduce_sparse_, setup
from ctrkit.training.step import TrainStep
from ctrkit.training.trainer import TrainConfig, train

SIZES = (30, 12)
SPEC = FeatureSpec(n_ids=sum(SIZES), field_sizes=SIZES, sparse_names=("a", "b"), dense_names=())


def _data(n: int) -> EncodedData:
    rng = np.random.default_rng(2)
    ids = np.stack([rng.integers(0, SIZES[0], n), SIZES[0] + rng.integers(0, SIZES[1], n)], axis=1).astype(np.int32)
    label = (rng.random(n) < 0.2 + 0.5 * (ids[:, 0] % 3 == 0)).astype(np.float32)
    return EncodedData(ids=ids, dense=np.zeros((n, 0), np.float32), label=label)


def _model() -> torch.nn.Module:
    torch.manual_seed(7)
    return build_model("deepfm", SPEC, embed_dim=4, hidden=(8,), sparse_grad=True, batch_norm=False,
                       dropout=0.0)  # no SyncBN on CPU; dropout draws its masks per rank


def _config(**kw: object) -> TrainConfig:
    return TrainConfig(**{"batch_size": 64, "progress": False, "precision": "fp32", "seed": 3, **kw})


def _global_batches(steps: int, rows: int) -> list[Batch]:
    """Random global batches over SPEC, in float64 (so that two summation orders agree to rounding)."""
    g = torch.Generator().manual_seed(4)
    return [Batch(ids=torch.stack([torch.randint(0, SIZES[0], (rows,), generator=g),
                                   SIZES[0] + torch.randint(0, SIZES[1], (rows,), generator=g)], dim=1).int(),
                  dense=torch.zeros(rows, 0, dtype=torch.float64),
                  label=(torch.rand(rows, generator=g) < 0.3).double()) for _ in range(steps)]


def _steps(ddp: bool, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    """Weights after 3 steps on the global batches (this rank's share of each under DDP)."""
    m = _model().double()
    step = TrainStep(m, torch.device("cpu"), lr=0.05, ddp=ddp)
    for b in _global_batches(3, 64):
        share = torch.tensor_split(torch.arange(64), world_size)[rank]
        step(Batch(ids=b.ids[share], dense=b.dense[share], label=b.label[share]))
    step.close()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _sparse_mean(rank: int, out: str) -> None:
    """Rank 0 reads rows 1 (twice) and 3 with gradient 1, rank 1 rows 3 and 4 with 2; rank 0 saves the mean."""
    p = torch.nn.Parameter(torch.zeros(5, 2))
    rows = torch.tensor([[1, 3, 1]]) if rank == 0 else torch.tensor([[3, 4]])
    p.grad = torch.sparse_coo_tensor(rows, torch.ones(rows.shape[1], 2) * (rank + 1), (5, 2), check_invariants=False)
    allreduce_sparse_([p])
    if rank == 0:
        torch.save(p.grad.to_dense(), Path(out) / "grad.pt")


def _worker(rank: int, out: str) -> None:
    """One rank: the sparse gradient mean, three steps on global batches, two epochs of ``train`` with checkpoints."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    # a rendezvous file, not a TCP port another process on the machine could take first
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        assert setup("cpu")[0].size == 2  # joins the group torchrun's variables describe
        _sparse_mean(rank, out)
        weights = _steps(True, rank, 2)
        if rank == 0:
            torch.save(weights, Path(out) / "steps.pt")
        train(_model(), _data(300), _data(120), _config(epochs=2, checkpoint_dir=str(Path(out) / "ckpt")))
    finally:
        gc.collect()  # the DDP wrappers and their reducers go before the group they hold
        dist.destroy_process_group()


def spawn_two(worker: Callable[[int, str], None], tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """The folder ``worker(rank, folder)`` wrote on 2 spawned ranks (join returns when both are done)."""
    for attempt in (1, 2):
        out = tmp_path_factory.mktemp(name)
        try:
            mp.start_processes(worker, args=(str(out),), nprocs=2, join=True, start_method="spawn")
            return out
        except mp.ProcessExitedException as e:  # killed by a signal: a Python error in a rank is not retried
            if attempt == 2:
                raise
            warnings.warn(f"the 2-process gloo run died ({e}); its stacks are in the captured stderr; "
                          "running it once more", stacklevel=1)
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The outputs of the 2-process run (spawned once)."""
    return spawn_two(_worker, tmp_path_factory, "ddp")


def test_two_rank_steps_equal_one_process_steps(two_ranks: Path) -> None:
    ref = _steps(False)
    ddp = torch.load(two_ranks / "steps.pt", weights_only=True)
    start = _model().double().state_dict()
    assert ddp.keys() == ref.keys()
    assert any(not torch.equal(start[k], ref[k]) for k in ref)  # the steps moved the weights
    for k in ref:
        torch.testing.assert_close(ddp[k], ref[k], rtol=0, atol=1e-6, msg=k)


def test_two_rank_checkpoint_resumes_on_one_process(two_ranks: Path, tmp_path: Path) -> None:
    saved = load_checkpoint(two_ranks / "ckpt")
    assert saved is not None and saved["epoch"] == 2 and saved["epoch_done"]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "last.pt").write_bytes((two_ranks / "ckpt" / "last.pt").read_bytes())
    resumed = _model()
    res = train(resumed, _data(300), _data(120), _config(epochs=3, checkpoint_dir=str(ckpt), resume=True))
    ref = train(_model(), _data(300), _data(120), _config(epochs=3))
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    assert res.history[:2] == saved["result"]["history"]
    # the same run to float32 rounding (sums in another order), though two of its epochs ran on 2 ranks
    for a, b in zip(res.history, ref.history, strict=True):
        assert a["valid"]["auc"] == pytest.approx(b["valid"]["auc"], abs=1e-6)
        assert a["valid"]["logloss"] == pytest.approx(b["valid"]["logloss"], abs=1e-6)


def test_shards_partition_each_global_batch() -> None:
    data = EncodedData(ids=np.arange(103, dtype=np.int32)[:, None], dense=np.zeros((103, 0), np.float32),
                       label=np.zeros(103, np.float32))
    for resident in (True, False):
        full = [b.ids[:, 0].tolist() for b in BatchIterator(data, 25, shuffle=True, seed=1, resident=resident,
                                                             block_rows=16, window_blocks=2)]
        parts = [[b.ids[:, 0].tolist() for b in BatchIterator(data, 25, shuffle=True, seed=1, resident=resident,
                                                              block_rows=16, window_blocks=2, rank=r,
                                                              world_size=3)] for r in range(3)]
        # 4 full batches of 25 rows split 9/8/8; the last one of 3 rows cannot give each of 3 ranks two rows
        assert [len(p) for p in parts] == [4, 4, 4]
        for i in range(4):
            assert [len(p[i]) for p in parts] == [9, 8, 8]
            assert parts[0][i] + parts[1][i] + parts[2][i] == full[i]
    with pytest.raises(ValueError, match="rank must be in"):
        BatchIterator(data, 25, rank=2, world_size=2)


def test_sparse_gradients_are_averaged_over_ranks(two_ranks: Path) -> None:
    # rank 0: rows 1 (twice) and 3 with 1; rank 1: rows 3 and 4 with 2; the mean of the two dense gradients
    want = torch.tensor([[0, 0], [2, 2], [0, 0], [3, 3], [2, 2]], dtype=torch.float32) / 2
    torch.testing.assert_close(torch.load(two_ranks / "grad.pt", weights_only=True), want)


def test_ddp_step_refuses_graphs_and_row_updates() -> None:
    with pytest.raises(ValueError, match="under DDP"):
        TrainStep(_model(), torch.device("cpu"), ddp=True, row_updates=True)
