"""Encoded datasets on disk (memory-mapped) and a batch iterator with no per-sample Python objects.

Layout of a dataset folder: ``ids.i32`` (int32 [n, n_sparse], already offset into the global id space),
``dense.f32`` (float32 [n, n_dense], NaN = missing), ``label.f32`` (float32 [n], or [n, T] for T labels),
optional ``group.i64`` (int64 [n], a hash of the group/user column, for group AUC), optional ``weight.f32``
(float32 [n], sample weights), for multi and sequence fields ``seq.i32`` (int32 [n, n_seq, seq_max], padded
blocks of global ids) and ``seq_len.i32`` (int32 [n, n_seq], how many leading positions of each block hold
ids), and ``meta.json`` with the shapes. An id space wider than int32 (``wide_ids`` in meta.json) keeps its ids in
``ids.i64`` and ``seq.i64`` (int64) instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

_FILES = {"ids": ("ids.i32", np.int32), "dense": ("dense.f32", np.float32),
          "label": ("label.f32", np.float32), "group": ("group.i64", np.int64),
          "seq": ("seq.i32", np.int32), "seq_len": ("seq_len.i32", np.int32),
          "weight": ("weight.f32", np.float32)}
_WIDE = {"ids": ("ids.i64", np.int64), "seq": ("seq.i64", np.int64)}


def _file(key: str, wide: bool) -> tuple[str, type[np.generic]]:
    """File name and dtype of array ``key`` in a dataset folder (int64 ids where ``wide``)."""
    return _WIDE[key] if wide and key in _WIDE else _FILES[key]


class DatasetWriter:
    """Appends encoded chunks to the raw files of a dataset folder, then writes ``meta.json``.

    With multi or sequence fields (``n_seq`` > 0) each chunk's padded blocks go with it to :meth:`append`, or
    later, chunk by chunk in the same order, to :meth:`append_seq`.
    """

    def __init__(self, path: str | Path, n_sparse: int, n_dense: int, with_group: bool = False,
                 n_labels: int = 1, n_seq: int = 0, seq_max: int = 0, with_weight: bool = False,
                 wide_ids: bool = False) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.n_sparse, self.n_dense, self.with_group, self.with_weight = n_sparse, n_dense, with_group, with_weight
        self.n_labels, self.n_seq, self.seq_max, self.wide_ids = n_labels, n_seq, seq_max, wide_ids
        self.n = self.n_seq_rows = 0
        names = (["ids", "dense", "label"] + (["group"] if with_group else []) + (["seq", "seq_len"] if n_seq else [])
                 + (["weight"] if with_weight else []))
        self._fh: dict[str, IO[bytes]] = {k: open(self.path / _file(k, wide_ids)[0], "wb") for k in names}

    def append(self, ids: np.ndarray, dense: np.ndarray, label: np.ndarray, group: np.ndarray | None = None,
               seq: np.ndarray | None = None, seq_len: np.ndarray | None = None,
               weight: np.ndarray | None = None) -> None:
        """Write one chunk; shapes are checked so a bad chunk never corrupts the folder silently."""
        n = len(label)
        if ids.shape != (n, self.n_sparse) or dense.shape != (n, self.n_dense):
            raise ValueError(f"chunk shapes ids {ids.shape} dense {dense.shape} do not match "
                             f"({n}, {self.n_sparse}) / ({n}, {self.n_dense})")
        if label.shape != ((n,) if self.n_labels == 1 else (n, self.n_labels)):
            raise ValueError(f"label shape {label.shape} does not fit {self.n_labels} label(s)")
        if self.with_group and group is None:
            raise ValueError("this dataset has a group column; pass group ids")
        if self.with_weight and weight is None:
            raise ValueError("this dataset has a weight column; pass weights")
        # contiguous arrays are written straight from their buffers, without an intermediate bytes copy
        self._fh["ids"].write(np.ascontiguousarray(ids, dtype=_file("ids", self.wide_ids)[1]).data)
        self._fh["dense"].write(np.ascontiguousarray(dense, dtype=np.float32).data)
        self._fh["label"].write(np.ascontiguousarray(label, dtype=np.float32).data)
        if self.with_group:
            self._fh["group"].write(np.ascontiguousarray(group, dtype=np.int64).data)
        if self.with_weight:
            self._fh["weight"].write(np.ascontiguousarray(weight, dtype=np.float32).data)
        self.n += n
        if seq is not None and seq_len is not None:
            self.append_seq(seq, seq_len)

    def append_seq(self, seq: np.ndarray, seq_len: np.ndarray) -> None:
        """Write the padded blocks [m, n_seq, seq_max] and lengths [m, n_seq] of the next m rows."""
        m = len(seq_len)
        if seq.shape != (m, self.n_seq, self.seq_max) or seq_len.shape != (m, self.n_seq):
            raise ValueError(f"sequence shapes {seq.shape} / {seq_len.shape} do not match "
                             f"({m}, {self.n_seq}, {self.seq_max}) / ({m}, {self.n_seq})")
        self._fh["seq"].write(np.ascontiguousarray(seq, dtype=_file("seq", self.wide_ids)[1]).data)
        self._fh["seq_len"].write(np.ascontiguousarray(seq_len, dtype=np.int32).data)
        self.n_seq_rows += m

    def rewrite(self, sizes: list[int], update: Callable[[np.ndarray, np.ndarray], None]) -> None:
        """Let ``update(ids, dense)`` change in place each run of appended rows in turn (``sizes[i]`` rows in
        the i-th). Each run is read into and written back from one reused buffer, so no fresh memory is touched
        per run, whatever the number of rows."""
        if sum(sizes) != self.n:
            raise ValueError(f"runs of {sum(sizes)} rows in all, but {self.n} rows were appended")
        widths = {"ids": self.n_sparse, "dense": self.n_dense}
        top = max(sizes, default=0)
        bufs = {k: np.empty((top, w), _file(k, self.wide_ids)[1]) for k, w in widths.items()}
        fds: dict[str, int] = {}
        try:
            for k in widths:
                self._fh[k].flush()
                fds[k] = os.open(self.path / _file(k, self.wide_ids)[0], os.O_RDWR)
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
            (self.path / _file(key, self.wide_ids)[0]).unlink(missing_ok=True)

    def close(self, extra: dict[str, Any] | None = None) -> EncodedData:
        """Flush, write ``meta.json`` and return the dataset opened read-only."""
        for fh in self._fh.values():
            fh.close()
        if self.n_seq and self.n_seq_rows != self.n:
            raise ValueError(f"{self.path}: sequences of {self.n_seq_rows} rows were written for {self.n} rows")
        meta = {"n": self.n, "n_sparse": self.n_sparse, "n_dense": self.n_dense, "with_group": self.with_group,
                "with_weight": self.with_weight}
        if self.n_labels != 1:
            meta["n_labels"] = self.n_labels
        if self.n_seq:
            meta.update(n_seq=self.n_seq, seq_max=self.seq_max)
        if self.wide_ids:
            meta["wide_ids"] = True
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
    seq: np.ndarray | None = None
    seq_len: np.ndarray | None = None
    weight: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.label)
        if len(self.ids) != n or len(self.dense) != n or any(
                a is not None and len(a) != n for a in (self.group, self.seq, self.seq_len, self.weight)):
            raise ValueError("ids, dense, label (and group, seq, seq_len, weight) must have the same number of rows")

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

        def load(key: str, *width: int) -> np.ndarray:
            name, dtype = _file(key, bool(meta.get("wide_ids")))
            shape = (n, *width)
            if n == 0 or 0 in width:
                return np.zeros(shape, dtype)
            return np.memmap(p / name, dtype=dtype, mode="r", shape=shape)

        group = load("group") if meta.get("with_group") else None
        n_labels = meta.get("n_labels", 1)
        label = load("label") if n_labels == 1 else load("label", n_labels)
        n_seq = meta.get("n_seq", 0)
        seq = load("seq", n_seq, meta["seq_max"]) if n_seq else None
        seq_len = load("seq_len", n_seq) if n_seq else None
        weight = load("weight") if meta.get("with_weight") else None
        return cls(ids=load("ids", meta["n_sparse"]), dense=load("dense", meta["n_dense"]),
                   label=label, group=group, meta=meta, seq=seq, seq_len=seq_len, weight=weight)

    def _map(self, f: Callable[[np.ndarray], np.ndarray]) -> EncodedData:
        """The dataset with ``f`` applied to each of its arrays."""
        def opt(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else f(a)
        return EncodedData(ids=f(self.ids), dense=f(self.dense), label=f(self.label), group=opt(self.group),
                           meta=self.meta, seq=opt(self.seq), seq_len=opt(self.seq_len), weight=opt(self.weight))

    def take(self, index: np.ndarray | slice) -> EncodedData:
        """Rows at ``index`` as an in-memory dataset."""
        return self._map(lambda a: a[index])

    def concat(self, other: EncodedData) -> EncodedData:
        """``other``'s rows after these, in memory; both must hold the same arrays (a group, a weight, sequences)."""
        mine, theirs = ((d.group, d.seq, d.seq_len, d.weight) for d in (self, other))
        if any((a is None) != (b is None) for a, b in zip(mine, theirs)):
            raise ValueError("concat: the datasets hold different arrays (group, seq, seq_len or weight)")

        def cat(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            return None if a is None or b is None else np.concatenate([np.asarray(a), np.asarray(b)])
        return EncodedData(ids=np.concatenate([self.ids, other.ids]), dense=np.concatenate([self.dense, other.dense]),
                           label=np.concatenate([self.label, other.label]), group=cat(self.group, other.group),
                           meta=self.meta, seq=cat(self.seq, other.seq), seq_len=cat(self.seq_len, other.seq_len),
                           weight=cat(self.weight, other.weight))

    def in_memory(self) -> EncodedData:
        """The same data read fully into RAM (fast random access for shuffling)."""
        return self._map(lambda a: np.asarray(a).copy())

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what loading into memory costs)."""
        return int(sum(a.nbytes for a in (self.ids, self.dense, self.label, self.seq, self.seq_len)
                       if a is not None))


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


BATCH_FIELDS = tuple(f.name for f in fields(Batch))  # every tensor a batch may hold


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

    ``fill_last`` fills an epoch's last, partial batch up to ``batch_size`` with the first rows of that epoch's
    order (as torch's DistributedSampler pads), so that every batch has one shape: a GPU step captured for it
    replays for the last batch too, where a batch of its own shape ran eagerly (8.5 ms against a 1.9 ms step
    for DeepFM at 65,536 rows on an H100). Every row is still trained once an epoch, :attr:`repeated` of them
    twice.

    :attr:`into`, when set to a :class:`Batch` of full-batch shapes (a captured GPU step's input buffers), makes
    the resident path gather each full batch straight into its tensors and yield that Batch, instead of
    gathering into new tensors that the step then copies (the gather is queued behind the steps before it).
    """

    def __init__(self, data: EncodedData, batch_size: int = 4096, shuffle: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", drop_last: bool = False, block_rows: int = 1 << 16,
                 window_blocks: int = 16, resident: bool | None = None,
                 resident_bytes: int | None = None, rank: int = 0, world_size: int = 1,
                 fill_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if fill_last and (drop_last or world_size > 1):
            raise ValueError("fill_last fills one process's last batch: not with drop_last or several ranks")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.rank, self.world_size = rank, world_size
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.device = torch.device(device)
        self.drop_last, self.block_rows, self.window_blocks = drop_last, block_rows, window_blocks
        self.fill_last = fill_last
        self.into: Batch | None = None
        self._rng = np.random.default_rng(seed)
        self._gen = torch.Generator(device=self.device if self.device.type == "cuda" else "cpu").manual_seed(seed)
        if resident_bytes is None:
            resident_bytes = torch.cuda.mem_get_info(self.device)[0] // 2 if self.device.type == "cuda" else 4 << 30
        if resident is None:
            resident = data.nbytes <= resident_bytes
        self.resident = resident
        self._tensors: dict[str, torch.Tensor] | None = None
        if resident:
            self._tensors = {k: _resident_tensor(v, self.device) for k, v in _parts(data).items()}

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def repeated(self) -> int:
        """Rows an epoch trains twice: those that :attr:`fill_last` adds to its last batch."""
        n, bs = len(self.data), self.batch_size
        return (bs - n % bs) % bs if self.fill_last and n > bs else 0

    def __iter__(self) -> Iterator[Batch]:
        if self._tensors is not None:
            yield from self._iter_resident()
        else:
            yield from self._iter_blocks()

    def _iter_resident(self) -> Iterator[Batch]:
        assert self._tensors is not None
        t = self._tensors
        n, bs = len(t["label"]), self.batch_size
        order = torch.randperm(n, generator=self._gen, device=self._gen.device) if self.shuffle else None
        stop = n - n % bs if self.drop_last else n
        for start in range(0, stop, bs):
            if (share := self._share(start, min(start + bs, n))) is None:
                continue
            idx = slice(*share) if order is None else order[share[0]:share[1]]
            if start + bs > n and self.repeated:
                head = torch.arange(self.repeated, device=self.device) if order is None else order[:self.repeated]
                idx = torch.cat([torch.arange(start, n, device=self.device) if order is None else idx, head])
            yield self._gather(t, idx)

    def _gather(self, t: dict[str, torch.Tensor], idx: torch.Tensor | slice) -> Batch:
        """The rows ``idx`` of the resident tensors, gathered into :attr:`into` where it has their shapes."""
        into = self.into
        rows = (idx.stop - idx.start) if isinstance(idx, slice) else len(idx)
        if into is None or len(into) != rows or any((getattr(into, k) is None) != (k not in t) for k in BATCH_FIELDS):
            return Batch(**{k: v[idx] for k, v in t.items()})
        for k, v in t.items():
            out = getattr(into, k)
            if isinstance(idx, slice):
                out.copy_(v[idx])
            else:
                torch.index_select(v, 0, idx, out=out)
        return into

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
        carry: dict[str, np.ndarray] | None = None
        head: dict[str, np.ndarray] | None = None  # the epoch's first rows, for fill_last
        for w in range(0, len(blocks), self.window_blocks):
            chosen = blocks[w:w + self.window_blocks]
            if self.shuffle:
                rows = np.concatenate([np.arange(b * br, min((b + 1) * br, n)) for b in chosen])
                rows = rows[self._rng.permutation(len(rows))]
                part = _parts(self.data.take(rows))
            else:
                lo, hi = int(chosen[0]) * br, min(int(chosen[-1] + 1) * br, n)
                part = _parts(self.data.take(np.arange(lo, hi)))
            if carry is not None:
                part = {k: np.concatenate([carry[k], v]) for k, v in part.items()}
                carry = None
            if head is None and self.repeated:
                head = {k: v[:self.repeated].copy() for k, v in part.items()}
            m = len(part["label"])
            full = m - m % bs
            for start in range(0, full, bs):
                if (b := self._to_batch(part, slice(start, start + bs))) is not None:
                    yield b
            if full < m:
                carry = {k: v[full:] for k, v in part.items()}
        if carry is not None and len(carry["label"]) and not self.drop_last:
            if head is not None:
                carry = {k: np.concatenate([v, head[k]]) for k, v in carry.items()}
            if (b := self._to_batch(carry, slice(0, len(carry["label"])))) is not None:
                yield b

    def _to_batch(self, part: dict[str, np.ndarray], sl: slice) -> Batch | None:
        if (share := self._share(sl.start, sl.stop)) is None:
            return None
        sl = slice(*share)
        cuda = self.device.type == "cuda"

        def move(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(a))
            # a pinned staging copy makes the transfer asynchronous; the host allocator keeps it until it is done
            return t.pin_memory().to(self.device, non_blocking=True) if cuda else t.to(self.device)

        return Batch(**{k: move(v[sl]) for k, v in part.items()})


def _parts(data: EncodedData) -> dict[str, np.ndarray]:
    """The arrays of ``data`` that a :class:`Batch` carries, by the Batch's field names."""
    out = {"ids": data.ids, "dense": data.dense, "label": data.label}
    if data.seq is not None and data.seq_len is not None:
        out.update(seq=data.seq, seq_len=data.seq_len)
    if data.weight is not None:
        out["weight"] = data.weight
    return out
