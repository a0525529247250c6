"""Trainer: exact repeats, early stopping with restore-best, lr decay, predictions, and FM beating LR."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctrkit.data.dataset import Batch
from ctrkit.data.dataset import EncodedData
from ctrkit.data.encode import encode_files
from ctrkit.data.synth import make_click_log, split_by_time, synth_schema
from ctrkit.evaluate.metrics import auc, evaluate
from ctrkit.models import build_model
from ctrkit.nn.embedding import FeatureSpec
import ctrkit.training.trainer as trainer_module
from ctrkit.training.trainer import BF16_MIN_ROWS, TrainConfig, predict_proba, resolve_precision, train

SIZES = (30, 20, 6)
SPEC = FeatureSpec(n_ids=sum(SIZES), field_sizes=SIZES, sparse_names=("a", "b", "c"), dense_names=("x", "z"))


def planted_data(n: int, seed: int, noise_ids: int = 0) -> EncodedData:
    """Rows of a logistic model with per-id effects, an a-by-c interaction and a numeric effect."""
    rng = np.random.default_rng(seed)
    effects = np.random.default_rng(99).normal(0, 1, SPEC.n_ids)
    inter = np.random.default_rng(98).normal(0, 1.5, (SIZES[0], SIZES[2]))
    local = np.stack([rng.integers(0, s, n) for s in SIZES], axis=1)
    offsets = np.cumsum((0,) + SIZES[:-1])
    ids = (local + offsets).astype(np.int32)
    dense = rng.normal(0, 1, (n, 2)).astype(np.float32)
    dense[rng.random((n, 2)) < 0.05] = np.nan
    logit = effects[ids].sum(axis=1) + inter[local[:, 0], local[:, 2]] + 0.8 * np.nan_to_num(dense[:, 0]) - 1.0
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    if noise_ids:
        label[:noise_ids] = rng.random(noise_ids) < 0.5
    return EncodedData(ids=ids, dense=dense, label=label)


def quiet(**kwargs: object) -> TrainConfig:
    """A small, silent training configuration."""
    base: dict[str, object] = {"epochs": 4, "batch_size": 256, "lr": 1e-2, "progress": False}
    return TrainConfig(**{**base, **kwargs})  # type: ignore[arg-type]


def fresh(name: str = "fm", seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A model built under a fixed torch seed."""
    torch.manual_seed(seed)
    return build_model(name, SPEC, **{"embed_dim": 4, "hidden": (16,), **overrides})


def strip_timing(history: list[dict]) -> list[dict]:
    """History records without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in ("train_seconds", "samples_per_s")} for r in history]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> object:
    """One intra-op thread: these models are tiny, and two workers on two shared cores must not oversubscribe."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> tuple[EncodedData, EncodedData]:
    return planted_data(4000, seed=1), planted_data(1500, seed=2)


@pytest.mark.parametrize("name, overrides", [("fm", {}), ("deepfm", {"dropout": 0.3}),
                                             ("fm", {"sparse_grad": True})])
def test_seeded_runs_repeat_exactly(data: tuple[EncodedData, EncodedData], name: str, overrides: dict) -> None:
    tr, va = data
    runs = []
    for _ in range(2):
        model = fresh(name, **overrides)
        result = train(model, tr, va, quiet(epochs=2, seed=5))
        runs.append((model, result))
    (m1, r1), (m2, r2) = runs
    assert strip_timing(r1.history) == strip_timing(r2.history)
    for (k1, v1), (k2, v2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    other = fresh(name, **overrides)
    train(other, tr, va, quiet(epochs=2, seed=6))
    assert not torch.equal(other.embedding.table.weight, m1.embedding.table.weight)


@pytest.mark.parametrize("optimizer, sparse", [("adam", False), ("adam", True), ("adagrad", False),
                                               ("adagrad", True)])
def test_every_optimizer_path_learns(data: tuple[EncodedData, EncodedData], optimizer: str, sparse: bool) -> None:
    tr, va = data
    model = fresh("fm", sparse_grad=sparse)
    result = train(model, tr, va, quiet(epochs=3, optimizer=optimizer, lr=0.05))
    assert result.best_valid["auc"] > 0.75
    assert model.embedding.table.weight.grad is None or model.embedding.table.weight.grad.is_sparse == sparse


def test_early_stopping_restores_the_best_epoch(data: tuple[EncodedData, EncodedData]) -> None:
    tr = planted_data(1500, seed=3, noise_ids=700)
    _, va = data
    model = fresh("fm", emb_l2=0.0, embed_dim=8)
    seen: list[dict] = []
    result = train(model, tr, va, quiet(epochs=30, patience=3, lr=0.05, lr_decay=1.0, batch_size=128),
                   on_epoch=seen.append)
    aucs = [r["valid"]["auc"] for r in result.history]
    assert seen == result.history
    best = int(np.argmax(aucs)) + 1
    assert result.best_epoch == best
    assert result.epochs == best + 3 < 30
    assert result.best_valid["auc"] == aucs[best - 1] > aucs[-1]
    assert not model.training
    restored = auc(va.label, predict_proba(model, va))
    assert restored == aucs[best - 1]

    last = fresh("fm", emb_l2=0.0, embed_dim=8)
    train(last, tr, va, quiet(epochs=30, patience=3, lr=0.05, lr_decay=1.0, batch_size=128, restore_best=False))
    assert auc(va.label, predict_proba(last, va)) == aucs[-1]


def test_min_delta_counts_only_gains_above_it(data: tuple[EncodedData, EncodedData]) -> None:
    tr = planted_data(1500, seed=3, noise_ids=700)
    _, va = data
    delta = 0.002
    result = train(fresh("fm", emb_l2=0.0, embed_dim=8), tr, va,
                   quiet(epochs=30, patience=2, lr=0.05, lr_decay=1.0, batch_size=128, min_delta=delta))
    aucs = [r["valid"]["auc"] for r in result.history]
    best, best_epoch, bad = -1.0, 0, 0  # the rule replayed on the run's own validation AUCs
    for epoch, a in enumerate(aucs, start=1):
        if a > best + delta:
            best, best_epoch, bad = a, epoch, 0
        else:
            bad += 1
        if bad == 2:
            break
    assert result.epochs == epoch < 30
    assert result.best_epoch == best_epoch
    assert result.best_valid["auc"] == best
    never = train(fresh("fm", emb_l2=0.0, embed_dim=8), tr, va,
                  quiet(epochs=30, patience=2, lr=0.05, lr_decay=1.0, batch_size=128, min_delta=1.0))
    assert (never.epochs, never.best_epoch) == (3, 1)  # no AUC can gain 1.0: the first epoch stays the best


def test_default_scoring_blocks_give_the_same_logits(data: tuple[EncodedData, EncodedData]) -> None:
    _, va = data
    model = fresh("deepfm", embed_dim=8)
    small = trainer_module.predict_logits(model, va, batch_size=7)  # many blocks, the last one short
    assert np.allclose(trainer_module.predict_logits(model, va), small, rtol=0, atol=1e-5)
    assert np.allclose(trainer_module.predict_logits(model, va, batch_size=len(va)), small, rtol=0, atol=1e-5)


def test_lr_decays_on_plateau(data: tuple[EncodedData, EncodedData]) -> None:
    tr = planted_data(1500, seed=3, noise_ids=700)
    _, va = data
    result = train(fresh("fm", emb_l2=0.0), tr, va,
                   quiet(epochs=12, patience=4, lr=0.05, lr_decay=0.5, min_lr=0.01, batch_size=128))
    best = -1.0
    decays = 0
    for rec, nxt in zip(result.history, result.history[1:]):
        improved = rec["valid"]["auc"] > best
        best = max(best, rec["valid"]["auc"])
        if improved or rec["lr"] == 0.01:
            assert nxt["lr"] == rec["lr"]
        else:
            assert nxt["lr"] == max(rec["lr"] * 0.5, 0.01)
            decays += 1
    assert result.history[0]["lr"] == 0.05
    assert decays >= 1


def test_monitor_logloss_and_no_validation(data: tuple[EncodedData, EncodedData]) -> None:
    tr, va = data
    result = train(fresh("lr"), tr, va, quiet(epochs=3, monitor="logloss"))
    losses = [r["valid"]["logloss"] for r in result.history]
    assert result.best_valid["logloss"] == min(losses)
    plain = train(fresh("lr"), tr, None, quiet(epochs=2))
    assert plain.epochs == plain.best_epoch == 2
    assert all("valid" not in r for r in plain.history)
    assert plain.samples == 2 * len(tr) and plain.samples_per_s > 0
    assert set(plain.to_dict()) >= {"seconds", "samples_per_s", "epochs", "best_epoch", "history"}
    empty = train(fresh("lr"), tr, va.take(np.arange(0)), quiet(epochs=2))
    assert empty.epochs == empty.best_epoch == 2 and all("valid" not in r for r in empty.history)


def test_predict_proba_keeps_row_order_and_length(data: tuple[EncodedData, EncodedData]) -> None:
    tr, va = data
    model = fresh("deepfm")
    train(model, tr, None, quiet(epochs=1))
    rows = va.take(np.arange(1003))
    model.train()
    p = predict_proba(model, rows, batch_size=100)
    assert model.training
    assert p.shape == (1003,) and p.dtype == np.float64
    model.eval()
    with torch.no_grad():
        want = torch.sigmoid(model(Batch(torch.from_numpy(rows.ids), torch.from_numpy(rows.dense)))).double().numpy()
    np.testing.assert_allclose(p, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(predict_proba(model, rows.take(np.arange(1002, -1, -1)), batch_size=7), p[::-1],
                               rtol=0, atol=1e-6)
    assert len(predict_proba(model, rows.take(np.arange(0)))) == 0


@pytest.mark.parametrize("kwargs, match", [({"optimizer": "sgd"}, "optimizer"), ({"epochs": 0}, "epochs"),
                                           ({"batch_size": 0}, "batch_size"), ({"lr": 0.0}, "lr"),
                                           ({"monitor": "accuracy"}, "monitor"), ({"lr_decay": 0.0}, "lr_decay"),
                                           ({"lr_decay": 1.5}, "lr_decay"), ({"patience": 0}, "patience"),
                                           ({"weight_decay": -1.0}, "weight_decay"), ({"min_lr": -1.0}, "min_lr"),
                                           ({"min_delta": -0.1}, "min_delta"),
                                           ({"eval_batch_size": 0}, "eval_batch_size"),
                                           ({"max_seconds": 0.0}, "max_seconds")])
def test_train_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_train_config_checks_the_device() -> None:
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N, got 'gpu'"):
        TrainConfig(device="gpu")


def synthetic_auc_margin(seed: int, tmp_path: object) -> tuple[float, float]:
    """Test AUC of LR and FM trained on an encoded synthetic click log (time split 80/10/10)."""
    df, _ = make_click_log(n_rows=40_000, n_users=4_000, n_items=1_000, seed=seed)
    train_df, valid_df, test_df = split_by_time(df)
    enc = encode_files(synth_schema(), train_df, tmp_path, valid=valid_df, test=test_df)
    spec = FeatureSpec.from_encoder(enc.encoder)
    test = enc.data["test"]
    out = []
    for name, overrides in (("lr", {}), ("fm", {"emb_l2": 1e-3, "emb_l2_scope": "table"})):
        torch.manual_seed(seed)
        model = build_model(name, spec, **overrides)
        train(model, enc.data["train"], enc.data["valid"],
              TrainConfig(epochs=12, batch_size=1024, lr=1e-2, patience=2, seed=seed, progress=False))
        out.append(evaluate(np.asarray(test.label), predict_proba(model, test))["auc"])
    return out[0], out[1]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 2])
def test_fm_beats_lr_on_the_planted_xor_interaction(seed: int, tmp_path: object) -> None:
    lr_auc, fm_auc = synthetic_auc_margin(seed, tmp_path)
    assert lr_auc > 0.65
    assert fm_auc - lr_auc >= 0.05, (lr_auc, fm_auc)


def test_a_fitted_start_is_kept_when_no_epoch_beats_it() -> None:
    from ctrkit.training.first_order import fit_first_order, load_first_order

    tr, va = planted_data(3000, 1), planted_data(1000, 2)
    m = fresh("lr")
    load_first_order(m, fit_first_order(SPEC, tr, seed=0).state)
    start = {k: v.clone() for k, v in m.state_dict().items()}
    before = evaluate(np.asarray(va.label), predict_proba(m, va))
    # a learning rate far too high: every epoch is worse than the exact fit, which must come back
    res = train(m, tr, va, quiet(epochs=3, patience=2, lr=5.0, validate_start=True, init_bias=False))
    assert res.best_epoch == 0 and res.history[0]["epoch"] == 0
    assert res.history[0]["valid"]["auc"] == pytest.approx(before["auc"], abs=1e-9)
    assert all(torch.equal(v, start[k]) for k, v in m.state_dict().items())
    # without it the last good epoch is kept, not the start
    m2 = fresh("lr")
    load_first_order(m2, fit_first_order(SPEC, tr, seed=0).state)
    assert train(m2, tr, va, quiet(epochs=3, patience=2, lr=5.0, init_bias=False)).best_epoch >= 1


def test_auto_precision_turns_bf16_on_for_large_logs_on_a_bf16_cpu(monkeypatch: pytest.MonkeyPatch,
                                                                   data: tuple[EncodedData, EncodedData]) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer_module, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", cpu, BF16_MIN_ROWS) == "bf16"
    assert resolve_precision("auto", cpu, BF16_MIN_ROWS - 1) == "fp32"
    assert resolve_precision("auto", cpu) == "bf16"  # size unknown: the hardware decides
    assert resolve_precision("bf16", cpu, 10) == "bf16" and resolve_precision("fp32", cpu, 10**9) == "fp32"
    train_data, valid = data
    assert train(build_model("deepfm", SPEC), train_data, valid, quiet(epochs=1)).precision == "fp32"
    monkeypatch.setattr(trainer_module, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", cpu, 10**9) == "fp32"
