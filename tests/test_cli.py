"""The `ctrkit` command line: the contract users and scripts depend on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from typer.testing import CliRunner

from ctrkit.cli import app
from ctrkit.data.synth import make_click_log, split_by_time
from ctrkit.serve.bundle import Bundle

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train/valid/test CSV files of a small synthetic log."""
    d = tmp_path_factory.mktemp("cli")
    log, _ = make_click_log(n_rows=4000, n_users=200, n_items=100, seed=11)
    tr, va, te = split_by_time(log.drop("p_click"))
    tr.write_csv(d / "train.csv")
    va.write_csv(d / "valid.csv")
    te.write_csv(d / "test.csv")
    te.drop("click").write_parquet(d / "new.parquet")
    return d


@pytest.fixture(scope="module")
def trained(files: Path) -> Path:
    """`ctrkit schema infer` then `ctrkit train`, as the README tells a user to do."""
    res = runner.invoke(app, ["schema", "infer", str(files / "train.csv")])
    assert res.exit_code == 0, res.output
    (files / "schema.yaml").write_text(res.stdout)
    out = files / "run"
    res = runner.invoke(app, ["train", str(files / "train.csv"), "--valid", str(files / "valid.csv"), "--test",
                              str(files / "test.csv"), "--schema", str(files / "schema.yaml"), "--model", "deepfm",
                              "--out", str(out), "--epochs", "2", "--batch-size", "512", "--quiet"])
    assert res.exit_code == 0, res.output
    return out


def test_schema_infer_guesses_roles_and_kinds(files: Path, trained: Path) -> None:
    data = yaml.safe_load((files / "schema.yaml").read_text())
    assert data["label"] == "click" and data["time"] == "timestamp"
    assert data["position"] == "position" and data["group"] == "user_id"
    kinds = {f["name"]: f["kind"] for f in data["fields"]}
    assert kinds["user_id"] == "categorical" and kinds["genre"] == "categorical"
    assert kinds["price"] == "numeric" and "timestamp" not in kinds


def test_schema_infer_explicit_label_and_errors(files: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["schema", "infer", str(files / "train.csv"), "--label", "nope"])
    assert res.exit_code == 2 and "label column 'nope' not found" in res.output
    res = runner.invoke(app, ["schema", "infer", str(tmp_path / "missing.csv")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_train_writes_metrics_contract(trained: Path) -> None:
    m = json.loads((trained / "metrics.json").read_text())
    for key in ("auc", "logloss", "ece", "pred_actual_ratio", "n", "positives"):
        assert key in m["test"] and key in m["valid"]
    for key in ("seconds", "samples_per_s", "epochs"):
        assert key in m["train"]
    assert (trained / "bundle" / "weights.safetensors").exists()


def test_evaluate_json_matches_training_metrics(files: Path, trained: Path) -> None:
    res = runner.invoke(app, ["evaluate", str(trained / "bundle"), str(files / "test.csv"), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    saved = json.loads((trained / "metrics.json").read_text())["test"]
    assert got["auc"] == pytest.approx(saved["auc"], abs=1e-9)
    assert got["n"] == saved["n"] and got["bad_rows"] == 0
    res = runner.invoke(app, ["evaluate", str(trained / "bundle"), str(files / "test.csv")])
    assert res.exit_code == 0 and "logloss" in res.stdout


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_predict_one_row_per_input_in_order(files: Path, trained: Path, suffix: str) -> None:
    out = files / f"scores{suffix}"
    res = runner.invoke(app, ["predict", str(trained / "bundle"), str(files / "new.parquet"), "--out", str(out),
                              "--keep", "user_id"])
    assert res.exit_code == 0, res.output
    scores = pl.read_csv(out) if suffix == ".csv" else pl.read_parquet(out)
    new = pl.read_parquet(files / "new.parquet")
    assert scores.height == new.height
    assert scores["user_id"].to_list() == new["user_id"].to_list()
    expected = Bundle.load(trained / "bundle").predict(new)
    assert np.max(np.abs(scores["pctr"].to_numpy() - expected)) < 1e-6


def test_predict_rejects_bad_output_name(files: Path, trained: Path) -> None:
    res = runner.invoke(app, ["predict", str(trained / "bundle"), str(files / "new.parquet"), "--out",
                              str(files / "x.json")])
    assert res.exit_code == 2 and ".csv or .parquet" in res.output


def test_predict_does_not_write_over_its_input(files: Path, trained: Path, tmp_path: Path) -> None:
    """The scores were written beside the input and renamed over it: the records were gone, 'pctr' in their place."""
    data = tmp_path / "new.parquet"
    shutil.copy(files / "new.parquet", data)
    before = data.read_bytes()
    res = runner.invoke(app, ["predict", str(trained / "bundle"), str(data), "--out", str(data)])
    assert res.exit_code == 2 and "is the file being scored: the scores would replace it" in res.output, res.output
    assert data.read_bytes() == before


def test_train_without_schema_explains(files: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["train", str(files / "train.csv"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "schema is needed" in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
@pytest.mark.parametrize(("option", "said"), [
    (["--compile", "fast"], "compile must be one of ('auto', 'on', 'off', 'max'), got 'fast'"),
    (["--precision", "fp8"], "precision must be one of"), (["--large-batch", "big"], "large_batch must be one of"),
    (["--loss", "hinge"], "loss must be one of"), (["--optimizer", "sgd"], "optimizer must be one of"),
    (["--device", "gpu"], "device must be cpu, cuda or cuda:N, got 'gpu'"),
    (["--device", "cuda"], "torch sees no CUDA device"), (["--epochs", "0"], "epochs and batch_size must be >= 1"),
    (["--set", "nosuch=1"], "unknown model settings ['nosuch']"), (["--embed-dim", "0"], "embed_dim must be >= 1"),
    (["--neg-sample-rate", "2"], "neg_sample_rate must be in (0, 1]"),
    (["--checkpoint-every", "-1"], "checkpoint_every must be >= 0, got -1"),
    (["--pos-weight", "-2"], "pos_weight must be > 0, got -2.0"), (["--seed", "-1"], "seed must be >= 0, got -1"),
    (["--model", "xgboost"], "unknown model 'xgboost'"), (["--batch-size", "0"], "epochs and batch_size must be >= 1"),
    (["--lr", "-1"], "lr must be > 0")])
def test_train_settings_are_checked_before_any_data_is_read(files: Path, trained: Path, tmp_path: Path,
                                                            option: list[str], said: str) -> None:
    """A mistyped setting is named at once, not after the encode of a log that may take minutes: the training file
    here does not exist, and the answer is about the setting (``trained`` wrote the schema)."""
    res = runner.invoke(app, ["train", str(tmp_path / "nowhere.csv"), "--schema", str(files / "schema.yaml"),
                              "--out", str(tmp_path / "o"), *option])
    assert res.exit_code == 2 and said in res.output, res.output
    assert "nowhere.csv" not in res.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--valid", "--test"])
def test_train_refuses_its_training_file_as_valid_or_test(files: Path, trained: Path, tmp_path: Path,
                                                          flag: str) -> None:
    res = runner.invoke(app, ["train", str(files / "train.csv"), "--schema", str(files / "schema.yaml"), flag,
                              str(files / "train.csv"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and f"{flag} " in res.output and "is the training file" in " ".join(res.output.split())
    assert not (tmp_path / "o").exists()


def test_train_into_a_folder_of_other_files_says_so(files: Path, trained: Path, tmp_path: Path) -> None:
    """A run's files land beside what the folder holds; a rerun into its own folder is quiet."""
    (tmp_path / "notes.txt").write_text("mine\n")
    args = ["train", str(files / "train.csv"), "--schema", str(files / "schema.yaml"), "--valid",
            str(files / "valid.csv"), "--model", "lr", "--epochs", "1"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path)])
    said = " ".join(res.output.split())
    assert res.exit_code == 0 and f"warning: --out {tmp_path} holds files that are not a run's (notes.txt)" in said
    assert (tmp_path / "notes.txt").read_text() == "mine\n"
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert res.exit_code == 0 and "holds files that are not a run's" not in res.output


def test_train_refuses_a_valid_file_inside_its_training_folder(files: Path, trained: Path, tmp_path: Path) -> None:
    """A folder given as TRAIN is read whole: a --valid (or --test) file inside it would be trained on too."""
    (tmp_path / "data").mkdir()
    for name in ("train.csv", "valid.csv"):
        (tmp_path / "data" / name).write_bytes((files / name).read_bytes())
    data = tmp_path / "data"
    for flag, given, what in (("--valid", data / "valid.csv", f"shares 1 file(s) with TRAIN {data} (first: "
                                                             f"{data.resolve() / 'valid.csv'})"),
                              ("--test", data, "is the training file"),
                              ("--test", data / "v*.csv", f"shares 1 file(s) with TRAIN {data} (first: ")):
        res = runner.invoke(app, ["train", str(data), "--schema", str(files / "schema.yaml"), flag, str(given),
                                  "--out", str(tmp_path / "o")])
        assert res.exit_code == 2 and f"{flag} {given} {what}" in " ".join(res.output.split()), res.output
    assert not (tmp_path / "o").exists()


def test_train_warns_of_files_and_settings_it_cannot_use_as_asked(files: Path, trained: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["train", str(files / "train.csv"), "--schema", str(files / "schema.yaml"), "--valid",
                              str(files / "valid.csv"), "--test", str(files / "valid.csv"), "--model", "lr",
                              "--epochs", "1", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "warning: --valid and --test are the same file" in " ".join(res.output.split())
    res = runner.invoke(app, ["train", str(files / "train.csv"), "--schema", str(files / "schema.yaml"), "--valid",
                              str(files / "valid.csv"), "--split", "random", "--model", "lr", "--epochs", "1",
                              "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0 and "warning: --split random is not used" in " ".join(res.output.split())
    res = runner.invoke(app, ["train", str(files / "train.csv"), "--schema", str(files / "schema.yaml"), "--valid",
                              str(files / "valid.csv"), "--pos-weight", "5", "--model", "lr", "--epochs", "1",
                              "--out", str(tmp_path / "o3")])
    assert res.exit_code == 0 and "warning: --pos-weight 5.0 is not used" in " ".join(res.output.split())


def test_monitor_writes_only_an_html_report(trained: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["monitor", str(tmp_path / "log"), "--bundle", str(trained / "bundle"), "--out",
                              str(trained / "bundle" / "metrics.json")])
    assert res.exit_code == 2 and "must end in .html" in res.output, res.output


def test_calibrate_does_not_write_over_its_own_bundle(trained: Path, tmp_path: Path) -> None:
    before = (trained / "bundle" / "manifest.json").read_bytes()
    res = runner.invoke(app, ["calibrate", str(trained / "bundle"), str(tmp_path / "nowhere.csv"), "--out",
                              str(trained / "bundle")])
    assert res.exit_code == 2 and "is the bundle itself: write the new version to a folder of its own" in res.output
    assert (trained / "bundle" / "manifest.json").read_bytes() == before


def test_calibrate_names_a_bad_method_before_reading_the_data(trained: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["calibrate", str(trained / "bundle"), str(tmp_path / "nowhere.csv"), "--method", "beta",
                              "--out", str(tmp_path / "cal")])
    assert res.exit_code == 2 and "--method must be one of" in res.output and "'beta'" in res.output, res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
@pytest.mark.parametrize(("option", "said"), [
    (["--max-batch", "0"], "--max-batch must be at least 1, got 0"), (["--threads", "0"], "--threads must be at"),
    (["--workers", "0"], "--workers must be at least 1"), (["--watch", "-1"], "--watch must be 0 (off) or"),
    (["--device", "cudaa"], "device must be cpu, cuda or cuda:N, got 'cudaa'"),
    (["--device", "cuda"], "torch sees no CUDA device"), (["--port", "70000"], "less than or equal to 65535")])
def test_serve_settings_are_checked_before_the_bundle_loads(tmp_path: Path, option: list[str], said: str) -> None:
    """A server setting that cannot work is named before anything loads or binds: the bundle here does not exist,
    and the answer is about the setting, not a traceback from torch or a server that takes no request."""
    res = runner.invoke(app, ["serve", str(tmp_path / "nobundle"), *option])
    assert res.exit_code == 2 and said in res.output, res.output
    assert "nobundle" not in res.output and "Traceback" not in res.output


def test_train_libfm_with_fields_and_no_valid(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(3000):
        a, b, c = rng.integers(0, 5), rng.integers(5, 15), rng.integers(15, 20)
        y = 1 if (a + b) % 3 == 0 else -1
        lines.append(f"{y} {a}:1 {b}:1 {c}:1\r")
    path = tmp_path / "toy.libfm"
    path.write_text("\n".join(lines) + "\n")
    res = runner.invoke(app, ["train", str(path), "--format", "libfm", "--fields", "a,b,c", "--model", "fm",
                              "--out", str(tmp_path / "run"), "--epochs", "3", "--quiet", "--large-batch",
                              "cowclip", "--compile", "off"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["valid"]["n"] + m["train"]["rows"] == 3000 and "test" not in m
    assert m["valid"]["auc"] > 0.6
    assert m["train"]["config"]["large_batch"] == "cowclip" and m["train"]["config"]["compile"] == "off"


def test_models_command_lists_the_zoo_a_line_each_and_a_models_defaults_by_name() -> None:
    """``ctrkit models``: every model with the first sentence of its shipped settings' comment; ``models NAME``
    (any case): each default setting; ``--json``: the same defaults for machines; an unknown name: one line."""
    import ctrkit.models  # noqa: F401
    from ctrkit.models.base import default_config, model_names, model_summary

    def rows(args: list[str]) -> dict[str, str]:
        res = runner.invoke(app, args, env={"COLUMNS": "400"})  # wide enough that no cell wraps
        assert res.exit_code == 0, res.output
        cells = [line.split("│") for line in res.stdout.splitlines() if line.count("│") == 3]
        return {c[1].strip(): c[2].strip() for c in cells}

    assert rows(["models"]) == {name: model_summary(name) for name in model_names()}
    assert model_summary("deepfm") == ("DeepFM: FM and an MLP over one shared table; fm / deep switch a branch off "
                                       "for ablations.")
    assert model_summary("lr").startswith("Logistic regression: the first-order term alone")

    deepfm = rows(["models", "DeepFM"])
    assert deepfm["embed_dim"] == "16" and deepfm["hidden"] == "[400, 400]" and deepfm["optimizer"] == "adam"
    assert deepfm["emb_l2"].startswith("0.05 on the whole table") and deepfm["fm"] == "true"

    res = runner.invoke(app, ["models", "--json"])
    doc = json.loads(res.stdout)
    assert sorted(doc) == model_names()
    assert doc["din"]["emb_l2"] == default_config("din").emb_l2 == 1e-3 and doc["din"]["hidden"] == [200, 80]
    assert json.loads(runner.invoke(app, ["models", "din", "--json"]).stdout) == doc["din"]

    res = runner.invoke(app, ["models", "nope"])
    assert res.exit_code == 2 and "unknown model 'nope'" in res.output and "deepfm" in res.output


def test_measure_is_mounted() -> None:
    res = runner.invoke(app, ["measure", "--help"])
    assert res.exit_code == 0 and "ctr" in res.stdout


@pytest.mark.parametrize("args", [["monitor", "{d}/no-log", "--bundle", "{d}/no-bundle", "--out", "{d}/m.html"],
                                  ["retrain", "--events", "{d}/no-log", "--base", "{d}/no-bundle",
                                   "--out", "{d}/new"],
                                  ["export", "{d}/no-bundle", "--onnx", "--out", "{d}/x"]])
def test_serving_commands_answer_a_missing_input_with_one_line(tmp_path: Path, args: list[str]) -> None:
    res = runner.invoke(app, [a.format(d=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    assert "error:" in res.output and "no-" in res.output
