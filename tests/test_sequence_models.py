"""DIN, ESMM and MMoE: their layers against literal formulas, multi-head training, and every model's bundle
scoring records whose multi / sequence fields are lists, separator strings, empty or unseen."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrkit.data.dataset import Batch
from ctrkit.data.readers import DataError
from ctrkit.models import build_model, model_class, model_names
from ctrkit.models.multitask import logit_of_product
from ctrkit.nn.embedding import FeatureSpec
from ctrkit.nn.sequence import Experts, TargetAttention
from ctrkit.pipeline import train
from ctrkit.schema import Field, Schema
from ctrkit.serve.bundle import Bundle
from ctrkit.training.step import bce as loss_fn
from ctrkit.training.trainer import predict_proba

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "tiny_fixtures"  # ../shared


# -- layers against their formulas --------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_target_attention_against_the_paper(seed: int) -> None:
    """v_U = sum_j a(e_j, v_A) e_j over the behaviours actually present, a = MLP([e_j, v_A, e_j - v_A, e_j * v_A])."""
    torch.manual_seed(seed)
    b, length, d = 3, 5, 4
    att = TargetAttention(d, (6, 3)).double()
    keys, target = torch.randn(b, length, d, dtype=torch.float64), torch.randn(b, d, dtype=torch.float64)
    lengths = torch.randint(0, length + 1, (b,))
    mask = torch.arange(length) < lengths.unsqueeze(1)
    out = att(keys, target, mask).detach()
    for i in range(b):
        expect = torch.zeros(d, dtype=torch.float64)
        for j in range(int(lengths[i])):
            h, t = keys[i, j], target[i]
            a = att.mlp(torch.cat([h, t, h - t, h * t]).unsqueeze(0))[0, 0]
            expect += a * h
        torch.testing.assert_close(out[i], expect.detach(), atol=1e-5, rtol=1e-5)
    # what sits at a masked position does not matter
    noisy = torch.where(mask.unsqueeze(-1), keys, torch.randn_like(keys) * 100)
    torch.testing.assert_close(att(noisy, target, mask).detach(), out, atol=1e-5, rtol=1e-5)


def test_logit_of_product() -> None:
    a, b = torch.linspace(-8, 8, 17, dtype=torch.float64), torch.linspace(6, -6, 17, dtype=torch.float64)
    p = torch.sigmoid(a) * torch.sigmoid(b)
    torch.testing.assert_close(logit_of_product(a, b), torch.log(p / (1 - p)), atol=1e-6, rtol=1e-6)


def test_experts_against_a_loop() -> None:
    torch.manual_seed(0)
    ex = Experts(3, 5, (4, 2))
    x = torch.randn(6, 5)
    out = ex(x).detach()
    for e in range(3):
        h = x
        for w, bias in zip(ex.weights, ex.biases):
            h = torch.relu(h @ w[e] + bias[e])
        torch.testing.assert_close(out[:, e], h.detach(), atol=1e-5, rtol=1e-5)


def _spec(labels: tuple[str, ...] = ()) -> FeatureSpec:
    return FeatureSpec(n_ids=30, field_sizes=(10, 10), sparse_names=("user", "item"), dense_names=("p",),
                       seq_names=("tags", "history"), seq_kinds=("multi", "sequence"), seq_pooling=("mean", "mean"),
                       seq_targets=("", "item"), seq_max=4, label_names=labels)


def _batch(n: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 10, (n,), generator=g), torch.randint(10, 20, (n,), generator=g)]
    return Batch(ids=torch.stack(ids, 1),
                 dense=torch.randn(n, 1, generator=g), seq=torch.randint(10, 30, (n, 2, 4), generator=g),
                 seq_len=torch.randint(0, 5, (n, 2), generator=g))


def test_esmm_heads_are_pctr_and_its_product_with_pcvr() -> None:
    torch.manual_seed(0)
    m = build_model("esmm", _spec(("click", "buy"))).eval()
    batch = _batch()
    out = m(batch)
    ctr, cvr = m.towers(batch)
    torch.testing.assert_close(torch.sigmoid(out[:, 0]), torch.sigmoid(ctr))
    torch.testing.assert_close(torch.sigmoid(out[:, 1]), torch.sigmoid(ctr) * torch.sigmoid(m.cvr_logit(batch)),
                               atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="two labels"):
        build_model("esmm", _spec())


def test_mmoe_against_a_loop_over_tasks_and_experts() -> None:
    torch.manual_seed(0)
    m = build_model("mmoe", _spec(("click", "buy", "like"))).eval()
    batch = _batch()
    out = m(batch).detach()
    x = m.embedding(batch).flatten(1)
    experts = m.experts(x)
    for t in range(3):
        w = m.gates.weight[t * m.n_experts:(t + 1) * m.n_experts]
        bias = m.gates.bias[t * m.n_experts:(t + 1) * m.n_experts]
        gate = torch.softmax(x @ w.T + bias, dim=1)
        mix = sum(gate[:, e:e + 1] * experts[:, e] for e in range(m.n_experts))
        torch.testing.assert_close(out[:, t], m.towers[t](mix).squeeze(-1).detach(), atol=1e-5, rtol=1e-5)


def test_din_attends_only_to_present_history_and_needs_a_target() -> None:
    torch.manual_seed(0)
    m = build_model("din", _spec()).eval()
    batch = _batch()
    out = m(batch)
    changed = batch.seq.clone()
    pad = torch.arange(4) >= batch.seq_len.unsqueeze(-1)
    changed[pad] = 29
    torch.testing.assert_close(m(Batch(batch.ids, batch.dense, seq=changed, seq_len=batch.seq_len)), out)
    spec = _spec()
    no_target = FeatureSpec(**{**spec.__dict__, "seq_targets": ("", "")})
    with pytest.raises(ValueError, match="share_vocab"):
        build_model("din", no_target)


def test_loss_sums_the_heads() -> None:
    logits, label = torch.randn(6, 2), torch.randint(0, 2, (6, 2)).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    torch.testing.assert_close(loss_fn(logits, label), bce(logits[:, 0], label[:, 0]) + bce(logits[:, 1], label[:, 1]))
    torch.testing.assert_close(loss_fn(logits[:, 0], label), bce(logits[:, 0], label[:, 0]))


# -- end to end -----------------------------------------------------------------------------------------
def _log(n: int, seed: int) -> pl.DataFrame:
    """Users, items, '|'-joined genres and each user's earlier items as a history."""
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 40, n), rng.integers(0, 60, n)
    seen: dict[int, list[int]] = {}
    history, click = [], []
    for u, i in zip(users, items):
        past = seen.get(int(u), [])[-8:]
        history.append([f"i{x}" for x in past])
        near = any(abs(x - int(i)) <= 3 for x in past)
        click.append(int(rng.random() < (0.7 if near else 0.2)))
        seen.setdefault(int(u), []).append(int(i))
    genres = ["|".join(f"g{(i * k) % 7}" for k in range(1, 1 + i % 3)) for i in items]
    click_arr = np.array(click)
    return pl.DataFrame({"user": [f"u{u}" for u in users], "item": [f"i{i}" for i in items], "genres": genres,
                         "history": history, "price": rng.random(n), "click": click_arr,
                         "buy": click_arr * (rng.random(n) < 0.4)})


def _schema(labels: list[str]) -> Schema:
    return Schema(fields=[Field("user"), Field("item"), Field("genres", kind="multi", sep="|", max_len=3),
                          Field("history", kind="sequence", share_vocab="item", max_len=6),
                          Field("price", kind="numeric")], label=labels[0], labels=labels)


@pytest.fixture(scope="module")
def logs() -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    log = _log(3000, 0)
    return log.slice(0, 2400), log.slice(2400, 300), log.slice(2700)


ODD_RECORDS = [
    {"user": "u1", "item": "i3", "genres": ["g1", "g2"], "history": ["i1", "i2"], "price": 0.5},
    {"user": "u1", "item": "i3", "genres": "g1|g2", "history": ["i1", "i2"], "price": 0.5},
    {"user": "u2", "item": "i4", "genres": "", "history": [], "price": 0.1},
    {"user": "u2", "item": "i4", "genres": None, "history": None, "price": 0.1},
    {"user": "u999", "item": "i999", "genres": ["nope", "g3"], "history": ["i999", "i12345"], "price": 3.0},
]


@pytest.mark.parametrize("name,ensemble", [*((n, 1) for n in model_names()), ("din", 2), ("esmm", 2)])
def test_every_model_reloads_and_scores_list_records(name: str, ensemble: int, logs, tmp_path: Path) -> None:
    """Every model, and ensembles of the list-field and multi-head kinds, through the bundle."""
    tr, va, te = logs
    labels = ["click", "buy"] if model_class(name).multi_head else ["click"]
    run = train(tr, schema=_schema(labels), valid=va, test=te, model=name, out=tmp_path, epochs=1,
                batch_size=256, ensemble=ensemble, progress=False)
    back = Bundle.load(tmp_path / "bundle")
    frame = te.select(run.bundle.schema.input_columns)
    before, after = run.bundle.predict(frame), back.predict(frame)
    assert np.max(np.abs(before - after)) < 1e-6
    odd = back.predict(ODD_RECORDS)
    assert odd.shape == ((5, 2) if len(labels) == 2 else (5,)) and np.isfinite(odd).all()
    assert np.max(np.abs(odd[0] - odd[1])) < 1e-6  # a list and a separator string are the same record
    assert np.max(np.abs(odd[2] - odd[3])) < 1e-6  # empty and missing are the same
    # the scorer agrees with the encoded test split the trainer evaluated
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    if len(labels) == 2:
        assert set(metrics["test"]["heads"]) == {"click", "buy"}
    assert abs(metrics["test"]["n"] - te.height) == 0


def test_scorer_matches_the_encoded_split_and_names_bad_items(logs, tmp_path: Path) -> None:
    tr, va, te = logs
    run = train(tr, schema=_schema(["click", "buy"]), valid=va, test=te, model="esmm", out=tmp_path, epochs=2,
                batch_size=256, progress=False)
    bundle = run.bundle
    enc_test = bundle.encoder.transform(te, tmp_path / "enc_test")
    p = predict_proba(bundle.model, enc_test)
    assert p.shape == (te.height, 2)
    assert np.max(np.abs(bundle.predict(te.to_dicts()) - p)) < 1e-6
    with pytest.raises(DataError, match=r"record 1: field 'history'"):
        bundle.predict([ODD_RECORDS[0], {**ODD_RECORDS[0], "history": [{"id": 3}]}])
    with pytest.raises(DataError, match=r"record 0: field 'genres'"):
        bundle.predict([{**ODD_RECORDS[0], "genres": {"a": 1}}])
    # the server answers every head of the same bundle, named by its labels, and ranks by the first
    pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install 'ctrkit[serve]'")
    from fastapi.testclient import TestClient

    from ctrkit.serve.app import ServerConfig, create_app

    records = te.select(bundle.schema.input_columns).head(20).to_dicts()
    want = bundle.predict(records)
    with TestClient(create_app(ServerConfig(bundle=tmp_path / "bundle", events=tmp_path / "log"))) as c:
        body = c.post("/score", json={"records": records}).json()
        ranked = c.post("/rank", json={"candidates": records, "k": 3}).json()
    assert list(body["heads"]) == ["click", "buy"]
    np.testing.assert_allclose(body["heads"]["click"], want[:, 0], atol=1e-6)
    np.testing.assert_allclose(body["heads"]["buy"], want[:, 1], atol=1e-6)
    np.testing.assert_allclose(body["pctr"], want[:, 0], atol=1e-6)
    assert [i["index"] for i in ranked["items"]] == list(np.argsort(-want[:, 0], kind="stable")[:3])
    from ctrkit.serve.events import read_events

    shown = read_events(tmp_path / "log")  # the impressions keep their list-valued fields as lists
    assert shown.height == 3
    assert shown["history"].to_list() == [records[i["index"]]["history"] for i in ranked["items"]]


# -- the public tiny fixtures' columns ----------------------------------------------------------------------
def _taobao_like(n: int, seed: int) -> pl.DataFrame:
    """The columns of FuxiCTR's Taobao tiny sample: a '^'-joined click_sequence of adgroup ids, often empty."""
    rng = np.random.default_rng(seed)
    ad = rng.integers(100, 140, n)
    seqs = ["^".join(str(x) for x in rng.integers(100, 160, rng.integers(0, 4))) for _ in range(n)]
    return pl.DataFrame({"clk": rng.integers(0, 2, n), "time_stamp": ["2017-05-06 00:00:00"] * n,
                         "userid": rng.integers(0, 30, n), "adgroup_id": ad, "pid": ["430548_1007"] * n,
                         "cate_id": ad % 7, "brand": ad % 5, "price": rng.random(n) * 100,
                         "final_gender_code": rng.integers(1, 3, n), "pvalue_level": [None] * n,
                         "click_sequence": seqs})


TAOBAO = Schema.from_dict({
    "label": "clk", "time": "time_stamp",
    "fields": ["userid", "adgroup_id", "pid", "cate_id", "brand", {"name": "price", "kind": "numeric"},
               "final_gender_code", "pvalue_level",
               {"name": "click_sequence", "kind": "sequence", "sep": "^", "share_vocab": "adgroup_id",
                "max_len": 8}]})


def _ali_ccp_like(n: int, seed: int) -> pl.DataFrame:
    """The columns of torch-rechub's Ali-CCP sample: click and purchase labels, pre-encoded ids, D* numerics."""
    rng = np.random.default_rng(seed)
    click = (rng.random(n) < 0.3).astype(int)
    cols = {"click": click, "purchase": click * (rng.random(n) < 0.3)}
    cols.update({c: rng.integers(0, 20, n) for c in ("101", "121", "205", "206", "207", "216")})
    cols.update({c: rng.random(n) for c in ("D109_14", "D508")})
    return pl.DataFrame(cols)


ALI_CCP = Schema.from_dict({
    "labels": ["click", "purchase"],
    "fields": ["101", "121", "205", "206", "207", "216", {"name": "D109_14", "kind": "numeric"},
               {"name": "D508", "kind": "numeric"}]})


def _splits(source: str, prefix: str, names: tuple[str, ...], make, tmp_path: Path) -> list[Path]:
    """The shared sample's three files (skipped where ../shared is absent), or three the test writes alike."""
    if source == "shared":
        if not (SHARED / f"{prefix}_{names[0]}_sample.csv").exists():
            pytest.skip("the shared tiny fixtures are not here")
        return [SHARED / f"{prefix}_{s}_sample.csv" for s in names]
    for i, s in enumerate(names):
        make(100, i).write_csv(tmp_path / f"{s}.csv")
    return [tmp_path / f"{s}.csv" for s in names]


@pytest.mark.parametrize("source", ["written", "shared"])
def test_taobao_sample_trains_din_end_to_end(source: str, tmp_path: Path) -> None:
    files = _splits(source, "fuxictr_taobao_tiny", ("train", "valid", "test"), _taobao_like, tmp_path)
    run = train(files[0], schema=TAOBAO, valid=files[1], test=files[2], model="din", out=tmp_path / "run",
                epochs=1, batch_size=32, progress=False)
    assert run.metrics["test"]["n"] == 100 and run.bundle.encoder.seq_names == ["click_sequence"]
    rows = pl.read_csv(files[2], infer_schema_length=0).head(5).to_dicts()
    np.testing.assert_allclose(Bundle.load(tmp_path / "run" / "bundle").predict(rows), run.bundle.predict(rows),
                               atol=1e-6)


@pytest.mark.parametrize("source", ["written", "shared"])
@pytest.mark.parametrize("model", ["esmm", "mmoe"])
def test_ali_ccp_sample_trains_multitask_end_to_end(source: str, model: str, tmp_path: Path) -> None:
    files = _splits(source, "torchrechub_ali_ccp", ("train", "val", "test"), _ali_ccp_like, tmp_path)
    run = train(files[0], schema=ALI_CCP, valid=files[1], test=files[2], model=model, out=tmp_path / "run",
                epochs=1, batch_size=32, progress=False)
    assert set(run.metrics["test"]["heads"]) == {"click", "purchase"}
    assert run.bundle.predict(pl.read_csv(files[2]).head(4)).shape == (4, 2)


def test_cli_predict_writes_a_column_per_head(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctrkit.cli import app

    files = _splits("written", "ali", ("train", "val", "test"), _ali_ccp_like, tmp_path)
    train(files[0], schema=ALI_CCP, valid=files[1], model="esmm", out=tmp_path / "run", epochs=1, batch_size=32,
          progress=False)
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "run" / "bundle"), str(files[2]),
                                   "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    scores = pl.read_csv(tmp_path / "p.csv")
    expected = Bundle.load(tmp_path / "run" / "bundle").predict(pl.read_csv(files[2]))
    assert scores.columns == ["p_click", "p_purchase"]
    np.testing.assert_allclose(scores.to_numpy(), expected, atol=1e-6)


def test_cli_evaluate_shows_every_head(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctrkit.cli import app

    files = _splits("written", "ali", ("train", "val", "test"), _ali_ccp_like, tmp_path)
    train(files[0], schema=ALI_CCP, valid=files[1], model="mmoe", out=tmp_path / "run", epochs=1, batch_size=32,
          progress=False)
    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "run" / "bundle"), str(files[2])])
    assert res.exit_code == 0, res.output
    assert "click" in res.output and "purchase" in res.output  # a row per head
