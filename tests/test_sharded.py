"""TorchRec-sharded embedding tables (``embedding_backend="torchrec"``) against ctrkit's plain tables: a step and a
training run give the same weights and AUCs, in 1 process and on 2 gloo ranks, and the model comes back plain."""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from ctrkit.cli import app
from ctrkit.data.dataset import Batch
from ctrkit.data.synth import make_click_log, split_by_time
from ctrkit.models import build_model
from ctrkit.nn.embedding import tables_on
from ctrkit.serve.bundle import Bundle
from ctrkit.training import sharded
from ctrkit.training.step import LargeBatchRule, TrainStep
from ctrkit.training.trainer import TrainConfig, train

from test_distributed import SPEC, _config, _data, _global_batches, _model, spawn_two

try:
    sharded.require()
except RuntimeError as exc:  # the test setup installs TorchRec where an FBGEMM build matches torch
    pytest.skip(str(exc), allow_module_level=True)


@pytest.fixture(autouse=True)
def _one_process_group() -> object:
    """A 1-process run creates its own process group; it goes with the test that made it."""
    yield
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def _steps(backend: str, rank: int = 0, world_size: int = 1, optimizer: str = "adagrad") -> dict[str, torch.Tensor]:
    """Weights after 3 steps on the global batches (this rank's share of each), the learning rate lowered after
    the first."""
    m = _model()
    step = TrainStep(m, torch.device("cpu"), lr=0.05, optimizer=optimizer, embedding_backend=backend)
    for i, b in enumerate(_global_batches(3, 64)):
        if i == 1:
            step.set_lr(0.02)
        share = torch.tensor_split(torch.arange(64), world_size)[rank]
        step(Batch(ids=b.ids[share], dense=b.dense[share].float(), label=b.label[share].float()))
    step.close()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _run(backend: str) -> tuple[list[dict], dict[str, torch.Tensor], np.ndarray]:
    """History, final weights and test scores of 3 epochs of ``train`` with validation."""
    m = _model()
    res = train(m, _data(300), _data(120), _config(epochs=3, optimizer="adagrad", embedding_backend=backend))
    with torch.no_grad():
        d = _data(50)
        scores = m(Batch(ids=torch.from_numpy(d.ids), dense=torch.from_numpy(d.dense),
                         label=torch.from_numpy(d.label))).numpy()
    return res.history, {k: v.detach().clone() for k, v in m.state_dict().items()}, scores


def _worker(rank: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        weights = _steps("torchrec", rank, 2)
        history, final, scores = _run("torchrec")
        if rank == 0:
            torch.save({"steps": weights, "history": history, "final": final, "scores": scores},
                       Path(out) / "rank0.pt")
    finally:
        gc.collect()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return torch.load(spawn_two(_worker, tmp_path_factory, "torchrec") / "rank0.pt", weights_only=False)


runner = CliRunner()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("optimizer", ["adagrad", "rowwise_adagrad"])
def test_a_sharded_step_is_the_plain_step(optimizer: str) -> None:
    # row-wise Adagrad: the 1-wide first-order table is stored 4 wide, its learning rate scaled back to match
    plain, rec = _steps("plain", optimizer=optimizer), _steps("torchrec", optimizer=optimizer)
    start = _model().state_dict()
    assert any(not torch.equal(start[k], plain[k]) for k in plain)  # the steps moved the weights
    _same(rec, plain)


def test_training_through_torchrec_gives_the_plain_run_and_a_plain_model() -> None:
    (h_plain, w_plain, s_plain), (h_rec, w_rec, s_rec) = _run("plain"), _run("torchrec")
    assert [h["valid"]["auc"] for h in h_rec] == pytest.approx([h["valid"]["auc"] for h in h_plain], abs=1e-6)
    _same(w_rec, w_plain)
    np.testing.assert_allclose(s_rec, s_plain, atol=1e-5)


def test_two_rank_sharded_steps_equal_one_process_plain_steps(two_ranks: dict) -> None:
    # FBGEMM's tables are float32 (the plain DDP test runs in float64): a row whose two ranks' gradients nearly
    # cancel gets its sum rounded in another order, and Adagrad's g / sqrt(sum g^2) amplifies that (seen: 2.7e-6)
    _same(two_ranks["steps"], _steps("plain"), atol=1e-5)


def test_two_rank_sharded_training_equals_the_plain_run(two_ranks: dict) -> None:
    h_plain, w_plain, s_plain = _run("plain")
    got = [h["valid"]["auc"] for h in two_ranks["history"]]
    assert got == pytest.approx([h["valid"]["auc"] for h in h_plain], abs=1e-6)
    _same(two_ranks["final"], w_plain)
    np.testing.assert_allclose(two_ranks["scores"], s_plain, atol=1e-5)


def _meta_model() -> torch.nn.Module:
    torch.manual_seed(7)
    with tables_on("meta"):
        return build_model("deepfm", SPEC, embed_dim=4, hidden=(8,), sparse_grad=True, batch_norm=False,
                           dropout=0.0)


def test_a_model_built_on_meta_gets_its_tables_only_as_shards() -> None:
    m = _meta_model()
    assert m.embedding.table.weight.is_meta and m.linear.table.weight.is_meta
    assert not any(p.is_meta for n, p in m.named_parameters() if "table" not in n)
    sharded.shard(m, torch.device("cpu"), "adagrad", 0.05, 1e-10)
    shards = {k: torch.cat([t for _, t in v]) for k, v in sharded._local_shards(m).items()}
    emb = next(v for k, v in shards.items() if k.startswith("embedding."))
    lin = next(v for k, v in shards.items() if k.startswith("linear."))
    assert emb.shape == (SPEC.n_ids, 4) and 0.005 < float(emb.std()) < 0.015  # the plain table's normal(0.01)
    assert lin.shape == (SPEC.n_ids, 4) and not lin.any()  # first-order weights start at zero (stored 4 wide)
    trained = _meta_model()
    res = train(trained, _data(300), _data(120), _config(epochs=2, optimizer="adagrad", embedding_backend="torchrec"))
    assert isinstance(trained.embedding.table, torch.nn.Embedding) and not trained.embedding.table.weight.is_meta
    assert res.best_valid["auc"] > 0.55


def test_a_missing_torchrec_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchrec", None)  # `import torchrec` now fails as if it were not installed
    with pytest.raises(RuntimeError, match=r"pip install 'ctrkit\[torchrec\]'"):
        sharded.require()


def test_what_the_sharded_tables_refuse() -> None:
    with pytest.raises(ValueError, match="no Adam"):
        TrainStep(_model(), torch.device("cpu"), optimizer="adam", embedding_backend="torchrec")
    with pytest.raises(ValueError, match="dense part"):
        TrainStep(_model(), torch.device("cpu"), optimizer="adagrad", embedding_backend="torchrec",
                  rule=LargeBatchRule(scale=4.0))
    with pytest.raises(ValueError, match="eagerly"):
        TrainStep(_model(), torch.device("cpu"), optimizer="adagrad", embedding_backend="torchrec", compile="on")
    with pytest.raises(ValueError, match="no checkpoints"):
        TrainConfig(embedding_backend="torchrec", resume=True, checkpoint_dir="x")
    with pytest.raises(ValueError, match="embedding_backend must be one of"):
        TrainConfig(embedding_backend="fbgemm")


def test_ctrkit_train_with_torchrec_tables_writes_a_plain_bundle(tmp_path: Path) -> None:
    log, _ = make_click_log(n_rows=3000, n_users=150, n_items=80, seed=5)
    tr, va, te = split_by_time(log.drop("p_click"))
    for name, part in (("train", tr), ("valid", va), ("test", te)):
        part.write_csv(tmp_path / f"{name}.csv")
    res = runner.invoke(app, ["schema", "infer", str(tmp_path / "train.csv")])
    assert res.exit_code == 0, res.output
    (tmp_path / "schema.yaml").write_text(res.stdout)
    common = [str(tmp_path / "train.csv"), "--valid", str(tmp_path / "valid.csv"), "--test",
              str(tmp_path / "test.csv"), "--schema", str(tmp_path / "schema.yaml"), "--model", "deepfm",
              "--epochs", "2", "--batch-size", "256", "--set", "emb_l2=1e-5", "--optimizer", "adagrad", "--quiet",
              "--calibrate", "none"]
    res = runner.invoke(app, ["train", *common, "--out", str(tmp_path / "rec"), "--embedding-backend", "torchrec"])
    assert res.exit_code == 0, res.output
    # the plain tables with the settings the torchrec backend implies (and, as it, without the small-log
    # first-order fit, which an explicit L2 turns off): the same run
    res = runner.invoke(app, ["train", *common, "--out", str(tmp_path / "plain"), "--set", "sparse_grad=true",
                              "--set", "emb_l2_scope=batch"])
    assert res.exit_code == 0, res.output
    rec, plain = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("rec", "plain"))
    assert rec["train"]["config"]["embedding_backend"] == "torchrec"
    assert rec["test"]["auc"] == pytest.approx(plain["test"]["auc"], abs=1e-6)
    bundle = Bundle.load(tmp_path / "rec" / "bundle")  # plain tables: scores without TorchRec's modules
    assert not any(isinstance(m, sharded.TorchRecTable) for m in bundle.model.modules())
    p = bundle.predict(te.drop("click").head(20).to_dicts())
    assert p.shape == (20,) and np.all((p > 0) & (p < 1))
    adam = [a for a in common if a not in ("--optimizer", "adagrad")]
    res = runner.invoke(app, ["train", *adam, "--out", str(tmp_path / "adam"), "--embedding-backend", "torchrec"])
    assert res.exit_code != 0 and "--optimizer adagrad" in res.output
