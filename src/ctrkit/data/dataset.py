"""Encoded datasets on disk (memory-mapped) and a batch iterator with no per-sample Python objects.

Layout of a dataset folder: ``ids.i32`` (int32 [n, n_sparse], already offset into the global id space),
``dense.f32`` (float32 [n, n_dense], NaN = missing), ``label.f32`` (float32 [n]), optional ``group.i64``
(int64 [n], a hash of the group/user column, for group AUC), optional ``weight.f32`` (float32 [n], sample
weights) and ``meta.json`` with the shapes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

_FILES = {"ids": ("ids.i32", np.int32), "dense": ("dense.f32", np.float32),
          "label": ("label.f32", np.float32), "group": ("group.i64", np.int64),
          "weight": ("weight.f32", np.float32)}


class DatasetWriter:
    """Appends encoded chunks to the raw files of a dataset folder, then writes ``meta.json``."""

    def __init__(self, path: str | Path, n_sparse: int, n_dense: int, with_group: bool = False,
                 with_weight: bool = False) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.n_sparse, self.n_dense, self.with_group, self.with_weight = n_sparse, n_dense, with_group, with_weight
        self.n = 0
        names = ["ids", "dense", "label"] + (["group"] if with_group else []) + (["weight"] if with_weight else [])
        self._fh: dict[str, IO[bytes]] = {k: open(self.path / _FILES[k][0], "wb") for k in names}

    def append(self, ids: np.ndarray, dense: np.ndarray, label: np.ndarray, group: np.ndarray | None = None,
               weight: np.ndarray | None = None) -> None:
        """Write one chunk; shapes are checked so a bad chunk never corrupts the folder silently."""
        n = len(label)
        if ids.shape != (n, self.n_sparse) or dense.shape != (n, self.n_dense):
            raise ValueError(f"chunk shapes ids {ids.shape} dense {dense.shape} do not match "
                             f"({n}, {self.n_sparse}) / ({n}, {self.n_dense})")
        if self.with_group and group is None:
            raise ValueError("this dataset has a group column; pass group ids")
        if self.with_weight and weight is None:
            raise ValueError("this dataset has a weight column; pass weights")
        # contiguous arrays are written straight from their buffers, without an intermediate bytes copy
        self._fh["ids"].write(np.ascontiguousarray(ids, dtype=np.int32).data)
        self._fh["dense"].write(np.ascontiguousarray(dense, dtype=np.float32).data)
        self._fh["label"].write(np.ascontiguousarray(label, dtype=np.float32).data)
        if self.with_group:
            self._fh["group"].write(np.ascontiguousarray(group, dtype=np.int64).data)
        if self.with_weight:
            self._fh["weight"].write(np.ascontiguousarray(weight, dtype=np.float32).data)
        self.n += n

    def rewrite(self, sizes: list[int], update: Callable[[np.ndarray, np.ndarray], None]) -> None:
        """Let ``update(ids, dense)`` change in place each run of appended rows in turn (``sizes[i]`` rows in
        the i-th). Each run is read into and written back from one reused buffer, so no fresh memory is touched
        per run, whatever the number of rows."""
        if sum(sizes) != self.n:
            raise ValueError(f"runs of {sum(sizes)} rows in all, but {self.n} rows were appended")
        widths = {"ids": self.n_sparse, "dense": self.n_dense}
        top = max(sizes, default=0)
        bufs = {k: np.empty((top, w), _FILES[k][1]) for k, w in widths.items()}
        fds: dict[str, int] = {}
        try:
            for k in widths:
                self._fh[k].flush()
                fds[k] = os.open(self.path / _FILES[k][0], os.O_RDWR)
            start = 0
            for m in sizes:
                views = {k: bufs[k][:m] for k in widths}
                for k, v in views.items():
                    _transfer(os.preadv, fds[k], v, start * v.itemsize * widths[k])
                update(views["ids"], views["dense"])
                for k, v in views.items():
                    _transfer(os.pwritev, fds[k], v, start * v.itemsize * widths[k])
                start += m
        finally:
            for fd in fds.values():
                os.close(fd)

    def abort(self) -> None:
        """Close and delete the files written so far (the folder stays): a failed encode leaves no partial dataset."""
        for key, fh in self._fh.items():
            fh.close()
            (self.path / _FILES[key][0]).unlink(missing_ok=True)

    def close(self, extra: dict[str, Any] | None = None) -> EncodedData:
        """Flush, write ``meta.json`` and return the dataset opened read-only."""
        for fh in self._fh.values():
            fh.close()
        meta = {"n": self.n, "n_sparse": self.n_sparse, "n_dense": self.n_dense, "with_group": self.with_group,
                "with_weight": self.with_weight}
        meta.update(extra or {})
        (self.path / "meta.json").write_text(json.dumps(meta, indent=1))
        return EncodedData.open(self.path)


def _transfer(op: Callable[[int, list[memoryview], int], int], fd: int, array: np.ndarray, offset: int) -> None:
    """Fill a contiguous array with the file's bytes at ``offset`` (``os.preadv``) or write its bytes there
    (``os.pwritev``), however many calls that takes."""
    view, done = memoryview(array.reshape(-1)).cast("B"), 0
    while done < len(view):
        n = op(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(f"{len(view) - done} bytes short at offset {offset + done}")
        done += n


@dataclass
class EncodedData:
    """An encoded dataset: numpy arrays (memory-mapped from disk, or in memory) of equal length."""

    ids: np.ndarray
    dense: np.ndarray
    label: np.ndarray
    group: np.ndarray | None = None
    meta: dict[str, Any] | None = None
    weight: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.label)
        if len(self.ids) != n or len(self.dense) != n or any(
                a is not None and len(a) != n for a in (self.group, self.weight)):
            raise ValueError("ids, dense, label (and group, weight) must have the same number of rows")

    def __len__(self) -> int:
        return len(self.label)

    @classmethod
    def open(cls, path: str | Path) -> EncodedData:
        """Memory-map a dataset folder written by :class:`DatasetWriter`."""
        p = Path(path)
        meta_path = p / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{p} is not an encoded dataset (no meta.json)")
        meta = json.loads(meta_path.read_text())
        n = meta["n"]

        def load(key: str, width: int | None) -> np.ndarray:
            name, dtype = _FILES[key]
            shape = (n,) if width is None else (n, width)
            if n == 0 or (width == 0):
                return np.zeros(shape, dtype)
            return np.memmap(p / name, dtype=dtype, mode="r", shape=shape)

        group = load("group", None) if meta.get("with_group") else None
        weight = load("weight", None) if meta.get("with_weight") else None
        return cls(ids=load("ids", meta["n_sparse"]), dense=load("dense", meta["n_dense"]),
                   label=load("label", None), group=group, meta=meta, weight=weight)

    def take(self, index: np.ndarray) -> EncodedData:
        """Rows at ``index`` as an in-memory dataset."""
        return EncodedData(ids=self.ids[index], dense=self.dense[index], label=self.label[index],
                           group=None if self.group is None else self.group[index], meta=self.meta,
                           weight=None if self.weight is None else self.weight[index])

    def in_memory(self) -> EncodedData:
        """The same data read fully into RAM (fast random access for shuffling)."""
        return EncodedData(ids=np.asarray(self.ids).copy(), dense=np.asarray(self.dense).copy(),
                           label=np.asarray(self.label).copy(),
                           group=None if self.group is None else np.asarray(self.group).copy(), meta=self.meta,
                           weight=None if self.weight is None else np.asarray(self.weight).copy())

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what loading into memory costs)."""
        return int(self.ids.nbytes + self.dense.nbytes + self.label.nbytes)


def _resident_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """The array as a tensor on ``device``, read into RAM: a read-only memory map is never shared with torch."""
    a = np.ascontiguousarray(array)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a).to(device)


@dataclass
class Batch:
    """What a model sees: one small typed object, the same on every path (training, scoring, GPU, export).

    ``ids`` [B, Fs] int32/int64, already offset into the global id space; ``dense`` [B, Fd] float32 (NaN =
    missing); ``label`` [B] (one head) or [B, T] (T heads), absent when scoring; ``weight`` [B] sample weights;
    ``seq`` [B, Fq, L] ids of sequence and multi-valued fields with ``seq_len`` [B, Fq] (positions at or past a
    row's length are padding). Models read what they use and ignore the rest.
    """

    ids: torch.Tensor
    dense: torch.Tensor
    label: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    seq: torch.Tensor | None = None
    seq_len: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class BatchIterator:
    """Iterates an :class:`EncodedData` in batches of tensors on ``device``.

    Shuffling is by blocks: the order of ``block_rows``-row blocks is permuted, a window of blocks is read
    into memory and its rows permuted, so a memory-mapped dataset larger than RAM streams; a dataset that
    fits in one window is shuffled globally. With ``resident=True`` (the default when the data fits in
    ``resident_bytes``: 4 GiB on a CPU, half the free memory of a GPU) the whole dataset is moved to ``device``
    once and batches are gathered there, which is the fast path on a GPU and avoids a copy per batch on a CPU.
    Streamed batches go to a GPU through pinned memory, so the copy overlaps the steps queued before it.

    With ``world_size`` > 1 (data-parallel training) every rank draws the same order of global batches of
    ``batch_size`` rows and yields only its contiguous share of each (the first ``n % world_size`` ranks get one
    row more); a global batch too small to give every rank two rows is skipped by all of them.
    """

    def __init__(self, data: EncodedData, batch_size: int = 4096, shuffle: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", drop_last: bool = False, block_rows: int = 1 << 16,
                 window_blocks: int = 16, resident: bool | None = None,
                 resident_bytes: int | None = None, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.rank, self.world_size = rank, world_size
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.device = torch.device(device)
        self.drop_last, self.block_rows, self.window_blocks = drop_last, block_rows, window_blocks
        self._rng = np.random.default_rng(seed)
        self._gen = torch.Generator(device=self.device if self.device.type == "cuda" else "cpu").manual_seed(seed)
        if resident_bytes is None:
            resident_bytes = torch.cuda.mem_get_info(self.device)[0] // 2 if self.device.type == "cuda" else 4 << 30
        if resident is None:
            resident = data.nbytes <= resident_bytes
        self.resident = resident
        self._tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        if resident:
            self._tensors = (_resident_tensor(data.ids, self.device), _resident_tensor(data.dense, self.device),
                             _resident_tensor(data.label, self.device),
                             None if data.weight is None else _resident_tensor(data.weight, self.device))

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        if self._tensors is not None:
            yield from self._iter_resident()
        else:
            yield from self._iter_blocks()

    def _iter_resident(self) -> Iterator[Batch]:
        assert self._tensors is not None
        ids, dense, label, weight = self._tensors
        n, bs = len(label), self.batch_size
        order = torch.randperm(n, generator=self._gen, device=self._gen.device) if self.shuffle else None
        stop = n - n % bs if self.drop_last else n
        for start in range(0, stop, bs):
            if (share := self._share(start, min(start + bs, n))) is None:
                continue
            idx = slice(*share) if order is None else order[share[0]:share[1]]
            yield Batch(ids[idx], dense[idx], label[idx], None if weight is None else weight[idx])

    def _share(self, lo: int, hi: int) -> tuple[int, int] | None:
        """This rank's rows [lo, hi) of the global batch [lo, hi), or None when the batch is skipped."""
        w = self.world_size
        if w == 1:
            return lo, hi
        n = hi - lo
        if n < 2 * w:
            return None
        q, r = divmod(n, w)
        a = lo + self.rank * q + min(self.rank, r)
        return a, a + q + (self.rank < r)

    def rng_state(self) -> dict[str, Any]:
        """The shuffling state (what the next epoch's order depends on), for checkpoints."""
        return {"numpy": self._rng.bit_generator.state, "torch": self._gen.get_state()}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`rng_state`: the next epoch is shuffled as it was then."""
        self._rng.bit_generator.state = state["numpy"]
        self._gen.set_state(state["torch"])

    def _iter_blocks(self) -> Iterator[Batch]:
        n, bs, br = len(self.data), self.batch_size, self.block_rows
        blocks = np.arange(-(-n // br))
        if self.shuffle:
            self._rng.shuffle(blocks)
        carry: EncodedData | None = None
        for w in range(0, len(blocks), self.window_blocks):
            chosen = blocks[w:w + self.window_blocks]
            if self.shuffle:
                rows = np.concatenate([np.arange(b * br, min((b + 1) * br, n)) for b in chosen])
                rows = rows[self._rng.permutation(len(rows))]
                part = self.data.take(rows)
            else:
                lo, hi = int(chosen[0]) * br, min(int(chosen[-1] + 1) * br, n)
                part = self.data.take(np.arange(lo, hi))
            if carry is not None:
                part = EncodedData(np.concatenate([carry.ids, part.ids]), np.concatenate([carry.dense, part.dense]),
                                   np.concatenate([carry.label, part.label]),
                                   weight=None if part.weight is None
                                   else np.concatenate([carry.weight, part.weight]))
                carry = None
            m = len(part)
            full = m - m % bs
            for start in range(0, full, bs):
                if (b := self._to_batch(part, slice(start, start + bs))) is not None:
                    yield b
            if full < m:
                carry = part.take(np.arange(full, m))
        if carry is not None and len(carry) and not self.drop_last:
            if (b := self._to_batch(carry, slice(0, len(carry)))) is not None:
                yield b

    def _to_batch(self, part: EncodedData, sl: slice) -> Batch | None:
        if (share := self._share(sl.start, sl.stop)) is None:
            return None
        sl = slice(*share)
        cuda = self.device.type == "cuda"

        def move(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(a))
            # a pinned staging copy makes the transfer asynchronous; the host allocator keeps it until it is done
            return t.pin_memory().to(self.device, non_blocking=True) if cuda else t.to(self.device)

        return Batch(move(part.ids[sl]), move(part.dense[sl]), move(part.label[sl]),
                     None if part.weight is None else move(part.weight[sl]))
