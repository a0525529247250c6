"""Encoder: fitted on the training split only, turns typed chunks into ids in one global id space.

Per sparse field f the ids ``offset_f + k`` are: k = 0 missing, k = 1 out-of-vocabulary (vocabulary fields),
then the vocabulary in order of decreasing training count (ties by value). Hashed fields use k = 1..N for
their N buckets (a stable CRC32 of the value); bucketized numerics use k = 1..nb for their quantile bins.
Dense (numeric) fields are scaled with statistics of the training split; a missing value stays NaN and the
model gives it a learned embedding. Multi and sequence fields have an id block of their own laid out the same
way (the items of every row are counted), or, with ``share_vocab``, use the block of the field they name,
whose vocabulary is then fitted on both columns; each row's items become a padded block of ids with a length
(see :mod:`ctrkit.data.dataset`). The schema's ``stats`` add two dense columns each, after the numeric fields:
training rows get them as of their own time, every other row from the snapshot the fit leaves
(:mod:`ctrkit.data.rolling`). The encoder saves as ``encoder.json`` + ``vocab.parquet`` (+ ``stats.parquet``):
never pickle.

``encode_files`` is the fast path from raw files to encoded datasets: each training row is parsed once.
:meth:`Encoder.encode_records` and :meth:`Encoder.encode_json` are the fast path of scoring: plain records, dicts
or the JSON bytes of a request, to ids in one pass of the compiled module ``ctrkit.data._records`` (where it
was built), with the typed-frame path as their reference and fallback.
Values are matched through polars' 64-bit hash of the string (computed in this process for both the
vocabulary and the data, never stored), which turns counting and vocabulary lookups into probes of an
integer hash table held in numpy arrays.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
import tempfile
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ctrkit.data.dataset import DatasetWriter, EncodedData
from ctrkit.data.readers import Prefetch, ReadReport, Source, iter_chunks
from ctrkit.data.rolling import History, Snapshot
from ctrkit.schema import Field, Schema

try:  # compiled at install where a C compiler is present; the reference path serves without it
    from ctrkit.data import _records
except ImportError:  # pragma: no cover - depends on the install
    _records = None

MISSING, OOV = 0, 1
# hashed buckets from which ids are int64: the id space may pass int32 once the vocabularies are added
WIDE_BUCKETS = 1 << 30
ENCODER_FORMAT = 1
_SAMPLE_SIZE = 200_000


class EncoderError(ValueError):
    """The encoder was used before fitting, or on data it cannot encode."""


_SEED = 0x5EED


def _hash(col: str) -> pl.Expr:
    return pl.col(col).hash(seed=_SEED)


def _crc_table() -> np.ndarray:
    """CRC-32's (IEEE, reflected) byte table: each byte value's CRC, without the pre- and post-inversion."""
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(0xEDB88320), t >> 1)
    return t.astype(np.uint32)


_CRC_TABLE = _crc_table()


def _crc32(values: pl.Series, vector_bytes: int = 64) -> np.ndarray:
    """uint32 CRC-32 of each string's UTF-8 bytes, equal to ``zlib.crc32``; null counts as "".

    Byte j of every string of at most ``vector_bytes`` bytes that is at least j + 1 bytes long is folded in
    at once (strings sorted by length, so those are a slice), a few numpy operations per byte position instead
    of a Python call per string; the rare longer strings go to ``zlib.crc32`` one by one.
    """
    arr = values.fill_null("").cast(pl.Binary).rechunk().to_arrow(compat_level=pl.CompatLevel.oldest())
    _, offset_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offset_buf, np.int64)[arr.offset: arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")
    starts, negative_lengths = offsets[:-1][order], -lengths[order]
    crc = np.full(len(lengths), 0xFFFFFFFF, np.uint32)
    n_long = int(np.searchsorted(negative_lengths, -vector_bytes))  # longer than vector_bytes: a prefix
    for i in range(n_long):
        crc[i] = zlib.crc32(data[starts[i]: starts[i] - negative_lengths[i]].tobytes()) ^ 0xFFFFFFFF
    for j in range(int(-negative_lengths[n_long]) if n_long < len(lengths) else 0):
        k = int(np.searchsorted(negative_lengths, -j))  # strings longer than j bytes end at k
        c = crc[n_long:k]
        crc[n_long:k] = _CRC_TABLE[(c ^ data[starts[n_long:k] + j]) & 0xFF] ^ (c >> np.uint32(8))
    out = np.empty_like(crc)
    out[order] = crc ^ np.uint32(0xFFFFFFFF)
    return out


def _hash_buckets(column: pl.Series, n: int) -> np.ndarray:
    """Bucket 1..n of each value of a hashed field (0 where null or empty): a stable CRC32 of the value, the
    same in every process and version, computed once per distinct value (told apart by their 64-bit hash)."""
    hashes = pl.DataFrame({"h": column.hash(seed=_SEED)})
    first = hashes.with_row_index("i").group_by("h").agg(pl.col("i").first())
    values = column.gather(first["i"])
    buckets = _crc32(values).astype(np.int64) % n + 1
    buckets[(values.is_null() | (values.str.len_bytes() == 0)).to_numpy()] = MISSING
    table = pl.DataFrame({"h": first["h"], "b": buckets})
    return hashes.join(table, on="h", how="left", maintain_order="left")["b"].to_numpy()


class _CatStats:
    """Running counts of one vocabulary field: a hash table from value hash to a dense index, the count of
    each index and its string. Memory follows the number of distinct values, not the number of rows."""

    def __init__(self) -> None:
        self.table = _HashTable(np.zeros(0, np.uint64), np.zeros(0, np.int32), default=-1)
        self.counts = np.zeros(0, np.int64)
        self.strings: list[pl.Series] = []

    def add(self, hashes: np.ndarray, values: pl.Series) -> np.ndarray:
        """Count one chunk's values (``hashes`` are their hashes, row by row); returns each row's dense index."""
        idx, first = self.table.intern(hashes)
        if len(first):
            self.strings.append(values.gather(first))  # one row per new value: equal hashes mean equal strings
            self.counts = np.concatenate([self.counts, np.zeros(len(first), np.int64)])
        self.counts += np.bincount(idx, minlength=len(self.counts))
        return idx

    def add_blanks(self) -> None:
        """Give null and "" an index without counting them, so that looking them up in ``table`` finds them."""
        blank = pl.Series("s", [None, ""], dtype=pl.String)
        _, first = self.table.intern(blank.hash(seed=_SEED).to_numpy())
        if len(first):
            self.strings.append(blank.gather(first))
            self.counts = np.concatenate([self.counts, np.zeros(len(first), np.int64)])

    def table_of_counts(self) -> pl.DataFrame:
        """(s, n): every distinct value seen with its count."""
        strings = pl.concat(self.strings) if self.strings else pl.Series("s", [], pl.String)
        return pl.DataFrame({"s": strings.rename("s"), "n": self.counts,
                             "i": np.arange(len(self.counts), dtype=np.int32)})


@dataclass
class _NumStats:
    """Running moments of the transformed value and a bounded sample for quantile bins.

    The sample keeps the values of the ``_SAMPLE_SIZE`` rows with the smallest key, a fixed pseudo-random
    function of the row's position in the training data, so it does not depend on how the data was chunked.
    """

    n: int = 0
    s1: float = 0.0
    s2: float = 0.0
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    sample: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))

    def add_sample(self, keys: np.ndarray, values: np.ndarray) -> None:
        k = np.concatenate([self.keys, keys])
        v = np.concatenate([self.sample, values])
        if len(k) > _SAMPLE_SIZE:
            top = np.argpartition(k, _SAMPLE_SIZE - 1)[:_SAMPLE_SIZE]
            k, v = k[top], v[top]
        self.keys, self.sample = k, v


def _row_keys(start: int, n: int) -> np.ndarray:
    """A fixed pseudo-random uint64 per training row position (splitmix64 of the position)."""
    z = np.arange(start, start + n, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _pre_transform(values: np.ndarray, transform: str) -> np.ndarray:
    """The part of a numeric transform that needs no statistics: signed log1p, NaN stays NaN.

    numpy's log1p is vectorized (several times cheaper than polars' element-wise one), and fitting, encoding
    and scoring all go through this one function, so training and serving see bit-identical values.
    """
    if transform in ("log1p_standardize", "log1p"):
        t = np.abs(values)
        np.log1p(t, out=t)
        return np.copysign(t, values, out=t)
    return values


def _numeric(chunk: pl.DataFrame, name: str) -> np.ndarray:
    """float64 values of a numeric column, nulls as NaN; a read-only view of polars' buffer when none is null.

    Read from the column's Arrow buffers: the values where the validity bit is set, NaN elsewhere, in one
    pass; polars' own conversion of a column with nulls costs five times more.
    """
    arr = chunk[name].cast(pl.Float64).to_arrow()
    validity, data = arr.buffers()
    if len(arr) == 0 or data is None:
        return np.full(len(arr), np.nan)
    values = np.frombuffer(data, np.float64, count=len(arr), offset=arr.offset * 8)
    if validity is None or arr.null_count == 0:
        return values
    valid = np.unpackbits(np.frombuffer(validity, np.uint8), count=arr.offset + len(arr), bitorder="little")
    return np.where(valid[arr.offset:].view(np.bool_), values, np.nan)


_SLOT = np.dtype([("k", np.uint64), ("v", np.int32), ("used", np.bool_)], align=True)


class _HashTable:
    """uint64 key -> int32 id, open addressing with linear probing in numpy arrays, for vectorized lookups.

    Keys are already uniform hashes, so the slot is the key's top bits; the table stays at most half full
    (before new keys go in, it grows to fit them as if they were all distinct), so most lookups end at their
    first slot; it takes 32 to 64 bytes per key, more while a chunk's repeats inflate that count. Unknown
    keys get ``default``. A slot stores ``id - default``, so an empty slot is all zeros and a new table is
    fresh memory that costs nothing until probed.
    This is 2-3 times cheaper than a polars join against the same vocabulary, which rebuilds its hash table
    on every call, and 3 times cheaper than a group-by for counting values.
    """

    def __init__(self, keys: np.ndarray, ids: np.ndarray, default: int) -> None:
        self.default = int(default)
        self.n = 0
        self._alloc(len(keys))
        self.insert(keys, ids)

    def _alloc(self, n: int) -> None:
        bits = max(int(np.ceil(np.log2(max(n, 1) * 2))), 4)
        self.shift = np.uint64(64 - bits)
        self.mask = (1 << bits) - 1
        # key, id and used flag share one 16-byte record, so a probe costs one cache miss, not three
        self.rec = np.zeros(1 << bits, _SLOT)

    def _reserve(self, extra: int) -> None:
        """Grow (rehashing every key) if ``extra`` more keys would make the table more than half full."""
        if 2 * (self.n + extra) <= len(self.rec):
            return
        old = self.rec[self.rec["used"]]
        self._alloc(self.n + extra)
        self.n = 0
        self.insert(old["k"], old["v"] + np.int32(self.default))

    def insert(self, keys: np.ndarray, ids: np.ndarray) -> None:
        """Add keys that are distinct and not in the table yet; the table grows to stay at most half full."""
        keys = keys.astype(np.uint64, copy=False)
        self._reserve(len(keys))
        self.rec["v"][self._claim(keys)] = np.asarray(ids, dtype=np.int32) - np.int32(self.default)
        self.n += len(keys)

    def _claim(self, keys: np.ndarray) -> np.ndarray:
        """Claim a free slot for each key (none is in the table; equal keys share one) and return the slots.

        All keys probe in step: where several aim at one free slot, one survives, with its repeats.
        """
        rk, rused = self.rec["k"], self.rec["used"]
        slot = (keys >> self.shift).view(np.intp).copy()
        at = np.empty(len(keys), np.intp)
        todo = np.arange(len(keys))
        while len(todo):
            s = slot[todo]
            k = keys[todo]
            m = ~rused[s]
            rk[s[m]] = k[m]
            rused[s[m]] = True
            done = rk[s] == k  # every key is absent, so a match is a slot claimed in this call
            at[todo[done]] = s[done]
            todo = todo[~done]
            slot[todo] = (slot[todo] + 1) & self.mask
        return at

    def intern(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Id of each key, giving unknown keys the next ids, for a table whose ids number its keys 0..n-1.

        Returns the ids and, per new id in order, the position of one key that got it. Repeated unknown keys
        need no separate de-duplication: they claim one slot together.
        """
        keys = keys.astype(np.uint64, copy=False)
        ids = self.lookup(keys)
        miss = np.flatnonzero(ids == self.default)
        if len(miss) == 0:
            return ids, miss
        missed = keys[miss]
        self._reserve(len(miss))  # repeats make this an upper bound: counting distinct keys costs more
        at = self._claim(missed)
        # number the claimed slots: a position that survives in its slot stands for its key
        rv = self.rec["v"]
        rv[at] = np.arange(len(missed), dtype=np.int32)
        rep = rv[at]
        first = np.zeros(len(missed), bool)
        first[rep] = True
        new_ids = (np.cumsum(first, dtype=np.int32) - 1 + self.n)[rep]
        rv[at] = new_ids - np.int32(self.default)
        ids[miss] = new_ids
        new = np.flatnonzero(first)
        self.n += len(new)
        return ids, miss[new]

    def lookup(self, query: np.ndarray) -> np.ndarray:
        """int32 id of each key in ``query`` (``default`` where absent)."""
        q = query.astype(np.uint64, copy=False)
        slot = (q >> self.shift).view(np.intp)  # the top bits of a key: the sign bit is always clear
        first = self.rec[slot]
        out = first["v"] + np.int32(self.default)
        idx = np.flatnonzero(first["k"] != q)
        if len(idx):
            out[idx] = self.default
            idx = idx[first["used"][idx]]  # the first slot holds another key: probe on
            s = slot[idx]
            while len(idx):
                s = (s + 1) & self.mask
                r = self.rec[s]
                hit = r["k"] == q[idx]
                out[idx[hit]] = r["v"][hit] + np.int32(self.default)
                more = ~hit & r["used"]
                idx, s = idx[more], s[more]
        return out


@dataclass
class JsonRecords:
    """Records read from a JSON body by :meth:`Encoder.encode_json`: ``n`` of them, each one's byte span in the
    body, the values of its ``extra`` keys (NaN where absent or null), and the body's other members as a JSON
    object (``rest``); the encoded rows wait for :meth:`Encoder.finish_json`."""

    n: int
    rest: bytes
    spans: np.ndarray
    extras: np.ndarray
    ids: np.ndarray
    numbers: np.ndarray
    missing: np.ndarray


class Encoder:
    """Vocabularies and numeric statistics for a :class:`Schema`, fitted on training data only."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.fitted = False
        self.vocab: dict[str, pl.Series] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.boundaries: dict[str, np.ndarray] = {}
        self.moments: dict[str, tuple[float, float]] = {}
        self.sizes: dict[str, int] = {}
        self.offsets: dict[str, int] = {}
        self.n_ids = 0
        self.train_rows = 0
        self._luts: tuple[_HashTable, dict[str, np.uint64]] | None = None
        self._plan: Any = None  # encode_records' compiled plan; False where it does not apply
        self._luts_lock = threading.Lock()
        self._fit_tables: dict[str, _HashTable] = {}
        self._remap: dict[str, np.ndarray] = {}
        self._cat_stats: dict[str, _CatStats] = {}
        self._num_stats: dict[str, _NumStats] = {}
        self._seed = 0
        self.snapshot: Snapshot | None = None  # the stats' counts as of the end of training
        self._history: History | None = None
        self._as_of: np.ndarray | None = None  # training rows' unscaled stat features, in the order observed

    # -- shape ---------------------------------------------------------------------------------------
    @property
    def sparse_names(self) -> list[str]:
        """Sparse field names, in the column order of ``ids``."""
        return [f.name for f in self.schema.sparse_fields]

    @property
    def dense_names(self) -> list[str]:
        """Dense column names, in the column order of ``dense``: numeric fields, then the stats' features."""
        return [f.name for f in self.schema.dense_fields] + self.schema.stat_columns

    def unseen(self, ids: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """Per categorical field with a vocabulary (crosses included), which rows of encoded ``ids`` hold a value
        training did not keep (the field's OOV id: never seen, or seen fewer than ``min_count`` times): the
        cold-start rows, one field's mask at a time. Hashed fields have no such id and are left out."""
        oov = self.oov_ids()
        for j, name in enumerate(self.sparse_names):
            if name in oov:
                yield name, np.asarray(ids[:, j]) == oov[name]

    def oov_ids(self) -> dict[str, int]:
        """The global OOV id of every vocabulary field (crosses included): where unseen values land."""
        self._check_fitted()
        return {f.name: self.offsets[f.name] + OOV for f in self._vocab_fields()}

    @property
    def seq_names(self) -> list[str]:
        """Multi and sequence field names, in the order of the blocks of ``seq``."""
        return [f.name for f in self.schema.list_fields]

    @property
    def seq_max(self) -> int:
        """Positions of each block of ``seq``: the largest ``max_len`` of the list fields (0 without any)."""
        return max((f.max_len for f in self.schema.list_fields), default=0)

    @property
    def wide_ids(self) -> bool:
        """Whether ids are int64: the schema's hashed fields hold at least :data:`WIDE_BUCKETS` buckets (an id
        space that int32 may not hold; the vocabulary fields then come first in it, the hashed ones last)."""
        return sum(int(f.hash_buckets) for f in self.schema.features if f.hash_buckets) >= WIDE_BUCKETS

    @property
    def id_dtype(self) -> type[np.signedinteger]:
        """The dtype of encoded ids: int32, or int64 for a wide id space (:attr:`wide_ids`)."""
        return np.int64 if self.wide_ids else np.int32

    def layout(self) -> dict[str, Any]:
        """Label and sequence widths and the id dtype of an encoded dataset of this encoder (the DatasetWriter
        keywords)."""
        return {"n_labels": len(self.schema.label_columns), "n_seq": len(self.seq_names), "seq_max": self.seq_max,
                "with_weight": bool(self.schema.weight), "wide_ids": self.wide_ids}

    def labels(self, chunk: pl.DataFrame) -> np.ndarray:
        """float32 labels of a typed chunk: [n] for one label, [n, T] for T."""
        cols = self.schema.label_columns
        if len(cols) == 1:
            return chunk[cols[0]].to_numpy()
        return np.stack([chunk[c].to_numpy() for c in cols], axis=1).astype(np.float32, copy=False)

    def field_sizes(self) -> list[int]:
        """Number of ids of each sparse field, in ``ids`` column order."""
        self._check_fitted()
        return [self.sizes[n] for n in self.sparse_names]

    def _field(self, name: str) -> Field:
        """The field (crosses included) called ``name``."""
        return next(f for f in self.schema.features if f.name == name)

    def _vocab_fields(self) -> list[Field]:
        return [f for f in self.schema.features if f.kind == "categorical" and f.hash_buckets is None]

    def _list_vocab_fields(self) -> list[Field]:
        """Multi / sequence fields with a vocabulary of their own."""
        return [f for f in self.schema.list_fields if f.hash_buckets is None and f.share_vocab is None]

    # -- fitting -------------------------------------------------------------------------------------
    def _begin_fit(self, seed: int = 0) -> None:
        self._seed = int(seed)
        self._cat_stats = {f.name: _CatStats() for f in self._vocab_fields() + self._list_vocab_fields()}
        self._num_stats = {f.name: _NumStats() for f in self.schema.fields if f.kind == "numeric"}
        self._history = History(self.schema.stats) if self.schema.stats else None
        self.train_rows = 0

    def _observe(self, chunk: pl.DataFrame, hashes: pl.DataFrame) -> dict[str, np.ndarray]:
        """Update running statistics with one typed chunk (and its precomputed hash columns).

        Returns, per vocabulary field, ``i:<field>``: each row's dense index in the field's counts (after
        fitting, ``self._remap[field][index]`` is the row's id, so rows seen while fitting need no second
        lookup; index -1, a value never seen, gives the out-of-vocabulary id), and per dense field
        ``t:<field>``: its values with the statistics-free part of the transform applied.
        """
        first_row = self.train_rows
        self.train_rows += chunk.height
        out = {f"i:{f.name}": self._cat_stats[f.name].add(hashes[f"h:{f.name}"].to_numpy(), chunk[f.name])
               for f in self._vocab_fields()}
        if self._history is not None:
            self._history.add(chunk[str(self.schema.time)], self.labels(chunk), {
                st.field: out[f"i:{st.field}"] if f"i:{st.field}" in out else
                _hash_buckets(chunk[st.field], int(self._field(st.field).hash_buckets or 1))
                for st in self.schema.stats or ()})
        for f in self.schema.list_fields:
            if f.hash_buckets is None:
                items = _items(chunk[f.name])
                self._cat_stats[f.share_vocab or f.name].add(items.hash(seed=_SEED).to_numpy(), items)
        for name, st in self._num_stats.items():
            f = self.schema.field(name)
            raw = _numeric(chunk, name)
            t = _pre_transform(raw, f.transform)
            if f.transform != "bucketize":
                out[f"t:{name}"] = t
            ok = ~np.isnan(raw)
            n_ok = int(np.count_nonzero(ok))
            if n_ok == 0:
                continue
            v = np.where(ok, t, 0.0)  # a missing value adds nothing to the sums (cheaper than leaving it out)
            st.n += n_ok
            st.s1 += float(v.sum())
            st.s2 += float(np.einsum("i,i->", v, v))  # not np.dot: BLAS threads would spin against polars
            if f.transform == "bucketize":
                st.add_sample(_row_keys(first_row + (self._seed << 40), chunk.height)[ok], raw[ok])
        return out

    def _finish_fit(self) -> None:
        blocks: list[Field] = []  # the fields that own a block of the id space
        remaps: dict[str, np.ndarray] = {}
        self.vocab, self.counts, self.boundaries, self.moments, self.sizes, self.offsets = {}, {}, {}, {}, {}, {}
        for f in self.schema.features:
            if f.share_vocab is not None:
                continue  # the block of the field it names
            if f.kind in ("categorical", "multi", "sequence") and f.hash_buckets is None:
                st = self._cat_stats[f.name]
                st.add_blanks()
                seen = st.table_of_counts()
                table = seen.filter((pl.col("n") >= f.min_count) & (pl.col("s").str.len_bytes() > 0))
                table = table.sort(["n", "s"], descending=[True, False])
                values, counts = table["s"], table["n"].to_numpy()
                remap = np.full(seen.height + 1, OOV, np.int32)  # the last entry: index -1, never seen
                remap[seen.filter(pl.col("s").is_null() | (pl.col("s") == ""))["i"].to_numpy()] = MISSING
                remap[table["i"].to_numpy()] = np.arange(2, 2 + table.height, dtype=np.int32)
                remaps[f.name] = remap
                self.vocab[f.name] = values.rename(f.name)
                self.counts[f.name] = counts
                self.sizes[f.name] = 2 + len(values)
            elif f.kind != "numeric":
                self.sizes[f.name] = 1 + int(f.hash_buckets or 0)
            else:
                st = self._num_stats[f.name]
                mean = st.s1 / st.n if st.n else 0.0
                var = max(st.s2 / st.n - mean * mean, 0.0) if st.n else 1.0
                self.moments[f.name] = (mean, float(np.sqrt(var)) if var > 0 else 1.0)
                if f.transform == "bucketize":
                    sample = st.sample
                    qs = np.quantile(sample, np.linspace(0, 1, f.n_buckets + 1)[1:-1]) if len(sample) else np.zeros(0)
                    self.boundaries[f.name] = np.unique(qs)
                    self.sizes[f.name] = 2 + len(self.boundaries[f.name])
            if f.is_sparse or f.is_list:
                blocks.append(f)
        if self.wide_ids:  # vocabulary ids stay under 2^31 (their lookup table holds int32), hashed ones follow
            blocks.sort(key=lambda f: f.hash_buckets is not None)
        offset = 0
        for f in blocks:
            self.offsets[f.name] = offset
            offset += self.sizes[f.name]
            if offset > np.iinfo(np.int32).max and not (self.wide_ids and f.hash_buckets is not None):
                raise EncoderError(f"the id space passes 2^31 at field {f.name!r} ({offset:,} ids): int32 ids "
                                   f"cannot hold it (hashed fields of {WIDE_BUCKETS:,} buckets or more make them "
                                   "int64)")
        for f in self.schema.list_fields:
            if f.share_vocab is not None:
                self.offsets[f.name] = self.offsets[f.share_vocab]
        self.n_ids = offset
        self._remap = {k: v + self.offsets[k] for k, v in remaps.items()}
        if self._history is not None:
            hashed = {f: np.arange(self.sizes[f]) for f in self._history.fields if f not in remaps}  # bucket = id
            self._as_of, self.snapshot = self._history.finish({**remaps, **hashed}, self.sizes)
            self._history = None
            for name, column in zip(self.schema.stat_columns, self._as_of.T.astype(np.float64)):
                self.moments[name] = (float(column.mean()), float(column.std()) or 1.0)
        # until _drop_fit_state, values are looked up in the fitting tables (hash -> index) and remapped:
        # tables for the vocabulary alone would cost as much again to build, in time and memory
        self._fit_tables = {k: st.table for k, st in self._cat_stats.items()}
        self._cat_stats, self._num_stats = {}, {}
        self._luts = self._plan = None
        self.fitted = True

    def _drop_fit_state(self) -> None:
        """Let go of what only the fitting pass needs (index remaps, hash tables of every value seen, the
        training rows' stat features)."""
        self._remap, self._fit_tables, self._as_of = {}, {}, None

    def _lookup_table(self) -> tuple[_HashTable, dict[str, np.uint64]]:
        """One table from (field, value hash) to global id for every vocabulary, built on first use, and each
        field's salt: a value's key is its hash plus the salt (mod 2^64), so all the fields of a batch are looked
        up in one call. Null and "" map to the field's missing id; a key not in the table gets -1 (OOV)."""
        with self._luts_lock:
            if self._luts is None:
                blank = pl.Series("s", [None, ""], dtype=pl.String).hash(seed=_SEED).to_numpy()
                salts = dict(zip(self.vocab, _row_keys(0, len(self.vocab))))
                keys, ids = [np.zeros(0, np.uint64)], [np.zeros(0, np.int32)]
                for name, values in self.vocab.items():
                    off = self.offsets[name]
                    keys.append(np.concatenate([values.hash(seed=_SEED).to_numpy(), blank]) + salts[name])
                    ids.append(np.concatenate([np.arange(2, 2 + len(values), dtype=np.int32) + off,
                                               np.array([off + MISSING, off + MISSING], dtype=np.int32)]))
                self._luts = (_HashTable(np.concatenate(keys), np.concatenate(ids), default=-1), salts)
            return self._luts

    def records_plan(self) -> Any:
        """The compiled plan of :meth:`encode_records`, built on first use (a few ms per 100k vocabulary values):
        None without the compiled module or for a schema it does not cover (list fields and crosses take frames)."""
        with self._luts_lock:
            if self._plan is None:
                self._plan = False
                if _records is not None and not self.schema.list_fields and not self.schema.crosses:
                    sparse = {f.name: j for j, f in enumerate(self.schema.sparse_fields)}
                    numbers = [f.name for f in self.schema.fields if f.kind == "numeric"]
                    spec = []  # per field: (name, kind, column, vocabulary, first id, buckets, required)
                    for f in self.schema.fields:
                        if f.kind == "numeric":  # a raw number; bucketized and scaled by _from_numbers
                            spec.append((f.name, 2, numbers.index(f.name), None, 0, 0, f.required))
                        elif f.hash_buckets is not None:
                            spec.append((f.name, 1, sparse[f.name], None, self.offsets[f.name], int(f.hash_buckets),
                                         f.required))
                        else:
                            spec.append((f.name, 0, sparse[f.name], _vocab_table(self.vocab[f.name]),
                                         self.offsets[f.name], 0, f.required))
                    self._plan = _records.Plan(spec, len(sparse), len(numbers))
            return self._plan or None

    def encode_records(self, records: Any, context: dict[str, Any] | None = None,
                       extra: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids, dense) of raw records (a dict or a list of dicts, ``context`` and ``extra`` as in
        :func:`ctrkit.validate.records_frame`) in one compiled pass, or None: then the records need the reference
        path (records_frame -> coerce_chunk -> :meth:`transform_frame`), which gives the same ids for plain records
        and names any bad value.

        Plain means: every field present (in the record or ``context``), categories as str, int or None, numbers
        as finite float, int or None, no None in a required field, and no unknown key where ``extra`` is given. It
        is 3-4 times cheaper than the reference path for a ranking request, whose cost is otherwise mostly one
        Python object per value.
        """
        self._check_fitted()
        plan = None if self._fit_tables else self.records_plan()
        rows = [records] if type(records) is dict else records
        if plan is None or type(rows) not in (list, tuple):
            return None
        if context and (type(context) is not dict or not context.keys() <= set(self.schema.input_columns)):
            return None
        ids = np.empty((len(rows), len(self.schema.sparse_fields)), self.id_dtype)
        numbers = np.empty((len(rows), sum(f.kind == "numeric" for f in self.schema.fields)))
        if not plan.encode(rows, context or None, ids, numbers, None if extra is None else tuple(extra)):
            return None
        if self._reads_values(ids):
            return None
        return ids, self._from_numbers(ids, numbers)

    def encode_json(self, body: bytes, key: str, extra: Sequence[str] = (),
                    max_records: int | None = None) -> JsonRecords | None:
        """The records of a JSON object's member ``key`` (an array of record objects), read from its bytes
        straight into ids and numbers by the compiled plan, with no Python object per value (escapes in text
        values decoded); None when the body is not plain (see :meth:`encode_records`; also an escape in a key, a
        float category, a key twice, an unknown key, or JSON it cannot read): the reference path, a JSON reader then
        :meth:`encode_records` or frames, reads it and says what is wrong. :meth:`finish_json` completes it once
        the body's other members (a context) are read. A body of more than ``max_records`` records is not plain
        (a server's batch limit: the reference path reports it)."""
        self._check_fitted()
        plan = None if self._fit_tables else self.records_plan()
        if plan is None:
            return None
        cap = body.count(b"{") if max_records is None else max_records  # a record is an object: one "{" each
        ids = np.empty((cap, len(self.schema.sparse_fields)), self.id_dtype)
        numbers = np.empty((cap, sum(f.kind == "numeric" for f in self.schema.fields)))
        extras = np.empty((cap, len(extra)))
        missing = np.empty((cap, len(self.schema.fields)), np.uint8)
        spans = np.empty((cap, 2), np.int64)
        got = plan.encode_json(body, key, ids, numbers, tuple(extra), extras, missing, spans)
        if got is None:
            return None
        n, members = got
        return JsonRecords(n, b"{" + b",".join(body[a:b] for a, b in members) + b"}", spans[:n], extras[:n],
                           ids[:n], numbers[:n], missing[:n])

    def finish_json(self, records: JsonRecords, context: dict[str, Any] | None = None
                    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids, dense) of records from :meth:`encode_json`, the fields they lack taken from ``context`` (as
        :meth:`encode_records`); None when the context lacks one, names an unknown field or is not plain."""
        if context and (type(context) is not dict or not context.keys() <= set(self.schema.input_columns)):
            return None
        plan = self.records_plan()
        if records.missing.any() and not plan.fill_missing(records.missing, context or {}, records.ids,
                                                           records.numbers):
            return None
        if self._reads_values(records.ids):
            return None
        return records.ids, self._from_numbers(records.ids, records.numbers)

    def _from_numbers(self, ids: np.ndarray, numbers: np.ndarray) -> np.ndarray:
        """The compiled plan's raw numbers (one column per numeric field) -> the bucketized fields' ids (in place)
        and the scaled dense block, as :meth:`transform_frame` computes them."""
        sparse = {f.name: j for j, f in enumerate(self.schema.sparse_fields)}
        dense = np.empty((len(ids), len(self.dense_names)), np.float32)
        j = 0
        for k, f in enumerate(f for f in self.schema.fields if f.kind == "numeric"):
            if f.name in sparse:
                ids[:, sparse[f.name]] = self._bin(f.name, numbers[:, k]) + self.offsets[f.name]
            else:
                dense[:, j] = _pre_transform(numbers[:, k], f.transform)
                j += 1
        self._snapshot_stats(ids, dense)
        self._scale(dense)
        return dense

    def fit(self, source: Source | Iterable[pl.DataFrame], seed: int = 0, **read_kwargs: Any) -> Encoder:
        """Fit on a file, a DataFrame or an iterable of typed chunks (the training split only)."""
        self._begin_fit(seed)
        chunks = source if _is_chunk_iter(source) else iter_chunks(source, self.schema, **read_kwargs)  # type: ignore[arg-type]
        for chunk in chunks:
            self._observe(chunk, self._hashes(chunk))
        if self.train_rows == 0:
            raise EncoderError("no training rows to fit the encoder on")
        self._finish_fit()
        self._drop_fit_state()
        return self

    # -- transforming --------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not self.fitted:
            raise EncoderError("the encoder is not fitted; call fit() first or load a saved one")

    def _string_columns(self) -> list[str]:
        """Vocabulary fields: once hashed, their strings are only needed for fitting (the group column stays)."""
        return [f.name for f in self._vocab_fields() if f.name != self.schema.group]

    def _hashes(self, chunk: pl.DataFrame) -> pl.DataFrame:
        return chunk.select([_hash(f.name).alias(f"h:{f.name}") for f in self._vocab_fields()])

    def _encode(self, chunk: pl.DataFrame, hashes: pl.DataFrame | None = None) -> tuple[np.ndarray, np.ndarray]:
        """ids [n, n_sparse] (int32, or int64 when :attr:`wide_ids`) and dense [n, n_dense] float32 of one typed
        chunk.

        ``hashes`` holds ``h:<field>``, the value hashes of each vocabulary field (computed when not given).
        """
        self._check_fitted()
        if hashes is None:
            hashes = self._hashes(chunk)
        sparse = self.schema.sparse_fields  # a derived list: built once here, not once per field
        ids = np.empty((chunk.height, len(sparse)), self.id_dtype)
        vocab = [j for j, f in enumerate(sparse) if f.kind == "categorical" and f.hash_buckets is None]
        if vocab and not self._fit_tables:  # every vocabulary field of the chunk in one lookup
            names = [sparse[j].name for j in vocab]
            table, salts = self._lookup_table()
            keys = hashes.select(f"h:{n}" for n in names).to_numpy() + np.array([salts[n] for n in names])
            found = table.lookup(keys.ravel()).reshape(keys.shape)
            oov = np.array([self.offsets[n] + OOV for n in names], dtype=self.id_dtype)
            ids[:, vocab] = np.where(found < 0, oov, found)
        for j, f in enumerate(sparse):
            off = self.offsets[f.name]
            if f.kind == "categorical" and f.hash_buckets is None:
                if self._fit_tables:
                    ids[:, j] = self._vocab_ids(f.name, hashes[f"h:{f.name}"].to_numpy())
            elif f.kind == "categorical":
                ids[:, j] = _hash_buckets(chunk[f.name], int(f.hash_buckets or 1)) + off
            else:
                ids[:, j] = self._bin(f.name, _numeric(chunk, f.name)) + off
        dense = self._unscaled_dense(chunk, {})
        self._snapshot_stats(ids, dense, chunk)
        self._scale(dense)
        return ids, dense

    def _vocab_ids(self, name: str, hashes: np.ndarray) -> np.ndarray:
        """Global ids of values of the vocabulary field ``name`` given their hashes (OOV where unseen)."""
        if name in self._fit_tables:  # inside encode_files: every value seen while fitting is there
            return self._remap[name][self._fit_tables[name].lookup(hashes)]
        table, salts = self._lookup_table()
        found = table.lookup(hashes + salts[name])
        return np.where(found < 0, np.int32(self.offsets[name] + OOV), found)

    def sequences(self, chunk: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Padded id blocks int32 [n, n_seq, seq_max] and lengths int32 [n, n_seq] of a typed chunk's multi
        and sequence fields.

        A multi field keeps its first ``max_len`` items and an empty or missing set becomes the field's
        missing id (length 1); a sequence keeps its last ``max_len`` items and may be empty (length 0).
        Padding holds the field's missing id. All rows of a field are done at once, from flat arrays.
        """
        self._check_fitted()
        fields = self.schema.list_fields
        n = chunk.height
        seq = np.empty((n, len(fields), self.seq_max), self.id_dtype)
        lengths = np.empty((n, len(fields)), np.int32)
        for j, f in enumerate(fields):
            col = chunk[f.name]
            col = col.list.tail(f.max_len) if f.kind == "sequence" else col.list.head(f.max_len)
            lens = col.list.len().fill_null(0).to_numpy().astype(np.int32)
            items = _items(col)
            off = self.offsets[f.name]
            if f.hash_buckets is not None:
                ids = _hash_buckets(items, int(f.hash_buckets)) + off
            else:
                ids = self._vocab_ids(f.share_vocab or f.name, items.hash(seed=_SEED).to_numpy())
            seq[:, j, :] = off + MISSING
            rows = np.repeat(np.arange(n), lens)
            starts = np.cumsum(lens) - lens
            seq[rows, j, np.arange(len(rows)) - np.repeat(starts, lens)] = ids
            if f.kind == "multi":
                lens = np.maximum(lens, 1)
            lengths[:, j] = lens
        return seq, lengths

    def _bin(self, name: str, values: np.ndarray) -> np.ndarray:
        """Quantile bin 1..nb of each value of a bucketized field, 0 where missing."""
        b = np.searchsorted(self.boundaries[name], values, side="right") + 1
        return np.where(np.isnan(values), MISSING, b)

    def _unscaled_dense(self, chunk: pl.DataFrame, found: dict[str, np.ndarray]) -> np.ndarray:
        """float32 [n, n_dense]: each dense field's values with the statistics-free part of its transform
        (taken from ``found["t:<field>"]`` where ``_observe`` computed it); the stat columns are left at 0."""
        dense = np.zeros((chunk.height, len(self.dense_names)), np.float32)
        for j, f in enumerate(self.schema.dense_fields):
            t = found.get(f"t:{f.name}")
            dense[:, j] = _pre_transform(_numeric(chunk, f.name), f.transform) if t is None else t
        return dense

    def _snapshot_stats(self, ids: np.ndarray, dense: np.ndarray, chunk: pl.DataFrame | None = None) -> None:
        """Write the stats' features of the snapshot (the end of training) into their columns of ``dense``; the
        raw values of ``chunk`` serve the snapshot's newcomers (values new since training, counted by a refresh)."""
        if self.snapshot is None:
            return
        cols = {st.field for st in self.snapshot.stats}
        local = {f: ids[:, self.sparse_names.index(f)] - self.offsets[f] for f in cols}
        values = None if chunk is None else {f: chunk[f] for f in cols if self.snapshot.reads_values(f)}
        self.snapshot.fill(local, dense[:, len(self.schema.dense_fields):], values)

    def _reads_values(self, ids: np.ndarray) -> bool:
        """Whether some row of ``ids`` is at the OOV id of a field whose newcomers the snapshot reads by value:
        the compiled paths, which keep no raw value, leave such rows to the frame path."""
        snap = self.snapshot
        return snap is not None and any(
            snap.reads_values(f) and bool(np.any(ids[:, j] == self.offsets[f] + OOV))
            for j, f in enumerate(self.sparse_names))

    def _dense_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 mean and std per dense column: the fitted moments where the transform standardizes (numeric
        fields asking for it, every stat column), 0 and 1 elsewhere."""
        names = self.dense_names
        mean, std = np.zeros(len(names), np.float32), np.ones(len(names), np.float32)
        scaled = {f.name for f in self.schema.dense_fields if f.transform in ("log1p_standardize", "standardize")}
        scaled.update(self.schema.stat_columns)
        for j, name in enumerate(names):
            if name in scaled:
                mean[j], std[j] = self.moments[name]
        return mean, std

    def _scale(self, dense: np.ndarray) -> None:
        """Standardize in place the columns of ``_unscaled_dense`` whose transform asks for it (the others see
        ``x - 0`` and ``x / 1``, which are exact); encoding and scoring share it, so their values are identical."""
        if dense.shape[1] == 0:
            return
        mean, std = self._dense_moments()
        dense -= mean
        dense /= std

    def _fitting_ids(self, chunk: pl.DataFrame, found: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """A training chunk as far as it can be encoded before the fit is finished; ``_finish_ids`` completes it.

        Vocabulary fields hold their dense index from fitting (``found["i:<field>"]``), hashed fields their
        bucket without the field offset, bucketized numerics 0, dense fields their unscaled values.
        """
        ids = np.zeros((chunk.height, len(self.schema.sparse_fields)), self.id_dtype)
        for j, f in enumerate(self.schema.sparse_fields):
            if f.kind == "categorical" and f.hash_buckets is None:
                ids[:, j] = found[f"i:{f.name}"]
            elif f.kind == "categorical":
                ids[:, j] = _hash_buckets(chunk[f.name], int(f.hash_buckets or 1))
        return ids, self._unscaled_dense(chunk, found)

    def _finish_ids(self, ids: np.ndarray, dense: np.ndarray, raw: pl.DataFrame | None, first: int = 0) -> None:
        """Turn ``_fitting_ids`` output into final ids and dense values in place, now that the fit is done;
        ``raw`` holds the chunk's bucketized numeric fields, ``first`` the index of its first row among the training
        rows observed (for the stats as of each row's time)."""
        for j, f in enumerate(self.schema.sparse_fields):
            if f.kind == "categorical" and f.hash_buckets is None:
                ids[:, j] = self._remap[f.name][ids[:, j]]
            elif f.kind == "categorical":
                ids[:, j] += self.offsets[f.name]
            else:
                assert raw is not None
                ids[:, j] = self._bin(f.name, _numeric(raw, f.name)) + self.offsets[f.name]
        if self._as_of is not None:
            dense[:, len(self.schema.dense_fields):] = self._as_of[first: first + len(ids)]
        self._scale(dense)

    def _as_of_scaled(self, first: int, n: int) -> np.ndarray:
        """The scaled stat features of the ``n`` training rows observed from row ``first`` on, as of their time."""
        assert self._as_of is not None
        k = len(self.schema.dense_fields)
        mean, std = self._dense_moments()
        return (self._as_of[first: first + n] - mean[k:]) / std[k:]

    def transform_frame(self, chunk: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Encode one typed chunk (see :mod:`ctrkit.data.readers`) in memory: (ids, dense). Stats come from the
        snapshot, as served; training rows get theirs as of their own time from :func:`encode_files` only."""
        return self._encode(chunk)

    def group_ids(self, chunk: pl.DataFrame) -> np.ndarray | None:
        """int64 ids of the group column (a hash: equal users get equal ids), or None without a group."""
        g = self.schema.group
        if not g or g not in chunk.columns:
            return None
        return chunk.select(pl.col(g).cast(pl.String).hash(seed=7))[g].to_numpy().view(np.int64)

    def weights(self, chunk: pl.DataFrame) -> np.ndarray | None:
        """The sample weights of a typed chunk, or None when the schema has no weight column."""
        return chunk[self.schema.weight].to_numpy() if self.schema.weight else None

    def transform(self, source: Source, out_dir: str | Path, report: ReadReport | None = None,
                  **read_kwargs: Any) -> EncodedData:
        """Encode a file or frame into a dataset folder, streaming chunk by chunk."""
        self._check_fitted()
        report = report if report is not None else ReadReport()
        writer = DatasetWriter(out_dir, len(self.sparse_names), len(self.dense_names), bool(self.schema.group),
                               **self.layout())
        chunks = iter_chunks(source, self.schema, report=report, **read_kwargs)
        try:
            with Prefetch((c, self._hashes(c)) for c in chunks) as stream:
                for chunk, hashes in stream:
                    ids, dense = self._encode(chunk, hashes)
                    writer.append(ids, dense, self.labels(chunk), self.group_ids(chunk),
                                  *(self.sequences(chunk) if self.seq_names else ()), weight=self.weights(chunk))
        except BaseException:
            writer.abort()
            raise
        return writer.close({"report": report.to_dict(), "encoder": self.fingerprint()})

    def rolled(self, source: Source, report: ReadReport | None = None,
               **read_kwargs: Any) -> tuple[Encoder, list[dict[str, object]]]:
        """A copy of this encoder whose stats snapshot is rolled forward over the labelled, timed rows of
        ``source`` (:meth:`ctrkit.data.rolling.Snapshot.rolled`), and per stat what changed. Vocabularies and
        scaling stay as fitted, so the model reads its columns as it was trained to: each row as of its time. Values
        new since training are served the OOV id: where the field keeps every training value (``min_count`` 1) each
        is counted by itself (the snapshot's newcomers, read by value), as every value had its own history in
        training; else they share the OOV counts, with the rare values that training pooled there."""
        self._check_fitted()
        if self.snapshot is None:
            raise EncoderError("the schema has no stats to roll forward")
        fields = sorted({st.field for st in self.snapshot.stats})
        # with min_count 1 no training row had the OOV id: values new since then are not pooled into one history
        lone = {f: self._field(f).min_count == 1 and self._field(f).hash_buckets is None for f in fields}
        keys: dict[str, list[np.ndarray]] = {f: [] for f in fields}
        newcomers: dict[str, list[pl.Series]] = {f: [] for f in fields if lone[f]}
        times, timed, labels = [], [], []
        for chunk in iter_chunks(source, self.schema, report=report, **read_kwargs):
            for f in fields:
                if self._field(f).hash_buckets is not None:
                    keys[f].append(_hash_buckets(chunk[f], int(self._field(f).hash_buckets or 1)))
                    continue
                h = chunk.select(_hash(f).alias("h"))["h"].to_numpy()
                k = self._vocab_ids(f, h) - self.offsets[f]
                if lone[f]:  # a value training never saw is counted by itself, not pooled at the OOV id
                    new = k == OOV
                    newcomers[f].append(chunk.select(pl.when(pl.lit(pl.Series(new))).then(pl.col(f).cast(pl.String))
                                                     .alias(f))[f])
                    k[new] = -1
                keys[f].append(k)
            t = chunk[str(self.schema.time)]
            times.append(t.fill_null(0).to_numpy().astype(np.int64, copy=False))
            timed.append(t.is_not_null().to_numpy())
            labels.append(np.asarray(self.labels(chunk), np.float32).reshape(chunk.height, -1)[:, 0])
        if not times:
            raise EncoderError(f"{source}: no usable rows to roll the stats forward with")
        snapshot, changes = self.snapshot.rolled({f: np.concatenate(v) for f, v in keys.items()},
                                                 np.concatenate(times), np.concatenate(labels), np.concatenate(timed),
                                                 {f: pl.concat(v) for f, v in newcomers.items()})
        new = copy.copy(self)
        new.snapshot = snapshot
        return new, changes

    # -- persistence ---------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Schema fingerprint plus the id space size: a bundle checks that its model matches."""
        return f"{self.schema.fingerprint()}-{self.n_ids}"

    def difference(self, other: Encoder) -> str | None:
        """None when ``other`` gives every row the ids and numbers this encoder gives it (a model of one then
        reads the other's encoded rows as its own), else the first thing that differs, in words."""
        self._check_fitted()
        other._check_fitted()
        if self.schema.fingerprint() != other.schema.fingerprint():
            return "the schemas differ"
        for name, size in self.sizes.items():
            if size != other.sizes.get(name):
                return f"the ids of {name!r} differ: {size:,} here, {other.sizes.get(name, 0):,} in the other"
        if self.offsets != other.offsets or self.n_ids != other.n_ids:
            return "the id spaces differ"
        if self.moments != other.moments:
            return "the numeric fields' scaling differs"
        if self.boundaries.keys() != other.boundaries.keys() or any(
                not np.array_equal(v, other.boundaries[k]) for k, v in self.boundaries.items()):
            return "the numeric fields' bin boundaries differ"
        for name, values in self.vocab.items():
            if not values.equals(other.vocab[name]):
                return f"the vocabulary of {name!r} differs"
        mine, theirs = (e.snapshot.describe() if e.snapshot is not None else None for e in (self, other))
        if mine != theirs:
            return "the rolling statistics differ"
        return None

    def save(self, path: str | Path) -> None:
        """Write ``encoder.json`` and ``vocab.parquet`` (and the stats' snapshot) into the folder ``path``."""
        self._check_fitted()
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": ENCODER_FORMAT,
            "schema": self.schema.to_dict(),
            "sizes": self.sizes,
            "offsets": self.offsets,
            "n_ids": self.n_ids,
            "train_rows": self.train_rows,
            "moments": self.moments,
            "boundaries": {k: v.tolist() for k, v in self.boundaries.items()},
        }
        if self.snapshot is not None:
            meta["snapshot"] = self.snapshot.save(p)
        (p / "encoder.json").write_text(json.dumps(meta, indent=1))
        frames = [pl.DataFrame({"field": pl.Series([k] * len(v), dtype=pl.String), "value": v.rename("value"),
                                "count": self.counts[k]}) for k, v in self.vocab.items()]
        vocab = pl.concat(frames) if frames else pl.DataFrame(
            schema={"field": pl.String, "value": pl.String, "count": pl.Int64})
        vocab.write_parquet(p / "vocab.parquet")

    @classmethod
    def load(cls, path: str | Path) -> Encoder:
        """Read an encoder saved by :meth:`save`; checks that vocabulary sizes agree with the metadata."""
        p = Path(path)
        meta_path = p / "encoder.json"
        if not meta_path.exists():
            raise EncoderError(f"{p}: no encoder.json")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != ENCODER_FORMAT:
            raise EncoderError(f"{meta_path}: encoder format {meta.get('format')} is not supported")
        enc = cls(Schema.from_dict(meta["schema"], source=str(meta_path)))
        enc.sizes, enc.offsets, enc.n_ids = meta["sizes"], meta["offsets"], meta["n_ids"]
        enc.train_rows = meta["train_rows"]
        enc.moments = {k: (float(a), float(b)) for k, (a, b) in meta["moments"].items()}
        enc.boundaries = {k: np.asarray(v, dtype=np.float64) for k, v in meta["boundaries"].items()}
        vocab = pl.read_parquet(p / "vocab.parquet")
        for f in enc._vocab_fields() + enc._list_vocab_fields():
            part = vocab.filter(pl.col("field") == f.name)
            if part.height + 2 != enc.sizes[f.name]:
                raise EncoderError(f"{p}: vocabulary of {f.name!r} has {part.height} values, metadata says "
                                   f"{enc.sizes[f.name] - 2}")
            enc.vocab[f.name] = part["value"].rename(f.name)
            enc.counts[f.name] = part["count"].to_numpy()
        if enc.schema.stats:
            if "snapshot" not in meta:
                raise EncoderError(f"{meta_path}: the schema has stats but the encoder holds no snapshot of them")
            try:
                enc.snapshot = Snapshot.load(p, enc.schema.stats, meta["snapshot"], enc.sizes)
            except ValueError as exc:
                raise EncoderError(str(exc)) from None
        enc.fitted = True
        return enc


def _vocab_table(values: pl.Series) -> Any:
    """The compiled lookup of a vocabulary: each value's UTF-8 bytes -> its position."""
    arr = values.cast(pl.Binary).rechunk().to_arrow(compat_level=pl.CompatLevel.oldest())
    _, offset_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offset_buf, np.int64)[arr.offset: arr.offset + len(arr) + 1]
    return _records.VocabTable(b"" if data_buf is None else data_buf, np.ascontiguousarray(offsets))


def _items(column: pl.Series) -> pl.Series:
    """The items of a List(String) column, row after row (a missing list adds none)."""
    import pyarrow.compute as pc

    return pl.Series(column.name, pc.list_flatten(column.to_arrow()), dtype=pl.String)


def _is_chunk_iter(source: object) -> bool:
    return not isinstance(source, (str, Path, pl.DataFrame))


# --- the one-parse path from raw files to encoded datasets -----------------------------------------
HOLD_BYTES = 256 << 20


class _Parts:
    """What the first pass keeps of each training chunk for the second: in memory up to ``budget`` bytes,
    then in Arrow IPC files under ``tmp``, so memory stays bounded however large the file is."""

    def __init__(self, tmp: Path, budget: int | None = None) -> None:
        self.tmp, self.budget, self.held = tmp, HOLD_BYTES if budget is None else budget, 0
        self.items: list[pl.DataFrame | Path] = []

    def __len__(self) -> int:
        return len(self.items)

    def append(self, frame: pl.DataFrame) -> None:
        """Keep one part, in memory while the budget allows."""
        size = frame.estimated_size()
        if self.held + size <= self.budget:
            self.held += size
            self.items.append(frame)
            return
        file = self.tmp / f"part{len(self.items):05d}.arrow"
        frame.write_ipc(file)
        self.items.append(file)

    def __getitem__(self, i: int) -> pl.DataFrame:
        item = self.items[i]
        return item if isinstance(item, pl.DataFrame) else pl.read_ipc(item)

    def __setitem__(self, i: int, frame: pl.DataFrame) -> None:
        item = self.items[i]
        if isinstance(item, pl.DataFrame):
            self.held += frame.estimated_size() - item.estimated_size()
            self.items[i] = frame
        else:
            frame.write_ipc(item)

    def column(self, i: int, name: str) -> pl.Series:
        """One column of the i-th part (read alone from its file when the part is on disk)."""
        item = self.items[i]
        return item[name] if isinstance(item, pl.DataFrame) else pl.read_ipc(item, columns=[name])[name]

    def drain(self) -> Iterator[pl.DataFrame]:
        """Every part in order, each let go (its file deleted) once handed out; the store is empty after."""
        items, self.items, self.held = self.items[::-1], [], 0
        while items:
            item = items.pop()
            if isinstance(item, Path):
                frame = pl.read_ipc(item)
                item.unlink()
                yield frame
            else:
                yield item


@dataclass
class EncodeResult:
    """What :func:`encode_files` produced: the encoder, datasets by split name and read reports."""

    encoder: Encoder
    data: dict[str, EncodedData]
    reports: dict[str, ReadReport]
    seconds: float = 0.0
    rows: int = 0


SPLITS = ("auto", "time", "random", "group")


def encode_files(schema: Schema, train: Source, out_dir: str | Path, *, valid: Source | None = None,
                 test: Source | None = None, valid_fraction: float = 0.1, seed: int = 0,
                 bad_rows: str | Path | None = None, split: str = "auto", **read_kwargs: Any) -> EncodeResult:
    """Fit an encoder on ``train`` and write encoded ``train``/``valid``/``test`` datasets under ``out_dir``.

    Each training row is parsed once. With ``valid`` given, every training row is fitted on, so the fit pass
    writes it to the training dataset already, as far as the fit allows (dense indexes, unscaled numerics),
    and completes the ids in place once the fit is done. Without ``valid``, the last ``valid_fraction`` of rows
    by time (``split`` "time", the default when the schema has a time field), a seeded random fraction
    ("random", the default otherwise) or every row of a fixed fraction of the groups/users, chosen by a hash of
    the group ("group", so no user is in both parts), is held
    out as validation and not
    fitted on; the fit pass then keeps what the transform needs of each row (hashes, numerics, the label), in
    memory up to ``HOLD_BYTES`` and in a temporary folder beyond. The time cut keeps exactly the latest
    ``round(n * valid_fraction)`` timed rows for validation (rows tied at the cut are taken last in file order),
    found in a few passes over the kept parts; rows without a time are training rows.
    Rejected rows of ``train`` go to ``bad_rows``; those of ``valid`` / ``test`` to ``<stem>_valid<suffix>`` /
    ``<stem>_test<suffix>`` next to it. One background thread reads every file, one block ahead, so the
    ``valid`` / ``test`` files are parsed while the last training block is fitted on and the vocabularies are
    finished, then while the training rows are being completed: both cores stay busy.
    """
    import time

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    enc = Encoder(schema)
    enc._begin_fit(seed)
    rng = np.random.default_rng(seed)
    sources = [(k, src) for k, src in (("valid", valid), ("test", test)) if src is not None]
    reports: dict[str, ReadReport] = {"train": ReadReport(), **{k: ReadReport() for k, _ in sources}}
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    split = ("time" if schema.time else "random") if split == "auto" else split
    for role in ("time", "group"):
        if split == role and not getattr(schema, role):
            raise EncoderError(f"--split {role} needs a `{role}` column in the schema")
    split_by_time = valid is None and split == "time"
    tmp = Path(tempfile.mkdtemp(prefix="ctrkit-enc-", dir=out))
    parts = _Parts(tmp)
    stream: Prefetch[tuple[str, pl.DataFrame, pl.DataFrame]] | None = None
    held = _held_parts(parts) if valid is None else None  # with `valid`, the fit pass writes training rows
    n_sparse, n_dense, layout = len(enc.sparse_names), len(enc.dense_names), enc.layout()
    writers: dict[str, DatasetWriter] = {}
    written: list[int] = []  # rows of each training chunk written by the fit pass
    # only these need raw values later
    binned = [f.name for f in schema.sparse_fields if f.kind == "numeric"] + enc.seq_names
    try:
        chunks = iter_chunks(train, schema, report=reports["train"], bad_rows=bad_rows, **read_kwargs)
        # one reader for every file: the other files are parsed while the last training chunk is fitted on
        # and the vocabularies are finished
        stream = Prefetch(_read_all(enc, chunks, sources, reports, bad_rows, read_kwargs))
        if valid is not None:
            writers["train"] = DatasetWriter(out / "train", n_sparse, n_dense, bool(schema.group), **layout)
        ahead: list[tuple[str, pl.DataFrame, pl.DataFrame]] = []  # the first chunk of another file
        for name, chunk, hashes in stream:
            if name != "train":
                ahead.append((name, chunk, hashes))
                break
            if valid is not None:
                ids, dense = enc._fitting_ids(chunk, enc._observe(chunk, hashes))
                writers["train"].append(ids, dense, enc.labels(chunk), enc.group_ids(chunk),
                                        weight=enc.weights(chunk))
                written.append(chunk.height)
                if binned:
                    parts.append(chunk.select(binned))
                continue
            keep = chunk.drop(["_line"] + ([] if split_by_time else enc._string_columns()))
            if not split_by_time:
                if split == "group":
                    held_out = enc.group_ids(chunk).view(np.uint64) % 10_000 < valid_fraction * 10_000
                else:
                    held_out = rng.random(chunk.height) < valid_fraction
                keep = keep.with_columns(pl.Series("_valid", held_out))
                m = ~keep["_valid"]
                enc._observe(chunk.filter(m), hashes.filter(m))
            parts.append(pl.concat([keep, hashes], how="horizontal"))
        if split_by_time:
            # Decided after the single parse: the last `valid_fraction` of rows by time is validation; rows
            # without a time are training rows.
            if len(parts) == 0:
                raise EncoderError(_no_rows(train, reports["train"]))
            times = lambda: (parts.column(i, schema.time) for i in range(len(parts)))  # noqa: E731
            n_timed = sum(c.len() - c.null_count() for c in times())
            if n_timed == 0:
                raise EncoderError(f"{train}: no row has a value in the time field {schema.time!r}, so no "
                                   "validation part can be cut by time; give a validation file")
            # the latest round(n * fraction) rows; rows tied at the cut go to validation last in file order
            n_valid = min(max(int(round(n_timed * valid_fraction)), 1), n_timed - 1) if n_timed > 1 else 0
            cutoff = _kth(times, n_timed - n_valid) if n_valid else None
            tied = [int((c == cutoff).sum()) for c in times()] if n_valid else [0] * len(parts)
            take = n_valid - sum(int((c > cutoff).sum()) for c in times()) if n_valid else 0
            skip = sum(tied) - take  # tied rows, in file order, that stay in training
            for i in range(len(parts)):
                t = pl.col(schema.time)
                if cutoff is None:
                    is_valid = pl.lit(False)
                else:
                    tie_rank = (t == cutoff).cast(pl.Int64).cum_sum() + sum(tied[:i])
                    is_valid = ((t > cutoff) | ((t == cutoff) & (tie_rank > skip))).fill_null(False)
                chunk = parts[i].with_columns(is_valid.alias("_valid"))
                parts[i] = chunk
                m = ~chunk["_valid"]
                fit_part = chunk.filter(m)
                enc._observe(fit_part, fit_part.select([c for c in chunk.columns if c.startswith("h:")]))
        if enc.train_rows == 0:
            raise EncoderError(_no_rows(train, reports["train"]))
        enc._finish_fit()
        names = [k for k, _ in sources] + (["train", "valid"] if valid is None else [])
        writers.update({k: DatasetWriter(out / k, n_sparse, n_dense, bool(schema.group), **layout) for k in names})
        raw = parts.drain() if binned else None
        done = [0, 0]  # training rows completed in place, training rows of the held parts written

        def finish(ids: np.ndarray, dense: np.ndarray) -> None:
            part = None if raw is None else next(raw)
            enc._finish_ids(ids, dense, part, done[0])
            done[0] += len(ids)
            if enc.seq_names:
                assert part is not None
                writers["train"].append_seq(*enc.sequences(part))

        def write(name: str, chunk: pl.DataFrame, encoded: Future[tuple[np.ndarray, np.ndarray]]) -> None:
            ids, dense = encoded.result()
            label = enc.labels(chunk)
            group, weight = enc.group_ids(chunk), enc.weights(chunk)
            seq = enc.sequences(chunk) if enc.seq_names else None
            if name == "train" and valid is None:
                m = chunk["_valid"].to_numpy()
                if enc.schema.stats:  # the training rows' stats as of their own time, not the snapshot
                    n_train = int(np.count_nonzero(~m))
                    dense[~m, len(enc.schema.dense_fields):] = enc._as_of_scaled(done[1], n_train)
                    done[1] += n_train
                for k, sel in (("train", ~m), ("valid", m)):
                    writers[k].append(ids[sel], dense[sel], label[sel], None if group is None else group[sel],
                                      *(() if seq is None else (seq[0][sel], seq[1][sel])),
                                      weight=None if weight is None else weight[sel])
            else:
                writers[name].append(ids, dense, label, group, *(() if seq is None else seq), weight=weight)

        # Two chunks are encoded at a time (numpy and polars release the GIL) and written in order, while
        # the training rows written by the fit pass are completed in place; the training parts the fit pass
        # held come after the other files.
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ctrkit-encode") as pool:
            completed = pool.submit(writers["train"].rewrite, written, finish) if valid is not None else None
            pending: deque[tuple[str, pl.DataFrame, Future[tuple[np.ndarray, np.ndarray]]]] = deque()
            for name, chunk, hashes in itertools.chain(ahead, stream, held or ()):
                pending.append((name, chunk, pool.submit(enc._encode, chunk, hashes)))
                if len(pending) >= 2:
                    write(*pending.popleft())
            while pending:
                write(*pending.popleft())
            if completed is not None:
                completed.result()
        fingerprint = enc.fingerprint()
        # a held-out validation split shares the training file's report
        data = {k: w.close({"report": reports.get(k, reports["train"]).to_dict(), "encoder": fingerprint})
                for k, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if stream is not None:
            stream.close()
        if held is not None:
            held.close()
        shutil.rmtree(tmp, ignore_errors=True)
        enc._drop_fit_state()
    rows = sum(r.rows for r in reports.values())
    return EncodeResult(encoder=enc, data=data, reports=reports, seconds=time.perf_counter() - t0, rows=rows)


_SELECT_IN_MEMORY = 1 << 20


def _kth(columns: Callable[[], Iterable[pl.Series]], k: int) -> int:
    """The k-th smallest (0-based) non-null integer of ``columns()``: 65536 bins narrow the range that holds
    it, one pass each, until the values in the range fit in memory."""
    present = [(int(c.min()), int(c.max())) for c in columns() if c.null_count() < c.len()]
    lo, hi = min(a for a, _ in present), max(b for _, b in present)

    def within(c: pl.Series) -> pl.Series:
        return c.filter((c >= lo) & (c <= hi))

    while True:
        if lo == hi or sum(within(c).len() for c in columns()) <= _SELECT_IN_MEMORY:
            values = np.concatenate([within(c).to_numpy() for c in columns()])
            return int(np.partition(values, k)[k])
        width = -(-(hi - lo + 1) // 65536)
        counts = np.zeros(65536, np.int64)
        for c in columns():
            counts += np.bincount((within(c).to_numpy() - lo) // width, minlength=65536)
        b = int(np.searchsorted(np.cumsum(counts), k, side="right"))
        k -= int(counts[:b].sum())
        lo, hi = lo + b * width, min(hi, lo + (b + 1) * width - 1)


def _no_rows(train: Source, report: ReadReport) -> str:
    """The fatal "no training rows" message, with the commonest reasons the rows were rejected."""
    why = f": {report.top_reasons()}" if report.bad_rows else ""
    return f"{train}: no training rows ({report.bad_rows:,} of {report.rows:,} rejected{why})"


def _split_bad_rows(bad_rows: str | Path | None, name: str) -> Path | None:
    """Where rejected rows of the ``name`` split go: ``<stem>_<name><suffix>`` beside the training one."""
    if bad_rows is None:
        return None
    p = Path(bad_rows)
    return p.with_name(f"{p.stem}_{name}{p.suffix}")


def _read_all(enc: Encoder, train_chunks: Iterable[pl.DataFrame], sources: list[tuple[str, Source]],
              reports: dict[str, ReadReport], bad_rows: str | Path | None,
              read_kwargs: dict[str, Any]) -> Iterator[tuple[str, pl.DataFrame, pl.DataFrame]]:
    """(split, chunk, hash columns): the training chunks, then the other files' (value hashes need no fit)."""
    for chunk in train_chunks:
        yield "train", chunk, enc._hashes(chunk)
    for name, src in sources:
        for chunk in iter_chunks(src, enc.schema, report=reports[name], bad_rows=_split_bad_rows(bad_rows, name),
                                 **read_kwargs):
            yield name, chunk, enc._hashes(chunk)


def _held_parts(parts: _Parts) -> Iterator[tuple[str, pl.DataFrame, pl.DataFrame]]:
    """("train", part, hash columns) of each part the fit pass held, read one ahead (used after the fit)."""
    def items() -> Iterator[tuple[str, pl.DataFrame, pl.DataFrame]]:
        for chunk in parts.drain():
            yield "train", chunk, chunk.select([c for c in chunk.columns if c.startswith("h:")])

    with Prefetch(items()) as stream:
        yield from stream
