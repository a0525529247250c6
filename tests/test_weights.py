"""Sample weights: a schema role read, checked, encoded, batched and honoured by training and metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

import ctrkit
from ctrkit.data.dataset import BatchIterator
from ctrkit.data.encode import encode_files
from ctrkit.data.readers import ReadReport, iter_chunks
from ctrkit.data.synth import make_click_log
from ctrkit.evaluate.metrics import evaluate
from ctrkit.schema import Field, Schema, SchemaError

SCHEMA = Schema(fields=[Field("user_id"), Field("item_id"), Field("price", kind="numeric")], label="click",
                weight="w")


def test_weight_role_round_trips_and_cannot_be_a_feature() -> None:
    again = Schema.from_yaml(SCHEMA.to_yaml())
    assert again.weight == "w" and "w" in again.role_columns
    with pytest.raises(SchemaError, match="weight column 'price'"):
        Schema(fields=[Field("price", kind="numeric")], label="click", weight="price")
    with pytest.raises(SchemaError, match="does not list"):
        Schema(fields=[Field("a")], label="click", weight="w", columns=["a", "click"])


def test_missing_negative_or_text_weights_are_counted_bad_rows(tmp_path: Path) -> None:
    p = tmp_path / "log.csv"
    p.write_text("user_id,item_id,price,click,w\nu1,i1,1.5,1,2.0\nu2,i2,2.0,0,\nu3,i3,1.0,0,-1\n"
                 "u4,i4,3.0,1,abc\nu5,i5,1.0,0,0.5\n")
    report = ReadReport()
    good = pl.concat(list(iter_chunks(p, SCHEMA, report=report)))
    assert good["w"].to_list() == [2.0, 0.5]
    assert report.bad_rows == 3
    assert all("weight 'w': missing, negative or not a number" in e for e in report.examples)
    assert [e.split(":")[0] for e in report.examples] == [f"{p} line {k}" for k in (3, 4, 5)]
    unlabelled = pl.concat(list(iter_chunks(p, SCHEMA, report=ReadReport(), with_label=False)))
    assert unlabelled.height == 5 and "w" not in unlabelled.columns  # scoring needs no weight


@pytest.fixture(scope="module")
def weighted_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("w")
    log, _ = make_click_log(n_rows=6000, n_users=300, n_items=100, seed=2)
    rng = np.random.default_rng(0)
    log = log.with_columns(pl.Series("w", rng.choice([0.5, 1.0, 4.0], log.height)))
    log[:4800].write_csv(d / "train.csv")
    log[4800:5400].write_csv(d / "valid.csv")
    log[5400:].write_csv(d / "test.csv")
    return d


@pytest.mark.parametrize("resident", [True, False])
def test_weights_are_encoded_and_batched(weighted_files: Path, tmp_path: Path, resident: bool) -> None:
    enc = encode_files(SCHEMA, weighted_files / "train.csv", tmp_path, valid=weighted_files / "valid.csv")
    want = pl.read_csv(weighted_files / "train.csv")["w"].to_numpy()
    assert np.array_equal(np.asarray(enc.data["train"].weight), want.astype(np.float32))
    it = BatchIterator(enc.data["train"], batch_size=1000, shuffle=True, resident=resident, block_rows=700,
                       window_blocks=2)
    seen = np.concatenate([np.c_[b.ids[:, 0].numpy(), b.weight.numpy()] for b in it])
    ref = np.c_[np.asarray(enc.data["train"].ids)[:, 0], want]
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, ref.tolist()))


def test_training_and_metrics_honour_weights(weighted_files: Path) -> None:
    run = ctrkit.train(weighted_files / "train.csv", schema=SCHEMA, valid=weighted_files / "valid.csv",
                       test=weighted_files / "test.csv", model="lr", epochs=2, progress=False)
    test = pl.read_csv(weighted_files / "test.csv")
    p = run.bundle.predict(test)
    want = evaluate(test["click"].to_numpy(), p, weight=test["w"].to_numpy())
    for k in ("auc", "logloss", "pred_actual_ratio"):
        assert run.metrics["test"][k] == pytest.approx(want[k], rel=1e-9)
    unweighted = evaluate(test["click"].to_numpy(), p)
    assert run.metrics["test"]["logloss"] != pytest.approx(unweighted["logloss"], rel=1e-6)
    served, _ = run.bundle.evaluate(test)
    assert served["logloss"] == pytest.approx(want["logloss"], rel=1e-9)
