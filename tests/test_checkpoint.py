"""Checkpoints: a run killed mid-epoch resumes to the same final metrics; a NaN loss stops cleanly."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ctrkit.cli import app
from ctrkit.data.dataset import EncodedData
from ctrkit.data.synth import make_click_log, write_splits
from ctrkit.models import build_model
from ctrkit.nn.embedding import FeatureSpec
from ctrkit.training import trainer
from ctrkit.training.checkpoint import load_checkpoint
from ctrkit.training.losses import bce
from ctrkit.training.step import TrainStep
from ctrkit.training.trainer import TrainConfig, TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3,000-row synthetic log in train / valid / test CSV files with its schema."""
    d = tmp_path_factory.mktemp("ckpt")
    return write_splits(make_click_log(n_rows=3000, n_users=150, n_items=80, seed=5)[0], d)


def _cmd(files: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ctrkit", "train", str(files / "train.csv"), "--valid", str(files / "valid.csv"),
            "--test", str(files / "test.csv"), "--schema", str(files / "schema.yaml"), "--model", "deepfm",
            "--out", str(out), "--epochs", "3", "--batch-size", "16", "--precision", "fp32",
            "--checkpoint-every", "8", "--calibrate", "platt", "--quiet", *extra]


def _figures(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    history = [{k: v for k, v in r.items() if k not in ("train_seconds", "samples_per_s")}
               for r in m["train"]["history"]]
    return {"valid": m["valid"], "test": m["test"], "history": history, "calibration": m["calibration"]}


def test_sigkill_in_epoch_two_then_resume_gives_the_same_metrics(files: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    whole = tmp_path / "whole"
    subprocess.run(_cmd(files, whole), check=True, env=env, capture_output=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cmd(files, cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    where: dict = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                where = json.loads((cut / "checkpoints" / "last.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                where = {}
            if where.get("epoch") == 2 and not where.get("epoch_done"):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed in epoch 2 (last checkpoint {where})"
    assert not (cut / "metrics.json").exists()
    state = load_checkpoint(cut / "checkpoints")
    assert state is not None and state["epoch"] == 2 and 0 < state["step"]
    subprocess.run(_cmd(files, cut, "--resume"), check=True, env=env, capture_output=True)
    assert _figures(cut) == _figures(whole)


def _tiny_data(n: int = 600) -> tuple[FeatureSpec, EncodedData]:
    rng = np.random.default_rng(0)
    spec = FeatureSpec(n_ids=20, field_sizes=(10, 10), sparse_names=("a", "b"), dense_names=())
    ids = np.stack([rng.integers(0, 10, n), rng.integers(10, 20, n)], axis=1).astype(np.int32)
    label = (rng.random(n) < 0.3).astype(np.float32)
    return spec, EncodedData(ids=ids, dense=np.zeros((n, 0), np.float32), label=label)


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}

    def poisoned(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        calls["n"] += 1
        loss = bce(logits, label, weight)
        return loss * float("nan") if calls["n"] == 23 else loss

    monkeypatch.setattr(trainer, "make_loss", lambda *a, **k: poisoned)
    spec, data = _tiny_data()
    torch.manual_seed(0)
    model = build_model("fm", spec, embed_dim=4)
    cfg = TrainConfig(epochs=3, batch_size=50, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=5)
    with pytest.raises(TrainingDiverged, match=r"NaN or infinite at step 23 \(epoch 2\).*epoch 2, step 8"):
        train(model, data, None, cfg)
    state = load_checkpoint(tmp_path)
    assert state is not None and (state["epoch"], state["step"], state["global_step"]) == (2, 8, 20)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_failed_run_gives_the_model_back_as_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that stops with an error (here a NaN loss, with row updates as on a GPU) closes its step: the
    tables get their own lookups and sparse gradients back."""
    def poisoned(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return bce(logits, label, weight) * float("nan")

    monkeypatch.setattr(trainer, "make_loss", lambda *a, **k: poisoned)
    monkeypatch.setattr(trainer, "TrainStep", functools.partial(TrainStep, row_updates=True))
    spec, data = _tiny_data()
    model = build_model("fm", spec, embed_dim=4, sparse_grad=True)
    with pytest.raises(TrainingDiverged):
        train(model, data, None, TrainConfig(epochs=1, batch_size=50, progress=False))
    for table in (model.embedding.table, model.linear.table):
        assert table.sparse and "forward" not in table.__dict__


def test_the_cli_exits_non_zero_on_a_nan_loss(files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def poisoned(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return bce(logits, label, weight) * float("inf")

    monkeypatch.setattr(trainer, "make_loss", lambda *a, **k: poisoned)
    res = CliRunner().invoke(app, ["train", str(files / "train.csv"), "--valid", str(files / "valid.csv"),
                                   "--schema", str(files / "schema.yaml"), "--model", "lr", "--out",
                                   str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 2
    assert "NaN or infinite at step 1" in res.output


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path: Path) -> None:
    spec, data = _tiny_data()
    model = build_model("lr", spec)
    train(model, data, None, TrainConfig(epochs=1, batch_size=50, progress=False, checkpoint_dir=str(tmp_path)))
    with pytest.raises(RuntimeError, match="belongs to another run.*batch_size: 50, 64$"):
        train(build_model("lr", spec), data, None, TrainConfig(epochs=2, batch_size=64, progress=False,
                                                                checkpoint_dir=str(tmp_path), resume=True))
    # another model, or the same with other settings, was a state_dict error from torch (or, with the same
    # weights' shapes, a resumed run of settings it never had); another learning rate was silently replaced
    with pytest.raises(RuntimeError, match="model: 'lr', 'fm'"):
        train(build_model("fm", spec), data, None, TrainConfig(epochs=2, batch_size=50, progress=False,
                                                                checkpoint_dir=str(tmp_path), resume=True))
    with pytest.raises(RuntimeError, match="model settings emb_l2: 1e-05, 0.5$"):
        train(build_model("lr", spec, emb_l2=0.5), data, None,
              TrainConfig(epochs=2, batch_size=50, progress=False, checkpoint_dir=str(tmp_path), resume=True))
    with pytest.raises(RuntimeError, match=r"lr: 0\.001, 0\.01"):
        train(build_model("lr", spec), data, None, TrainConfig(epochs=2, batch_size=50, lr=0.01, progress=False,
                                                                checkpoint_dir=str(tmp_path), resume=True))
    train(build_model("lr", spec), data, None, TrainConfig(epochs=2, batch_size=50, progress=False,
                                                            checkpoint_dir=str(tmp_path), resume=True))
    state = torch.load(tmp_path / "last.pt", weights_only=True)  # as written before the model was compared
    state["config"] = {k: state["config"][k] for k in ("batch_size", "seed", "loss", "optimizer")}
    torch.save(state, tmp_path / "last.pt")
    with pytest.raises(RuntimeError, match="holds another model's weights; --resume continues a run with its own"):
        train(build_model("fm", spec), data, None, TrainConfig(epochs=3, batch_size=50, progress=False,
                                                                checkpoint_dir=str(tmp_path), resume=True))
