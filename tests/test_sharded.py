"""TorchRec-sharded embedding tables (``embedding_backend="torchrec"``) against ctrkit's plain tables: a step and a
training run give the same weights and AUCs, in 1 process and on 2 gloo ranks, and the model comes back plain.
Their distributed checkpoints resume to the uninterrupted run, also on another number of ranks, and survive a
crash while one is written."""

from __future__ import annotations

import gc
import json
import os
import pickle
import shutil
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from typer.testing import CliRunner

from ctrkit.cli import app
from ctrkit.data.dataset import Batch
from ctrkit.data.synth import make_click_log, split_by_time
from ctrkit.models import build_model
from ctrkit.nn.embedding import tables_on
from ctrkit.serve.bundle import Bundle
from ctrkit.training import sharded, trainer
from ctrkit.training.checkpoint import load_checkpoint
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


def _rec_config(**kw: object) -> TrainConfig:
    return _config(**{"epochs": 3, "optimizer": "adagrad", "embedding_backend": "torchrec", **kw})


def _fresh_group() -> None:
    """End this process's 1-process group (and the sharded modules that hold it) so the next run starts anew."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def _keeping(at: tuple[int, int], copy_to: Path) -> Callable[..., Path]:
    """``save_sharded_checkpoint`` that also copies the checkpoint folder once it holds the checkpoint written at
    (epoch, step) ``at``: a run stopped there (rank 0 copies, after every rank has written its shards)."""
    real = trainer.save_sharded_checkpoint

    def save(folder: str | Path, state: dict, shards: dict) -> Path:
        path = real(folder, state, shards)
        if (state["epoch"], state["step"]) == at and (not dist.is_initialized() or dist.get_rank() == 0):
            shutil.copytree(folder, copy_to)
        return path

    return save


def _weights(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _worker(rank: int, out: str, one_process_ckpt: str = "") -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        weights = _steps("torchrec", rank, 2)
        history, final, scores = _run("torchrec")
        # 2 ranks write checkpoints; the one of epoch 2, step 4 (mid-epoch) is kept for a 1-process resume
        real = trainer.save_sharded_checkpoint
        trainer.save_sharded_checkpoint = _keeping((2, 4), Path(out) / "two_mid")  # type: ignore[assignment]
        train(_model(), _data(300), _data(120), _rec_config(epochs=2, checkpoint_dir=f"{out}/two", checkpoint_every=3))
        trainer.save_sharded_checkpoint = real  # type: ignore[assignment]
        # a checkpoint written by 1 process resumed on 2 ranks
        if rank == 0:
            shutil.copytree(one_process_ckpt, Path(out) / "from_one")
        dist.barrier()
        m = _model()
        res = train(m, _data(300), _data(120), _rec_config(checkpoint_dir=f"{out}/from_one", resume=True))
        if rank == 0:
            torch.save({"steps": weights, "history": history, "final": final, "scores": scores,
                        "from_one": {"history": res.history, "final": _weights(m)}}, Path(out) / "rank0.pt")
    finally:
        gc.collect()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_process_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of a 1-process run's checkpoint at epoch 2, step 4 (mid-epoch), as if it had stopped there."""
    out = tmp_path_factory.mktemp("one_process")
    real = trainer.save_sharded_checkpoint
    trainer.save_sharded_checkpoint = _keeping((2, 4), out / "mid")  # type: ignore[assignment]
    try:
        train(_model(), _data(300), _data(120), _rec_config(epochs=2, checkpoint_dir=str(out / "run"),
                                                            checkpoint_every=3))
    finally:
        trainer.save_sharded_checkpoint = real  # type: ignore[assignment]
        _fresh_group()
    return out / "mid"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, one_process_ckpt: Path) -> dict:
    out = spawn_two(partial(_worker, one_process_ckpt=str(one_process_ckpt)), tmp_path_factory, "torchrec")
    return {**torch.load(out / "rank0.pt", weights_only=False), "out": out}


@pytest.fixture(scope="module")
def uninterrupted() -> tuple[list[dict], dict[str, torch.Tensor]]:
    """History and final weights of the 1-process sharded run of 3 epochs, without checkpoints."""
    m = _model()
    res = train(m, _data(300), _data(120), _rec_config())
    _fresh_group()
    return res.history, _weights(m)


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
    # cancel gets its sum rounded in another order, and Adagrad's g / sqrt(sum g^2) amplifies that (seen: 6.7e-8)
    _same(two_ranks["steps"], _steps("plain"), atol=1e-5)


def test_two_rank_sharded_training_equals_the_plain_run(two_ranks: dict) -> None:
    h_plain, w_plain, s_plain = _run("plain")
    got = [h["valid"]["auc"] for h in two_ranks["history"]]
    assert got == pytest.approx([h["valid"]["auc"] for h in h_plain], abs=1e-6)
    _same(two_ranks["final"], w_plain)
    np.testing.assert_allclose(two_ranks["scores"], s_plain, atol=1e-5)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].numel())


@pytest.mark.parametrize("optimizer", ["adagrad", "rowwise_adagrad"])
def test_a_crash_while_writing_a_checkpoint_keeps_the_last_one_which_resumes_to_the_same_run(
        optimizer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = _model()
    # with the same checkpoints: the epoch's loss is a mean of the means read at each of them
    ref = train(whole, _data(300), _data(120), _rec_config(optimizer=optimizer, checkpoint_dir=str(tmp_path / "whole"),
                                                           checkpoint_every=3))
    _fresh_group()
    # the run dies while its checkpoint of global step 9 (epoch 2, step 4) is half written
    real_save = dcp.save

    def dying(state: dict, checkpoint_id: Path) -> None:
        if Path(checkpoint_id).name.endswith("-g9"):
            real_save({"model": state["model"]}, checkpoint_id=checkpoint_id)
            (Path(checkpoint_id) / ".metadata").unlink()
            raise RuntimeError("killed while writing")
        real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(dcp, "save", dying)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="killed while writing"):
        train(_model(), _data(300), _data(120), _rec_config(optimizer=optimizer, checkpoint_dir=str(ckpt),
                                                            checkpoint_every=3))
    _fresh_group()
    monkeypatch.setattr(dcp, "save", real_save)
    state = load_checkpoint(ckpt)
    assert state is not None and state["backend"] == "torchrec" and state["ranks"] == 1
    assert (state["epoch"], state["step"], state["global_step"], state["epoch_done"]) == (2, 1, 6, False)
    assert {p.name for p in ckpt.iterdir()} == {"last.pt", "last.json", "sharded-e2-s1-g6", "sharded-e2-s4-g9"}
    resumed = _model()
    res = train(resumed, _data(300), _data(120), _rec_config(optimizer=optimizer, checkpoint_dir=str(ckpt),
                                                             checkpoint_every=3, resume=True))
    assert [h["valid"]["auc"] for h in res.history] == pytest.approx([h["valid"]["auc"] for h in ref.history],
                                                                     abs=1e-6)
    assert [h["train_loss"] for h in res.history] == pytest.approx([h["train_loss"] for h in ref.history],
                                                                   abs=1e-6)
    assert _max_diff(_weights(resumed), _weights(whole)) <= 1e-6
    assert {p.name for p in ckpt.iterdir()} == {"last.pt", "last.json", "sharded-e3-s5-g15"}  # older shards gone


def _whole(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the DCP shards that ``folder``'s checkpoint names, read whole (DCP joins the shards)."""
    state = load_checkpoint(folder)
    assert state is not None
    shards = folder / state["tables"]
    index = dcp.FileSystemReader(shards).read_metadata().state_dict_metadata
    out = {k: torch.zeros(v.size, dtype=v.properties.dtype) for k, v in index.items() if hasattr(v, "size")}
    dcp.load(out, checkpoint_id=shards, no_dist=True)
    return out


def test_a_two_rank_checkpoint_holds_the_state_of_one_process(two_ranks: dict, one_process_ckpt: Path) -> None:
    # TorchRec averages the table gradients over the ranks: the fused optimizer's accumulators, not only the
    # weights, are those of one process (Adagrad would hide a gradient scale in the weights, not in its state)
    two, one = _whole(two_ranks["out"] / "two_mid"), _whole(one_process_ckpt)
    assert two.keys() == one.keys() and any(k.startswith("table_optim.") for k in one)
    _same(two, one, atol=1e-5)


def test_a_two_rank_checkpoint_resumes_on_one_process(two_ranks: dict, uninterrupted: tuple, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_ranks["out"] / "two_mid", ckpt)
    state = load_checkpoint(ckpt)
    assert state is not None and state["ranks"] == 2 and (state["epoch"], state["step"]) == (2, 4)
    resumed = _model()
    res = train(resumed, _data(300), _data(120), _rec_config(checkpoint_dir=str(ckpt), resume=True))
    history, final = uninterrupted
    # float32 tables: two ranks' gradients of a row are summed in another order than one process's (see above)
    assert [h["valid"]["auc"] for h in res.history] == pytest.approx([h["valid"]["auc"] for h in history], abs=1e-5)
    assert _max_diff(_weights(resumed), final) <= 1e-5


def test_a_one_process_checkpoint_resumes_on_two_ranks(two_ranks: dict, uninterrupted: tuple) -> None:
    history, final = uninterrupted
    got = two_ranks["from_one"]
    assert [h["valid"]["auc"] for h in got["history"]] == pytest.approx([h["valid"]["auc"] for h in history],
                                                                        abs=1e-5)
    assert _max_diff(got["final"], final) <= 1e-5


class _Crafted:
    def __reduce__(self) -> tuple:
        return os.getpid, ()


def test_a_checkpoint_of_the_other_backend_is_refused_with_what_it_is(tmp_path: Path) -> None:
    rec, plain = tmp_path / "rec", tmp_path / "plain"
    train(_model(), _data(300), None, _rec_config(epochs=1, checkpoint_dir=str(rec)))
    _fresh_group()
    train(_model(), _data(300), None, _config(epochs=1, optimizer="adagrad", checkpoint_dir=str(plain)))
    with pytest.raises(RuntimeError, match=r"rec/last\.pt is a checkpoint of TorchRec-sharded tables .*written by "
                                           r"1 rank.*--embedding-backend torchrec"):
        train(_model(), _data(300), None, _config(epochs=2, optimizer="adagrad", checkpoint_dir=str(rec),
                                                  resume=True))
    with pytest.raises(RuntimeError, match=r"plain/last\.pt is a checkpoint of ctrkit's plain tables.*"
                                           r"Resume it with --embedding-backend plain"):
        train(_model(), _data(300), None, _rec_config(epochs=2, checkpoint_dir=str(plain), resume=True))
    _fresh_group()
    shards = next(rec.glob("sharded-*"))
    index = (shards / ".metadata").read_bytes()
    (shards / ".metadata").write_bytes(pickle.dumps(_Crafted()))  # an index that would call a function
    with pytest.raises(RuntimeError, match=rf"{shards.name} \(named by .*last\.pt\) could not be read.*"
                                           r"posix\.getpid is not part of a checkpoint index"):
        train(_model(), _data(300), None, _rec_config(epochs=2, checkpoint_dir=str(rec), resume=True))
    _fresh_group()
    (shards / ".metadata").write_bytes(index)
    shutil.rmtree(shards)
    with pytest.raises(RuntimeError, match=rf"{shards.name}, but that folder is missing"):
        train(_model(), _data(300), None, _rec_config(epochs=2, checkpoint_dir=str(rec), resume=True))


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
    state = load_checkpoint(tmp_path / "rec" / "checkpoints")  # a checkpoint after each epoch, sharded
    assert state is not None and state["backend"] == "torchrec" and (state["epoch"], state["epoch_done"]) == (2, True)
    res = runner.invoke(app, ["train", *common, "--out", str(tmp_path / "rec"), "--embedding-backend", "torchrec",
                              "--resume"])  # a finished run: the best weights come back from the checkpoint
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "rec" / "metrics.json").read_text())
    assert again["test"]["auc"] == pytest.approx(rec["test"]["auc"], abs=1e-6)
    bundle = Bundle.load(tmp_path / "rec" / "bundle")  # plain tables: scores without TorchRec's modules
    assert not any(isinstance(m, sharded.TorchRecTable) for m in bundle.model.modules())
    p = bundle.predict(te.drop("click").head(20).to_dicts())
    assert p.shape == (20,) and np.all((p > 0) & (p < 1))
    adam = [a for a in common if a not in ("--optimizer", "adagrad")]
    res = runner.invoke(app, ["train", *adam, "--out", str(tmp_path / "adam"), "--embedding-backend", "torchrec"])
    assert res.exit_code != 0 and "--optimizer adagrad" in res.output
