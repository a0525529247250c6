"""Validation cuts without a validation file: by group keeps every user on one side; bad choices are named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ctrkit
from ctrkit.data.encode import EncoderError, encode_files
from ctrkit.data.synth import make_click_log, synth_schema
from ctrkit.schema import Schema


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("split") / "log.csv"
    make_click_log(n_rows=5000, n_users=400, n_items=100, seed=4)[0].drop("p_click").write_csv(p)
    return p


def test_group_split_puts_each_user_on_one_side(log_file: Path, tmp_path: Path) -> None:
    enc = encode_files(synth_schema(), log_file, tmp_path, split="group")
    train_users = set(np.asarray(enc.data["train"].group).tolist())
    valid_users = set(np.asarray(enc.data["valid"].group).tolist())
    assert valid_users and not train_users & valid_users
    assert 0.03 < len(enc.data["valid"]) / 5000 < 0.2


def test_split_choices_need_their_column(log_file: Path, tmp_path: Path) -> None:
    plain = Schema(fields=synth_schema().fields, label="click")
    with pytest.raises(EncoderError, match="--split time needs a `time` column"):
        encode_files(plain, log_file, tmp_path / "a", split="time")
    with pytest.raises(EncoderError, match="--split group needs a `group` column"):
        encode_files(plain, log_file, tmp_path / "b", split="group")
    with pytest.raises(ValueError, match="split must be one of"):
        encode_files(plain, log_file, tmp_path / "c", split="kfold")


def test_random_split_with_a_time_field_warns(log_file: Path) -> None:
    said: list[str] = []
    ctrkit.train(log_file, schema=synth_schema(), model="lr", epochs=1, split="random", progress=False,
                 log=said.append)
    assert any("--split random although the schema has a time field" in s for s in said)
    said.clear()
    ctrkit.train(log_file, schema=synth_schema(), model="lr", epochs=1, progress=False, log=said.append)
    assert not any("--split random" in s for s in said)
