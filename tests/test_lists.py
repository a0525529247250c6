"""Multi-valued and sequence fields, several labels and crosses: schema -> reader -> encoder -> dataset -> batch."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrkit.data.dataset import Batch, BatchIterator, DatasetWriter, EncodedData
from ctrkit.data.encode import MISSING, OOV, Encoder, encode_files
from ctrkit.data.readers import DataError, coerce_chunk
from ctrkit.nn.embedding import FeatureEmbedding, FeatureLinear, FeatureSpec
from ctrkit.schema import Field, Schema, SchemaError


def list_schema(**kw: object) -> Schema:
    return Schema(fields=[Field("user"), Field("item"),
                          Field("tags", kind="multi", sep="|", max_len=3, pooling="sum"),
                          Field("history", kind="sequence", share_vocab="item", max_len=4),
                          Field("price", kind="numeric")],
                  label="click", labels=["click", "buy"], crosses=[["user", "item"]], **kw)


def list_log(n: int = 400, seed: int = 0) -> pl.DataFrame:
    """Users, items, '|'-joined tags and each user's earlier items as a history; buy implies click."""
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 20, n), rng.integers(0, 30, n)
    seen: dict[int, list[str]] = {}
    history = []
    for u, i in zip(users, items):
        history.append(list(seen.get(u, []))[-6:])
        seen.setdefault(u, []).append(f"i{i}")
    tags = ["|".join(f"t{t}" for t in rng.choice(8, rng.integers(0, 5), replace=False)) for _ in range(n)]
    click = rng.integers(0, 2, n)
    return pl.DataFrame({"user": [f"u{u}" for u in users], "item": [f"i{i}" for i in items], "tags": tags,
                         "history": history, "price": rng.random(n), "click": click,
                         "buy": click * rng.integers(0, 2, n), "t": np.arange(n)})


def typed(df: pl.DataFrame, schema: Schema) -> pl.DataFrame:
    good, bad = coerce_chunk(df.with_columns(pl.int_range(1, df.height + 1).alias("_line")), schema)
    assert bad.height == 0
    return good


# -- schema --------------------------------------------------------------------------------------------
def test_schema_round_trip_and_views() -> None:
    s = list_schema(time="t")
    back = Schema.from_yaml(s.to_yaml())
    assert back == s and back.fingerprint() == s.fingerprint()
    assert "labels: [click, buy]" in s.to_yaml() and "label:" not in s.to_yaml()
    assert [f.name for f in s.sparse_fields] == ["user", "item", "user_x_item"]
    assert [f.name for f in s.list_fields] == ["tags", "history"]
    assert s.label_columns == ["click", "buy"] and s.role_columns[:2] == ["click", "buy"]


def test_fingerprint_of_a_schema_without_the_new_settings_is_unchanged() -> None:
    s = Schema(fields=[Field("user", min_count=3), Field("item", hash_buckets=1000),
                       Field("price", kind="numeric", transform="standardize")], label="click")
    assert s.fingerprint() == "7ffd5d5323f11562"  # computed before multi / sequence fields existed


@pytest.mark.parametrize("data, needle", [
    ({"fields": [{"name": "g", "kind": "multi", "pooling": "max"}]}, "'g'"),
    ({"fields": [{"name": "g", "kind": "sequence", "max_len": 0}]}, "'g'"),
    ({"fields": [{"name": "g", "sep": "|"}]}, "'g'"),
    ({"fields": [{"name": "h", "kind": "sequence", "share_vocab": "nope"}]}, "'h'"),
    ({"fields": [{"name": "p", "kind": "numeric"}, {"name": "h", "kind": "sequence", "share_vocab": "p"}]}, "'h'"),
    ({"fields": ["a", {"name": "p", "kind": "numeric"}], "crosses": [["a", "p"]]}, "'p'"),
    ({"fields": ["a"], "labels": ["y", "y"]}, "distinct"),
    ({"fields": ["a"], "labels": ["y", "a"]}, "'a'"),
    ({"fields": ["a"], "label": "z", "labels": ["y", "w"]}, "first"),
])
def test_bad_settings_name_the_field(data: dict, needle: str) -> None:
    with pytest.raises(SchemaError, match=needle):
        Schema.from_dict({"labels": ["y"], **data})


# -- reader ----------------------------------------------------------------------------------------------
def test_reader_takes_lists_and_separator_strings() -> None:
    s = Schema(fields=[Field("g", kind="multi", sep="|"), Field("h", kind="sequence"),
                       Field("k", kind="multi")], label="y")
    df = pl.DataFrame({"g": [" A| B", "", None], "h": [[1.0, 2.5], [], None], "k": [["a", None, ""], None, ["x"]],
                       "y": [1, 0, 1]})
    out = typed(df, s)
    assert out["g"].to_list() == [["A", "B"], [], None]
    assert out["h"].to_list() == [["1", "2.5"], [], None]
    assert out["k"].to_list() == [["a"], None, ["x"]]


def test_reader_rejects_nested_items_naming_the_field() -> None:
    s = Schema(fields=[Field("g", kind="multi")], label="y")
    with pytest.raises(DataError, match="'g'"):
        typed(pl.DataFrame({"g": [[{"a": 1}]], "y": [1]}), s)


def test_cross_is_missing_when_a_part_is() -> None:
    s = Schema(fields=[Field("a"), Field("b")], label="y", crosses=[["a", "b"]])
    out = typed(pl.DataFrame({"a": ["x", None, "z"], "b": [1, 2, None], "y": [1, 0, 1]}), s)
    assert out["a_x_b"].to_list() == ["x\x1f1", None, None]


# -- encoder ----------------------------------------------------------------------------------------------
def test_blocks_against_a_literal_reference() -> None:
    s = list_schema()
    train = pl.DataFrame({"user": ["u1", "u2"], "item": ["i1", "i2"], "tags": ["a|b", "b"],
                          "history": [["i2", "i3"], []], "price": [1.0, 2.0], "click": [1, 0], "buy": [0, 0]})
    enc = Encoder(s).fit(typed(train, s))
    vocab = {name: dict(zip(enc.vocab[name].to_list(), range(2, 2 + len(enc.vocab[name])))) for name in enc.vocab}
    assert set(vocab["item"]) == {"i1", "i2", "i3"}  # the history's items share the item vocabulary
    score = pl.DataFrame({"user": ["u1"] * 3, "item": ["i1"] * 3,
                          "tags": ["b|zz|a|b", "", None], "history": [["i1", "i9", "i2", "i3", "i3"], [], None],
                          "price": [0.0] * 3, "click": [0] * 3, "buy": [0] * 3})
    seq, lengths = enc.sequences(typed(score, s))
    t, it = enc.offsets["tags"], enc.offsets["item"]
    assert enc.offsets["history"] == it
    assert seq.shape == (3, 2, 4) and lengths.tolist() == [[3, 4], [1, 0], [1, 0]]
    # multi: the first max_len items, unseen -> OOV; empty or missing -> the missing id alone
    assert seq[0, 0, :3].tolist() == [t + vocab["tags"]["b"], t + OOV, t + vocab["tags"]["a"]]
    assert seq[1, 0, 0] == seq[2, 0, 0] == t + MISSING
    # sequence: the most recent max_len items, in the item field's id space
    assert seq[0, 1].tolist() == [it + OOV, it + vocab["item"]["i2"], it + vocab["item"]["i3"],
                                  it + vocab["item"]["i3"]]
    ids, _ = enc.transform_frame(typed(score, s))
    assert ids[0, 1] == it + vocab["item"]["i1"]
    assert len(s.sparse_fields) == ids.shape[1] == 3


def test_encode_files_matches_in_memory_and_reloads(tmp_path) -> None:
    s = list_schema(time="t")
    log = list_log()
    for valid in (None, log.slice(300)):
        res = encode_files(s, log if valid is None else log.slice(0, 300), tmp_path / str(valid is None),
                           valid=valid)
        enc, tr = res.encoder, res.data["train"]
        assert tr.seq is not None and tr.seq_len is not None and tr.label.shape == (len(tr), 2)
        for name, data in res.data.items():
            rows = np.asarray(data.label)[:, 0]
            assert set(np.unique(rows)) <= {0.0, 1.0}, name
        if valid is not None:
            seq, lengths = enc.sequences(typed(log.slice(0, 300), s))
            np.testing.assert_array_equal(tr.seq, seq)
            np.testing.assert_array_equal(tr.seq_len, lengths)
            np.testing.assert_array_equal(tr.label, log.slice(0, 300).select("click", "buy").to_numpy())
        enc.save(tmp_path / "enc")
        back = Encoder.load(tmp_path / "enc")
        frame = typed(log.slice(0, 50), s)
        for a, b in zip(enc.sequences(frame), back.sequences(frame)):
            np.testing.assert_array_equal(a, b)


def test_hashed_multi_field() -> None:
    s = Schema(fields=[Field("g", kind="multi", sep=",", hash_buckets=7)], label="y")
    frame = typed(pl.DataFrame({"g": ["a,b", "", "a"], "y": [1, 0, 1]}), s)
    enc = Encoder(s).fit(frame)
    seq, lengths = enc.sequences(frame)
    assert enc.n_ids == 8 and lengths[:, 0].tolist() == [2, 1, 1]
    assert seq[0, 0, 0] == seq[2, 0, 0] != MISSING and seq[1, 0, 0] == MISSING


# -- dataset and batches --------------------------------------------------------------------------------
def test_writer_checks_shapes_and_round_trips(tmp_path) -> None:
    w = DatasetWriter(tmp_path / "d", 1, 0, n_labels=2, n_seq=1, seq_max=3)
    with pytest.raises(ValueError, match="label shape"):
        w.append(np.zeros((2, 1), np.int32), np.zeros((2, 0), np.float32), np.zeros(2, np.float32))
    w.append(np.zeros((2, 1), np.int32), np.zeros((2, 0), np.float32), np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="sequence shapes"):
        w.append_seq(np.zeros((2, 1, 2), np.int32), np.zeros((2, 1), np.int32))
    w.append_seq(np.arange(6, dtype=np.int32).reshape(2, 1, 3), np.array([[3], [1]], np.int32))
    d = w.close()
    assert d.seq.shape == (2, 1, 3) and d.seq_len.tolist() == [[3], [1]] and d.label.shape == (2, 2)
    unfinished = DatasetWriter(tmp_path / "e", 1, 0, n_seq=1, seq_max=3)
    unfinished.append(np.zeros((2, 1), np.int32), np.zeros((2, 0), np.float32), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="sequences of 0 rows"):
        unfinished.close()


@pytest.mark.parametrize("resident", [True, False])
def test_batches_carry_sequences_and_heads(resident: bool) -> None:
    n = 50
    rng = np.random.default_rng(1)
    data = EncodedData(ids=rng.integers(0, 9, (n, 2)).astype(np.int32), dense=np.zeros((n, 0), np.float32),
                       label=rng.integers(0, 2, (n, 2)).astype(np.float32),
                       seq=rng.integers(0, 9, (n, 2, 5)).astype(np.int32),
                       seq_len=rng.integers(0, 6, (n, 2)).astype(np.int32))
    batches = list(BatchIterator(data, batch_size=16, shuffle=True, seed=3, resident=resident, block_rows=8,
                                 window_blocks=2))
    assert sum(len(b) for b in batches) == n and all(b.seq.shape[1:] == (2, 5) for b in batches)
    rows = np.concatenate([b.ids.numpy() for b in batches])
    seqs = np.concatenate([b.seq.numpy() for b in batches])
    lens = np.concatenate([b.seq_len.numpy() for b in batches])
    labels = np.concatenate([b.label.numpy() for b in batches])
    key = lambda a, b, c, d: sorted(map(tuple, np.concatenate([a, b.reshape(len(b), -1), c, d], axis=1).tolist()))
    assert key(rows, seqs, lens, labels) == key(data.ids, data.seq, data.seq_len, data.label)


# -- embedding --------------------------------------------------------------------------------------------
def _spec(pooling: tuple[str, ...]) -> FeatureSpec:
    return FeatureSpec(n_ids=20, field_sizes=(5,), sparse_names=("a",), dense_names=("p",),
                       seq_names=tuple(f"s{i}" for i in range(len(pooling))), seq_kinds=("multi",) * len(pooling),
                       seq_pooling=pooling, seq_targets=("",) * len(pooling), seq_max=4)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_pooling_against_a_literal_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    spec = _spec(("mean", "sum"))
    emb, lin = FeatureEmbedding(spec, 3, init_std=1.0), FeatureLinear(spec)
    torch.nn.init.normal_(lin.table.weight)
    b = 4
    batch = Batch(ids=torch.from_numpy(rng.integers(0, 20, (b, 1))),
                  dense=torch.from_numpy(rng.random((b, 1))).float(),
                  seq=torch.from_numpy(rng.integers(0, 20, (b, 2, 4))),
                  seq_len=torch.from_numpy(rng.integers(0, 5, (b, 2))))
    out = emb(batch).detach()
    lout = lin(batch).detach()
    w, w1 = emb.table.weight.detach(), lin.table.weight.detach()[:, 0]
    for r in range(b):
        expect_lin = (float(lin.bias.detach()) + float(w1[batch.ids[r, 0]])
                      + float(lin.dense_w.detach()[0]) * float(batch.dense[r, 0]))
        for j, how in enumerate(("mean", "sum")):
            n = int(batch.seq_len[r, j])
            vec = sum((w[batch.seq[r, j, k]] for k in range(n)), torch.zeros(3))
            one = sum(float(w1[batch.seq[r, j, k]]) for k in range(n))
            if how == "mean" and n:
                vec, one = vec / n, one / n
            torch.testing.assert_close(out[r, 1 + j], vec, atol=1e-5, rtol=1e-5)
            expect_lin += one
        assert abs(float(lout[r]) - expect_lin) < 1e-5
    assert out.shape == (b, spec.n_fields, 3) and spec.n_fields == 4


def test_old_spec_dict_loads() -> None:
    old = {"n_ids": 7, "field_sizes": [7], "sparse_names": ["a"], "dense_names": []}
    spec = FeatureSpec.from_dict(old)
    assert spec.n_seq == 0 and spec.n_labels == 1 and FeatureSpec.from_dict(spec.to_dict()) == spec


def test_embedding_needs_sequences_when_built_for_them() -> None:
    emb = FeatureEmbedding(_spec(("mean",)), 3)
    with pytest.raises(ValueError, match="s0"):
        emb(Batch(ids=torch.zeros(2, 1, dtype=torch.long), dense=torch.zeros(2, 1)))
