"""Encoded datasets on disk and the batch iterator: every row exactly once per epoch, seeded order."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ctrkit.data.dataset import Batch, BatchIterator, DatasetWriter, EncodedData, _transfer


def _data(n: int = 1037, f: int = 3, d: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = (np.arange(n * f, dtype=np.int32).reshape(n, f))
    dense = np.arange(n * d, dtype=np.float32).reshape(n, d) / 7
    label = (np.arange(n) % 2).astype(np.float32)
    return ids, dense, label


def _write(path, n: int = 1037, group: bool = False) -> EncodedData:
    ids, dense, label = _data(n)
    w = DatasetWriter(path, 3, 2, with_group=group)
    for lo in range(0, n, 400):
        hi = min(lo + 400, n)
        w.append(ids[lo:hi], dense[lo:hi], label[lo:hi], np.arange(lo, hi, dtype=np.int64) if group else None)
    return w.close({"note": "x"})


def test_writer_open_round_trip(tmp_path):
    data = _write(tmp_path / "d", group=True)
    ids, dense, label = _data()
    again = EncodedData.open(tmp_path / "d")
    for d in (data, again, again.in_memory()):
        np.testing.assert_array_equal(d.ids, ids)
        np.testing.assert_array_equal(d.dense, dense)
        np.testing.assert_array_equal(d.label, label)
        np.testing.assert_array_equal(d.group, np.arange(1037))
    assert again.meta["note"] == "x" and len(again) == 1037
    assert again.nbytes == ids.nbytes + dense.nbytes + label.nbytes
    part = again.take(np.array([5, 1]))
    np.testing.assert_array_equal(part.ids, ids[[5, 1]])


def test_writer_checks_shapes(tmp_path):
    w = DatasetWriter(tmp_path / "d", 3, 2, with_group=True)
    with pytest.raises(ValueError, match="shapes"):
        w.append(np.zeros((4, 2), np.int32), np.zeros((4, 2), np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="group"):
        w.append(np.zeros((4, 3), np.int32), np.zeros((4, 2), np.float32), np.zeros(4, np.float32))
    with pytest.raises(FileNotFoundError, match="meta.json"):
        EncodedData.open(tmp_path / "nothing")


def test_rewrite_changes_runs_in_place(tmp_path):
    w = DatasetWriter(tmp_path / "d", n_sparse=2, n_dense=1)
    w.append(np.array([[1, 2], [3, 4]], np.int32), np.array([[0.5], [1.5]], np.float32), np.array([0, 1], np.float32))
    w.append(np.array([[5, 6]], np.int32), np.array([[2.5]], np.float32), np.array([1], np.float32))
    seen = []

    def update(ids: np.ndarray, dense: np.ndarray) -> None:
        seen.append(ids.tolist())
        ids += 10 * len(seen)
        dense *= 2

    w.rewrite([2, 1], update)
    assert seen == [[[1, 2], [3, 4]], [[5, 6]]]
    d = w.close()
    assert np.asarray(d.ids).tolist() == [[11, 12], [13, 14], [25, 26]]
    assert np.asarray(d.dense).ravel().tolist() == [1.0, 3.0, 5.0]
    assert np.asarray(d.label).tolist() == [0, 1, 1]


def test_rewrite_refuses_runs_that_do_not_cover_the_rows(tmp_path):
    w = DatasetWriter(tmp_path / "d", n_sparse=1, n_dense=0)
    w.append(np.zeros((3, 1), np.int32), np.zeros((3, 0), np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="runs of 2 rows"):
        w.rewrite([2], lambda ids, dense: None)
    assert len(w.close()) == 3


def test_abort_deletes_what_was_written(tmp_path):
    w = DatasetWriter(tmp_path / "d", n_sparse=1, n_dense=1, with_group=True)
    w.append(np.zeros((2, 1), np.int32), np.zeros((2, 1), np.float32), np.zeros(2, np.float32), np.zeros(2, np.int64))
    w.abort()
    assert (tmp_path / "d").is_dir() and not list((tmp_path / "d").iterdir())


def test_empty_dataset(tmp_path):
    data = DatasetWriter(tmp_path / "e", 3, 0).close()
    assert len(data) == 0 and data.ids.shape == (0, 3)
    assert list(BatchIterator(data, batch_size=8, shuffle=True)) == []


def _rows_seen(batches: list[Batch]) -> np.ndarray:
    # column 0 of ids is 3 * row number in _data
    return np.concatenate([b.ids[:, 0].numpy() // 3 for b in batches])


@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
def test_each_row_once_per_epoch(tmp_path, resident, shuffle):
    data = _write(tmp_path / "d")
    it = BatchIterator(data, batch_size=100, shuffle=shuffle, seed=3, resident=resident, block_rows=64,
                       window_blocks=3)
    assert len(it) == 11
    for _ in range(2):
        batches = list(it)
        rows = _rows_seen(batches)
        assert sorted(rows.tolist()) == list(range(1037))
        assert [len(b.label) for b in batches] == [100] * 10 + [37]
        if not shuffle:
            assert rows.tolist() == list(range(1037))
        for b in batches:
            r = b.ids[:, 0].numpy() // 3
            np.testing.assert_array_equal(b.label.numpy(), (r % 2).astype(np.float32))
            np.testing.assert_allclose(b.dense[:, 0].numpy(), (2 * r / 7).astype(np.float32))
            assert b.ids.dtype == torch.int32 and b.dense.dtype == torch.float32


@pytest.mark.parametrize("resident", [True, False])
def test_shuffle_is_seeded_and_epochs_differ(tmp_path, resident):
    data = _write(tmp_path / "d")

    def order(seed: int) -> tuple[np.ndarray, np.ndarray]:
        it = BatchIterator(data, batch_size=128, shuffle=True, seed=seed, resident=resident, block_rows=64)
        return _rows_seen(list(it)), _rows_seen(list(it))

    a1, a2 = order(7)
    b1, b2 = order(7)
    c1, _ = order(8)
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    assert not np.array_equal(a1, a2) and not np.array_equal(a1, c1)
    assert not np.array_equal(a1, np.arange(1037))


@pytest.mark.parametrize("resident", [True, False])
def test_drop_last(tmp_path, resident):
    data = _write(tmp_path / "d")
    it = BatchIterator(data, batch_size=100, shuffle=True, drop_last=True, resident=resident, block_rows=64)
    batches = list(it)
    assert len(it) == len(batches) == 10 and all(len(b.label) == 100 for b in batches)
    assert len(set(_rows_seen(batches).tolist())) == 1000


@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
def test_fill_last_fills_the_last_batch_with_the_epochs_first_rows(tmp_path, resident, shuffle):
    data = _write(tmp_path / "d")
    it = BatchIterator(data, batch_size=100, shuffle=shuffle, seed=3, resident=resident, block_rows=64,
                       window_blocks=3, fill_last=True)
    assert len(it) == 11 and it.repeated == 63
    for _ in range(2):
        batches = list(it)
        assert [len(b.label) for b in batches] == [100] * 11
        rows = _rows_seen(batches)
        assert sorted(rows[:1037].tolist()) == list(range(1037))  # each row once, in the order without filling
        np.testing.assert_array_equal(rows[1037:], rows[:63])  # then the epoch's first 63 rows again
        last = batches[-1]
        r = last.ids[:, 0].numpy() // 3
        np.testing.assert_array_equal(last.label.numpy(), (r % 2).astype(np.float32))
        np.testing.assert_allclose(last.dense[:, 0].numpy(), (2 * r / 7).astype(np.float32))
    assert BatchIterator(data, batch_size=1037, fill_last=True).repeated == 0  # no partial batch
    assert BatchIterator(data, batch_size=2000, fill_last=True).repeated == 0  # one batch: nothing to repeat


def test_fill_last_is_for_one_process_keeping_every_row(tmp_path):
    data = _write(tmp_path / "d")
    with pytest.raises(ValueError, match="fill_last"):
        BatchIterator(data, batch_size=100, fill_last=True, drop_last=True)
    with pytest.raises(ValueError, match="fill_last"):
        BatchIterator(data, batch_size=100, fill_last=True, rank=0, world_size=2)


@pytest.mark.parametrize("shuffle", [True, False])
def test_full_batches_are_gathered_into_the_given_batch(tmp_path, shuffle):
    data = _write(tmp_path / "d")
    plain = BatchIterator(data, batch_size=100, shuffle=shuffle, seed=3, resident=True)
    it = BatchIterator(data, batch_size=100, shuffle=shuffle, seed=3, resident=True)
    it.into = Batch(ids=torch.zeros(100, 3, dtype=torch.int32), dense=torch.zeros(100, 2),
                    label=torch.zeros(100))
    buffers = (it.into.ids, it.into.dense, it.into.label)
    got_all = []
    for b in it:  # compare each yielded batch before the next gather overwrites the buffers
        got_all.append(Batch(ids=b.ids.clone(), dense=b.dense.clone(), label=b.label.clone()))
        assert (b is it.into) == (len(b) == 100)
    assert all(a is b for a, b in zip((it.into.ids, it.into.dense, it.into.label), buffers))  # written in place
    for g, w in zip(got_all, plain, strict=True):
        assert torch.equal(g.ids, w.ids) and torch.equal(g.dense, w.dense) and torch.equal(g.label, w.label)


def test_bad_batch_size(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(_write(tmp_path / "d"), batch_size=0)


def test_transfer_round_trips_and_refuses_a_short_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"\0" * 8)
    fd = os.open(path, os.O_RDWR)
    try:
        _transfer(os.pwritev, fd, np.array([7, 8, 9], np.int32), 4)
        back = np.empty(3, np.int32)
        _transfer(os.preadv, fd, back, 4)
        assert back.tolist() == [7, 8, 9] and path.stat().st_size == 16
        with pytest.raises(OSError, match="4 bytes short at offset 16"):
            _transfer(os.preadv, fd, np.empty(5, np.int32), 0)
    finally:
        os.close(fd)


def test_concat_puts_the_other_rows_after_these_and_refuses_unlike_arrays() -> None:
    a = EncodedData(ids=np.array([[1, 2]], np.int32), dense=np.array([[0.5]], np.float32),
                    label=np.array([1.0], np.float32), weight=np.array([2.0], np.float32))
    b = EncodedData(ids=np.array([[3, 4], [5, 6]], np.int32), dense=np.array([[1.5], [2.5]], np.float32),
                    label=np.array([0.0, 0.25], np.float32), weight=np.array([1.0, 3.0], np.float32))
    c = a.concat(b)
    assert c.ids.tolist() == [[1, 2], [3, 4], [5, 6]] and c.dense.ravel().tolist() == [0.5, 1.5, 2.5]
    assert c.label.tolist() == [1.0, 0.0, 0.25] and c.weight.tolist() == [2.0, 1.0, 3.0]
    assert c.group is None and c.seq is None
    with pytest.raises(ValueError, match="concat: the datasets hold different arrays"):
        a.concat(EncodedData(ids=b.ids, dense=b.dense, label=b.label))
