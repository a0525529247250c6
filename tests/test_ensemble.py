"""Deep ensembles: the mean of the members' logits, members equal to runs trained apart, bundle and scorer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from ctrkit.data.dataset import Batch
from ctrkit.evaluate.report import _learning_curves
from ctrkit.data.synth import make_click_log, split_by_time, synth_schema
from ctrkit.models.base import build_model
from ctrkit.models.ensemble import Ensemble
from ctrkit.nn.embedding import FeatureSpec
from ctrkit.pipeline import Run, train
from ctrkit.serve.bundle import Bundle, BundleError
from ctrkit.serve.scorer import Scorer


def small_spec(labels: tuple[str, ...] = ("click",)) -> FeatureSpec:
    return FeatureSpec(n_ids=16, field_sizes=(5, 7, 4), sparse_names=("a", "b", "c"), dense_names=("x", "y"),
                       label_names=labels)


def random_batch(spec: FeatureSpec, n: int = 16, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *np.cumsum(spec.field_sizes)[:-1]])
    ids = offsets + (torch.rand(n, len(spec.field_sizes), generator=g) * torch.tensor(spec.field_sizes)).long()
    return Batch(ids.int(), torch.randn(n, spec.n_dense, generator=g))


@pytest.mark.parametrize("name,labels", [("deepfm", ("click",)), ("dcnv2", ("click",)),
                                         ("esmm", ("click", "conversion"))])
def test_forward_is_the_mean_of_the_members_logits(name: str, labels: tuple[str, ...]) -> None:
    spec = small_spec(labels)
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(build_model(name, spec).eval())
    ens = Ensemble(members).eval()
    batch = random_batch(spec)
    with torch.no_grad():
        expected = sum(m(batch) for m in members) / 3
        got = ens(batch)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert ens.multi_head == (len(labels) > 1)
    assert ens.regularization() is None


def test_members_must_be_two_or_more_of_one_kind() -> None:
    spec = small_spec()
    with pytest.raises(ValueError, match="at least 2 members"):
        Ensemble([build_model("fm", spec)])
    with pytest.raises(ValueError, match="one model with one config"):
        Ensemble([build_model("fm", spec), build_model("deepfm", spec)])
    with pytest.raises(ValueError, match="one model with one config"):
        Ensemble([build_model("deepfm", spec), build_model("deepfm", spec, embed_dim=8)])


@pytest.fixture(scope="module")
def log_splits() -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    log, _ = make_click_log(n_rows=5000, n_users=200, n_items=150, seed=5)
    return split_by_time(log.drop("p_click"))


def fit(splits: tuple[pl.DataFrame, ...], out: Path, seed: int, ensemble: int = 1, **kw: object) -> Run:
    """DeepFM with an explicit L2, so no member starts from the exact first-order fit of a small log."""
    tr, va, te = splits
    return train(tr, schema=synth_schema(), valid=va, test=te, model="deepfm", out=out, epochs=2, batch_size=512,
                 seed=seed, ensemble=ensemble, calibrate="none", progress=False,
                 model_options={"emb_l2": 1e-4}, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def runs(log_splits: tuple[pl.DataFrame, ...], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """An ensemble of two DeepFMs (seeds 3 and 4) and the two single runs of those seeds."""
    return {"ens": fit(log_splits, tmp_path_factory.mktemp("ens"), seed=3, ensemble=2),
            "s3": fit(log_splits, tmp_path_factory.mktemp("s3"), seed=3),
            "s4": fit(log_splits, tmp_path_factory.mktemp("s4"), seed=4)}


def test_members_are_the_runs_of_their_seeds(runs: dict[str, Run], log_splits: tuple[pl.DataFrame, ...]) -> None:
    """Member i is exactly what a run of seed + i trains alone, and the ensemble serves their mean logit."""
    test = log_splits[2]
    ens = runs["ens"].bundle
    assert isinstance(ens.model, Ensemble) and len(ens.model.members) == 2
    for member, single in zip(ens.model.members, (runs["s3"], runs["s4"])):
        for (k, a), (_, b) in zip(member.state_dict().items(), single.bundle.model.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    z = ens.predict(test)  # calibrate="none": the sigmoid of the mean logit
    z3, z4 = (r.bundle.predict(test) for r in (runs["s3"], runs["s4"]))
    logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
    np.testing.assert_allclose(logit(z), (logit(z3) + logit(z4)) / 2, atol=1e-5)


def test_metrics_record_each_member(runs: dict[str, Run]) -> None:
    run = runs["ens"]
    m = json.loads((run.out / "metrics.json").read_text())
    singles = [json.loads((runs[k].out / "metrics.json").read_text())["train"] for k in ("s3", "s4")]
    tr = m["train"]
    assert [t["best_epoch"] for t in tr["members"]] == tr["best_epoch"] == [s["best_epoch"] for s in singles]
    assert tr["epochs"] == sum(s["epochs"] for s in singles)
    assert [t["history"][-1]["valid"] for t in tr["members"]] == [s["history"][-1]["valid"] for s in singles]
    assert m["model"]["members"] == 2
    assert m["model"]["parameters"] == 2 * json.loads((runs["s3"].out / "metrics.json").read_text())["model"][
        "parameters"]
    for i in range(2):
        assert (run.out / "checkpoints" / f"member{i}" / "last.pt").exists()
    fig = _learning_curves(m["train"])  # the report draws each member's curves
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert {"member 1: valid AUC", "member 2: valid AUC"} <= set(labels)


def test_bundle_reloads_and_scores_raw_records_the_same(runs: dict[str, Run],
                                                        log_splits: tuple[pl.DataFrame, ...]) -> None:
    run = runs["ens"]
    test = log_splits[2]
    path = run.out / "bundle"
    assert json.loads((path / "model.json").read_text())["members"] == 2
    loaded = Bundle.load(path)
    assert isinstance(loaded.model, Ensemble) and loaded.model_name == "deepfm"
    before = run.bundle.predict(test)
    np.testing.assert_allclose(loaded.predict(test.to_dicts()), before, atol=1e-6)
    scorer = Scorer(loaded, path)
    np.testing.assert_allclose(scorer.predict(test.head(100).to_dicts()), before[:100], atol=1e-6)
    assert "torch folded" in scorer.skipped  # the folded form is for one embedding-sum model
    single = Scorer(runs["s3"].bundle)
    assert not scorer._same_shapes(single) and scorer._same_shapes(Scorer(run.bundle))  # a swap times it anew


def test_a_bundle_with_a_bad_member_count_is_refused(runs: dict[str, Run], tmp_path: Path) -> None:
    src = runs["ens"].out / "bundle"
    bad = tmp_path / "bundle"
    runs["ens"].bundle.save(bad)
    meta = json.loads((bad / "model.json").read_text())
    meta["members"] = 3
    (bad / "model.json").write_text(json.dumps(meta, indent=1))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["model.json"] = hashlib.sha256((bad / "model.json").read_bytes()).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(manifest, indent=1))
    with pytest.raises(BundleError, match="weights do not match"):
        Bundle.load(bad)
    assert src.exists()


def test_resume_restores_finished_members(log_splits: tuple[pl.DataFrame, ...], runs: dict[str, Run],
                                          tmp_path: Path) -> None:
    """A resumed ensemble whose members had all finished trains nothing and serves the same model."""
    tr, va, te = log_splits
    out = tmp_path / "ens"
    first = fit(log_splits, out, seed=3, ensemble=2)
    again = fit(log_splits, out, seed=3, ensemble=2, resume=True)
    np.testing.assert_allclose(again.bundle.predict(te), first.bundle.predict(te), atol=1e-7)


def test_members_share_the_first_order_fit_of_a_small_log(log_splits: tuple[pl.DataFrame, ...],
                                                           tmp_path: Path) -> None:
    """On a small log the first-order weights and their L2 are fitted once; every member starts from that fit
    (one config), and the members' deep parts differ by seed."""
    tr, va, _ = log_splits
    run = train(tr, schema=synth_schema(), valid=va, model="deepfm", out=tmp_path / "r", epochs=1, batch_size=512,
                ensemble=2, calibrate="none", progress=False)
    auto = run.metrics["train"]["auto"]
    assert "first_order" in auto and sum("L-BFGS" in r for r in auto["reasons"]) == 1
    a, b = run.bundle.model.members
    assert a.config == b.config and a.config.linear_l2 == auto["model"]["linear_l2"]
    assert not torch.equal(a.mlp[0].weight, b.mlp[0].weight)


def test_bad_member_counts_are_errors(log_splits: tuple[pl.DataFrame, ...], tmp_path: Path) -> None:
    tr, va, _ = log_splits
    with pytest.raises(ValueError, match="--ensemble must be >= 1"):
        train(tr, schema=synth_schema(), valid=va, model="fm", ensemble=0, progress=False)
    with pytest.raises(ValueError, match="TorchRec"):
        train(tr, schema=synth_schema(), valid=va, model="fm", ensemble=2, embedding_backend="torchrec",
              progress=False)
