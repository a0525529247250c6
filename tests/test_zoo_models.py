"""The zoo end to end: every registered model trains, saves, reloads and scores raw records the same;
versioned defaults, DeepFM's ablation switches, DCN-V2's variants, explanations and GBDT+LR."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from ctrkit.data.dataset import Batch
from ctrkit.data.synth import make_click_log, split_by_time, synth_schema
from ctrkit.evaluate.explain import explain_batch, explain_bundle
from ctrkit.models import build_model, default_config, model_class, model_names
from ctrkit.models.base import load_defaults
from ctrkit.nn.embedding import FeatureSpec
from ctrkit.pipeline import train
from ctrkit.serve.bundle import Bundle

TINY = {"embed_dim": 4, "hidden": [8]}
SPEC = FeatureSpec(n_ids=12, field_sizes=(4, 4, 4), sparse_names=("a", "b", "c"), dense_names=("x",))


@pytest.fixture(scope="module")
def log() -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """A small synthetic click log split by time."""
    df, _ = make_click_log(n_rows=1500, n_users=80, n_items=60, seed=7)
    return split_by_time(df.drop("p_click"))


# models of several labels or of a sequence field: test_sequence_models.py scores their records
@pytest.mark.parametrize("name", [n for n in model_names() if not model_class(n).multi_head
                                  and not getattr(model_class(n), "target", False)])
def test_every_model_scores_raw_records_the_same_after_reload(name: str, log: tuple, tmp_path: Path) -> None:
    tr, va, te = log
    run = train(tr, schema=synth_schema(), valid=va, model=name, out=tmp_path, epochs=1, batch_size=256,
                progress=False, embed_dim=4, model_options={"hidden": [8]})
    reloaded = Bundle.load(tmp_path / "bundle")
    records = te.head(50).to_dicts()
    records[0]["user_id"], records[1]["genre"], records[2]["price"] = "never-seen", None, None
    before, after = run.bundle.predict(records), reloaded.predict(records)
    assert before.shape == (50,) and np.isfinite(before).all()
    assert np.max(np.abs(before - after)) < 1e-6
    meta = json.loads((tmp_path / "bundle" / "model.json").read_text())
    assert meta["config"]["embed_dim"] == 4 and meta["model"] == name


def test_every_model_ships_a_versioned_yaml_read_by_the_registry() -> None:
    for name in model_names():
        doc = load_defaults(name)
        assert doc is not None and isinstance(doc["version"], int), name
        cls = model_class(name)
        assert cls.config_version == doc["version"] and cls.train_defaults == (doc.get("train") or {})
        assert default_config(name) == cls.config_class.from_dict(doc["model"])
    assert default_config("xdeepfm").cin_sizes == (32, 32)  # type: ignore[attr-defined]


def test_shipped_defaults_are_valid_yaml_with_known_sections() -> None:
    folder = Path(__file__).resolve().parents[1] / "src" / "ctrkit" / "models" / "configs"
    files = sorted(p.stem for p in folder.glob("*.yaml"))
    assert files == model_names()
    for p in folder.glob("*.yaml"):
        assert set(yaml.safe_load(p.read_text())) <= {"version", "model", "train"}


def test_model_specific_settings_are_typed_and_checked() -> None:
    with pytest.raises(ValueError, match="unknown model settings"):
        default_config("deepfm", cin_sizes=[4])
    with pytest.raises(ValueError, match="structure"):
        default_config("dcnv2", structure="sideways")
    with pytest.raises(ValueError, match="fm and deep"):
        default_config("deepfm", fm=False, deep=False)
    with pytest.raises(ValueError, match="bilinear"):
        default_config("fibinet", bilinear="outer")
    with pytest.raises(ValueError, match="fusion_heads"):
        default_config("finalmlp", hidden=[6], fusion_heads=4)


def batch_for(spec: FeatureSpec, n: int = 6, seed: int = 0) -> Batch:
    """Random ids of each field and dense values for ``spec``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (n, spec.n_sparse), generator=gen) + torch.arange(spec.n_sparse) * 4
    return Batch(ids, torch.randn(n, spec.n_dense, generator=gen))


def test_deepfm_switches_turn_a_branch_off() -> None:
    batch = batch_for(SPEC)
    torch.manual_seed(0)
    no_deep = build_model("deepfm", SPEC, deep=False, **TINY).eval()
    assert no_deep.mlp is None
    fm = build_model("fm", SPEC, embed_dim=4).eval()
    fm.load_state_dict(no_deep.state_dict())
    torch.testing.assert_close(no_deep(batch), fm(batch))
    no_fm = build_model("deepfm", SPEC, fm=False, **TINY).eval()
    want = no_fm.linear(batch) + no_fm.mlp(no_fm.embedding(batch).flatten(1)).squeeze(-1)
    torch.testing.assert_close(no_fm(batch), want)


@pytest.mark.parametrize("structure", ["parallel", "stacked"])
@pytest.mark.parametrize("low_rank", [0, 2])
def test_dcnv2_variants_compose_cross_and_mlp(structure: str, low_rank: int) -> None:
    model = build_model("dcnv2", SPEC, structure=structure, low_rank=low_rank, cross_layers=2, **TINY).eval()
    batch = batch_for(SPEC)
    x0 = model.embedding(batch).flatten(1)
    crossed = model.cross(x0)
    h = torch.cat([crossed, model.mlp(x0)], 1) if structure == "parallel" else model.mlp(crossed)
    torch.testing.assert_close(model(batch), model.out(h).squeeze(-1))
    assert type(model.cross).__name__ == ("CrossNetMix" if low_rank else "CrossNetV2")


def test_finalmlp_gates_read_their_context_fields() -> None:
    torch.manual_seed(0)
    model = build_model("finalmlp", SPEC, context1=["b"], context2=["x", "a"], gate_hidden=[5], **TINY).eval()
    assert model.context is None  # both streams have context fields: no learned context to leave untrained
    batch = batch_for(SPEC, n=7)
    emb = model.embedding(batch)  # fields a, b, c, x
    e = emb.flatten(1)
    g1 = 2 * torch.sigmoid(model.gate1.mlp(emb[:, 1]))
    g2 = 2 * torch.sigmoid(model.gate2.mlp(torch.cat([emb[:, 3], emb[:, 0]], 1)))
    torch.testing.assert_close(model(batch), model.fusion(model.mlp1(e * g1), model.mlp2(e * g2)))
    one = build_model("finalmlp", SPEC, context1=[], context2=["c"], **TINY).eval()  # stream 1 keeps its learned vector
    assert one.context is not None and one.gate1.mlp[0].in_features == 4
    spec = FeatureSpec(n_ids=17, field_sizes=(4, 9, 4), sparse_names=("a", "b", "c"), dense_names=("x",))
    auto = build_model("finalmlp", spec, context1="auto", context2="auto", **TINY)
    assert (auto.config.context1, auto.config.context2) == (("a",), ("b",))  # most ids: b; next (tie): a
    only = FeatureSpec(n_ids=4, field_sizes=(4,), sparse_names=("a",), dense_names=("x",))
    assert build_model("finalmlp", only, context1="auto", context2="auto", **TINY).config.context1 == ()
    assert default_config("finalmlp").context1 == "auto"
    saved_before = {k: v for k, v in default_config("finalmlp").to_dict().items() if not k.startswith("context")}
    config = model_class("finalmlp").config_class.from_dict(saved_before)  # as Bundle.load reads model.json
    old = build_model("finalmlp", spec, config)
    assert (old.config.context1, old.config.context2) == ((), ()) and old.context is not None
    with pytest.raises(ValueError, match="context1 must be 'auto' or a list"):
        default_config("finalmlp", context1="user")
    with pytest.raises(ValueError, match=r"context2: no field named \['user'\]; the fields are \['a', 'b', 'c', 'x'\]"):
        build_model("finalmlp", SPEC, context2=["user"], **TINY)


@pytest.mark.parametrize("name, key", [("autoint", "pairs"), ("autoint_plus", "pairs"), ("fat", "pairs"),
                                       ("fibinet", "fields"), ("dcn", "fields"), ("dcnv2", "pairs")])
def test_explain_ranks_fields_of_models_that_show_weights(name: str, key: str) -> None:
    model = build_model(name, SPEC, **TINY)
    batch = batch_for(SPEC)
    shown = model.explain(batch)
    assert key in shown and shown[key].shape[0] == len(batch)
    result = explain_batch(model, batch, top=3)
    assert sorted(f for f, _ in result.fields) == ["a", "b", "c", "x"]
    scores = [s for _, s in result.fields]
    assert scores == sorted(scores, reverse=True)
    if key == "pairs":
        assert len(result.pairs) == 3 and all(a != b for a, b, _ in result.pairs)
    if name in ("autoint", "fat"):  # attention rows sum to one, so the mean attention received sums to one
        assert sum(scores) == pytest.approx(1.0)


def test_explain_names_models_that_show_nothing() -> None:
    with pytest.raises(ValueError, match="no field weights to show.*fibinet"):
        explain_batch(build_model("deepfm", SPEC, **TINY), batch_for(SPEC))


@pytest.mark.parametrize("top", [0, -3])
def test_explain_wants_at_least_one_pair(top: int) -> None:
    """``top=-3`` once listed every pair but the last three (a slice from the end)."""
    with pytest.raises(ValueError, match=f"--top must be at least 1, got {top}"):
        explain_batch(build_model("dcnv2", SPEC, **TINY), batch_for(SPEC), top=top)


def test_explain_bundle_and_cli(log: tuple, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctrkit.cli import app

    tr, va, te = log
    train(tr, schema=synth_schema(), valid=va, model="fibinet", out=tmp_path, epochs=1, batch_size=256,
          progress=False, embed_dim=4, model_options={"hidden": [8]})
    data = tmp_path / "test.csv"
    te.write_csv(data)
    bundle = Bundle.load(tmp_path / "bundle")
    result = explain_bundle(bundle, data, max_rows=100)
    spec = bundle.model.spec
    assert result.rows == 100 and {f for f, _ in result.fields} == set(spec.sparse_names + spec.dense_names)
    out = CliRunner().invoke(app, ["explain", str(tmp_path / "bundle"), str(data), "--rows", "100"])
    assert out.exit_code == 0, out.output
    assert "fibinet" in out.output and result.fields[0][0] in out.output
    out = CliRunner().invoke(app, ["explain", str(tmp_path / "bundle"), str(tmp_path / "nope.csv")])
    assert out.exit_code == 2 and "nope.csv" in out.output
    out = CliRunner().invoke(app, ["explain", str(tmp_path / "bundle"), str(data), "--rows", "0"])
    assert out.exit_code == 2 and "--rows must be at least 1, got 0" in out.output, out.output


def test_gbdt_lr_leaves_are_fields_of_an_lr() -> None:
    from ctrkit.data.dataset import EncodedData

    gen = np.random.default_rng(0)
    ids = gen.integers(0, 4, (600, 3)) + np.arange(3) * 4
    dense = gen.normal(size=(600, 1)).astype(np.float32)
    label = ((ids[:, 0] == 1) ^ (dense[:, 0] > 0)).astype(np.float32)
    model = build_model("gbdt_lr", SPEC, trees=5, leaves=4, min_child_samples=5)
    with pytest.raises(RuntimeError, match="not fitted"):
        model(Batch(torch.from_numpy(ids), torch.from_numpy(dense)))
    model.fit_features(EncodedData(ids.astype(np.int32), dense, label))
    batch = Batch(torch.from_numpy(ids[:8]), torch.from_numpy(dense[:8]))
    leaves = model.leaves(batch)
    assert leaves.shape == (8, 5)
    for t in range(5):
        assert ((leaves[:, t] >= 4 * t) & (leaves[:, t] < 4 * t + 4)).all()
    torch.nn.init.normal_(model.leaf_weight.weight)
    want = model.bias + model.leaf_weight.weight[leaves, 0].sum(1) + model.linear(batch)
    torch.testing.assert_close(model(batch), want)
    restored = build_model("gbdt_lr", SPEC, trees=5, leaves=4, min_child_samples=5)
    restored.load_state_dict(model.state_dict())
    torch.testing.assert_close(restored(batch), model(batch))


def test_cli_set_passes_typed_model_settings(log: tuple, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctrkit.cli import app

    tr, va, _ = log
    tr.write_csv(tmp_path / "train.csv")
    va.write_csv(tmp_path / "valid.csv")
    synth_schema().save(tmp_path / "schema.yaml")
    args = ["train", str(tmp_path / "train.csv"), "--valid", str(tmp_path / "valid.csv"), "--schema",
            str(tmp_path / "schema.yaml"), "--model", "deepfm", "--epochs", "1", "--quiet", "--embed-dim", "4"]
    out = CliRunner().invoke(app, args + ["--out", str(tmp_path / "a"), "--set", "fm=false", "--set", "hidden=[8]",
                                             "--set", "emb_l2=1e-5"])
    assert out.exit_code == 0, out.output
    config = json.loads((tmp_path / "a" / "bundle" / "model.json").read_text())["config"]
    assert config["fm"] is False and config["hidden"] == [8] and config["emb_l2"] == 1e-5
    out = CliRunner().invoke(app, args + ["--out", str(tmp_path / "b"), "--set", "fm"])
    assert out.exit_code == 2 and "KEY=VALUE" in out.output
    out = CliRunner().invoke(app, args + ["--out", str(tmp_path / "c"), "--set", "depth=3"])
    assert out.exit_code == 2 and "unknown model settings ['depth']" in out.output
