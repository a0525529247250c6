"""ctrkit tune: trials on one encode, compared on the validation rows only; the best trained again into a bundle."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ctrkit.pipeline
from ctrkit.cli import app
from ctrkit.data.synth import make_click_log, write_splits
from ctrkit.tune import Param, default_space, load_space, tune

SPACE = [Param("lr", 1e-3, 3e-2, log=True), Param("embed_dim", choices=[4, 8])]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tune")
    return write_splits(make_click_log(n_rows=4000, n_users=300, n_items=80, seed=11)[0], d)


def _tune(files: Path, **kw: object):  # type: ignore[no-untyped-def]
    args = {"schema": files / "schema.yaml", "valid": files / "valid.csv", "model": "fm", "trials": 3, "epochs": 2,
            "space": SPACE, **kw}
    return tune(files / "train.csv", **args)  # type: ignore[arg-type]


def test_the_best_trial_is_trained_again_and_the_test_rows_choose_nothing(files: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def no_encode(*args: object, **kwargs: object) -> None:
        raise AssertionError("a trial encoded the data again")

    monkeypatch.setattr(ctrkit.pipeline, "encode_files", no_encode)  # every trial reuses tune's one encode
    result = _tune(files, test=files / "test.csv", out=tmp_path / "run")
    aucs = [t["auc"] for t in result.trials]
    assert len(aucs) == 3 and result.best["auc"] == max(aucs)
    assert result.trials[0]["params"] == {}  # the first trial: the adaptive defaults
    assert all(set(t["params"]) == {"lr", "embed_dim"} and t["params"]["embed_dim"] in (4, 8)
               for t in result.trials[1:])
    assert result.best["params"] == result.trials[aucs.index(max(aucs))]["params"]
    final = result.run.metrics  # type: ignore[union-attr]
    assert final["valid"]["auc_raw"] == pytest.approx(result.best["auc"], abs=1e-12)  # the same model, seeded
    assert "test" in final and final["model"]["config"]["embed_dim"] == result.best["params"].get(
        "embed_dim", final["model"]["config"]["embed_dim"])
    doc = json.loads((tmp_path / "run" / "tune.json").read_text())
    assert doc["best"] == json.loads(json.dumps(result.best)) and len(doc["trials"]) == 3
    assert doc["final"]["test"]["auc"] == pytest.approx(final["test"]["auc"])
    assert (tmp_path / "run" / "bundle" / "manifest.json").exists() and (tmp_path / "run" / "report.html").exists()
    blind = _tune(files)  # no test file at all: the same trials, the same choice
    assert [t["auc"] for t in blind.trials] == aucs and blind.best == result.best


def test_logloss_is_minimised(files: Path) -> None:
    result = _tune(files, metric="logloss", trials=2)
    assert result.best["logloss"] == min(t["logloss"] for t in result.trials)


def test_spaces_from_yaml_and_their_mistakes(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("lr: {low: 0.0001, high: 0.01, log: true}\nembed_dim: [8, 16]\nhidden_layers: {low: 1, high: 3}\n")
    got = load_space(path)
    assert [(p.name, p.low, p.high, p.log, p.choices) for p in got] == [
        ("lr", 0.0001, 0.01, True, None), ("embed_dim", None, None, False, [8, 16]),
        ("hidden_layers", 1, 3, False, None)]
    for text, said in (("lr: {low: 1, high: 1}", "needs low < high"), ("lr: {low: 0, high: 1, log: true}",
                                                                        "a log scale needs low > 0"),
                       ("lr: []", "non-empty list of choices"), ("lr: 3", "expected a list of choices"),
                       ("- lr", "a mapping of names"), ("lr: {low: 1, high: 2, step: 1}", "expected a list")):
        path.write_text(text)
        with pytest.raises(ValueError, match=said):
            load_space(path)
    assert [p.name for p in default_space("deepfm")] == ["lr", "embed_dim", "emb_l2", "dropout"]
    assert [p.name for p in default_space("fm")] == ["lr", "embed_dim", "emb_l2"]
    assert [p.name for p in default_space("lr")] == ["lr", "emb_l2"]


def test_settings_are_checked_before_the_data_is_read(files: Path, tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere.csv"
    for kwargs, said in (({"space": [Param("depth", 1, 3)]}, "depth"), ({"metric": "gauc"}, "--metric must be one"),
                         ({"trials": 0}, "--trials must be >= 1"), ({"timeout": 0}, "--timeout must be > 0"),
                         ({"space": SPACE + [Param("lr", choices=[0.1])]}, "names a setting twice"),
                         ({"lr": 0.1}, "both fixed and searched")):
        with pytest.raises(ValueError, match=said):
            tune(nowhere, schema=files / "schema.yaml", model="fm", **{"space": SPACE, **kwargs})  # type: ignore[arg-type]


def test_a_missing_optuna_is_named(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ImportError, match=r"pip install 'ctrkit\[tune\]'"):
        _tune(files)


def test_cli(files: Path, tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text("lr: {low: 0.001, high: 0.03, log: true}\n")
    res = CliRunner().invoke(app, ["tune", str(files / "train.csv"), "--valid", str(files / "valid.csv"), "--test",
                                   str(files / "test.csv"), "--schema", str(files / "schema.yaml"), "--model", "fm",
                                   "--trials", "2", "--epochs", "1", "--space", str(tmp_path / "space.yaml"),
                                   "--out", str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "fm: 2 trials, validation auc (best first)" in said and "fm, best settings" in said
    assert len(json.loads((tmp_path / "run" / "tune.json").read_text())["trials"]) == 2
    res = CliRunner().invoke(app, ["tune", str(files / "train.csv"), "--valid", str(files / "valid.csv"), "--schema",
                                   str(files / "schema.yaml"), "--model", "fm", "--trials", "1", "--epochs", "1",
                                   "--storage", str(tmp_path / "t.db"), "--study", "mine", "--out",
                                   str(tmp_path / "r2")])
    assert res.exit_code == 0, res.output
    again = CliRunner().invoke(app, ["tune", str(files / "train.csv"), "--valid", str(files / "valid.csv"), "--schema",
                                     str(files / "schema.yaml"), "--model", "fm", "--trials", "1", "--epochs", "1",
                                     "--storage", str(tmp_path / "t.db"), "--study", "mine", "--out",
                                     str(tmp_path / "r3")])
    assert again.exit_code == 0 and "1 trials of study 'mine' found" in " ".join(again.output.split())
    res = CliRunner().invoke(app, ["tune", str(files / "train.csv"), "--schema", str(files / "schema.yaml"),
                                   "--metric", "gauc", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--metric must be one of ('auc', 'logloss'), got 'gauc'" in res.output


def test_a_trial_behind_the_others_is_pruned(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a pruner that stops every trial at its first epoch, every trial after the defaults is recorded as
    pruned, and the defaults are chosen."""
    import optuna

    monkeypatch.setattr(optuna.pruners, "MedianPruner",
                        lambda **kw: optuna.pruners.ThresholdPruner(lower=1.1, n_warmup_steps=0))
    result = _tune(files, trials=3)
    assert [t.get("pruned", False) for t in result.trials] == [False, True, True]
    assert result.best["params"] == {} and result.run is not None


def test_the_default_space_leaves_a_small_logs_l2_to_its_first_order_fit(files: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """On a log small enough for the exact first-order fit, a searched L2 would switch that fit off; the fit
    depends on the rows alone, so three trials and the final run make it once."""
    calls = []
    fit = ctrkit.pipeline.fit_first_order
    monkeypatch.setattr(ctrkit.pipeline, "fit_first_order", lambda *a, **k: calls.append(1) or fit(*a, **k))
    result = _tune(files, trials=3, space=None, model="deepfm", epochs=1)
    assert len(calls) == 1
    assert [p.name for p in result.space] == ["lr", "embed_dim", "dropout"]
    assert result.run.metrics["train"]["auto"]["first_order"]  # type: ignore[union-attr]
    assert [p.name for p in _tune(files, trials=1, space=None, model="fm", epochs=1).space] == [
        "lr", "embed_dim", "emb_l2"]  # FM's batch L2 leaves no first-order fit to the pipeline


def test_pipeline_hands_each_epoch_to_on_epoch_and_stops_when_it_raises(files: Path) -> None:
    seen: list[dict] = []

    def stop_at_two(record: dict) -> None:
        seen.append(record)
        if record["epoch"] == 2:
            raise KeyboardInterrupt("enough")

    with pytest.raises(KeyboardInterrupt, match="enough"):
        ctrkit.pipeline.train(files / "train.csv", schema=files / "schema.yaml", valid=files / "valid.csv",
                              model="fm", epochs=5, progress=False, on_epoch=stop_at_two)
    assert [r["epoch"] for r in seen] == [1, 2] and all("auc" in r["valid"] for r in seen)


def test_a_stored_study_goes_on_where_it_stopped(files: Path, tmp_path: Path) -> None:
    db = tmp_path / "studies" / "tune.db"
    first = _tune(files, trials=3, storage=db)
    lines: list[str] = []
    more = _tune(files, trials=5, storage=db, log=lines.append)
    assert [t["auc"] for t in more.trials[:3]] == [t["auc"] for t in first.trials]  # kept, not trained again
    assert [t["params"] for t in more.trials[:3]] == [t["params"] for t in first.trials]
    assert len(more.trials) == 5 and more.trials[0]["params"] == {}
    assert sum(line.startswith("trial ") for line in lines) == 2  # only the two missing trials ran
    assert any("3 trials of study 'ctrkit-fm-auc' found" in line for line in lines)
    assert all(t["params"] not in [u["params"] for u in more.trials[:3]] for t in more.trials[3:])
    assert more.best["auc"] == max(t["auc"] for t in more.trials)
    done = _tune(files, trials=4, storage=db, log=lines.append)  # nothing left to run: the best is retrained
    assert len(done.trials) == 5
    with pytest.raises(ValueError, match=r"belongs to another search \(space differ\)"):
        _tune(files, trials=6, storage=db, space=SPACE[:1])
    with pytest.raises(ValueError, match=r"belongs to another search \(encoder, rows differ\)"):
        _tune(files, trials=6, storage=db, valid=None)
