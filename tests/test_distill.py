"""Knowledge distillation (`--distill`): a model trained on a teacher bundle's probabilities of its training rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ctrkit.data.encode import Encoder
from ctrkit.data.synth import make_click_log, split_by_time, synth_schema
from ctrkit.pipeline import Run, distilled, train
from ctrkit.serve.bundle import Bundle
from ctrkit.validate import DataError


@pytest.fixture(scope="module")
def splits() -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    log, _ = make_click_log(n_rows=5000, n_users=200, n_items=150, seed=11)
    return split_by_time(log.drop("p_click"))


def fit(splits: tuple[pl.DataFrame, ...], out: Path | None, seed: int = 0, **kw: object) -> Run:
    """DeepFM with an explicit L2, so that no run starts from (and keeps) the exact first-order fit of a small log."""
    tr, va, te = splits
    return train(tr, schema=synth_schema(), valid=va, test=te, model="deepfm", out=out, epochs=3,
                 batch_size=512, seed=seed, calibrate="none", progress=False,
                 model_options={"emb_l2": 1e-4}, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def teacher(splits: tuple[pl.DataFrame, ...], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ensemble of two DeepFMs: the usual teacher."""
    out = tmp_path_factory.mktemp("teacher")
    fit(splits, out, ensemble=2)
    return out / "bundle"


def logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


@pytest.mark.parametrize("shift,weight", [(0.0, 1.0), (math.log(0.25), 0.7)])
def test_targets_are_the_teachers_probabilities_in_the_runs_odds(teacher: Path, splits: tuple[pl.DataFrame, ...],
                                                                 tmp_path: Path, shift: float, weight: float) -> None:
    """(1 - w) * label + w * sigmoid(teacher's served log-odds - the run's shift), the teacher's served
    probabilities taken from raw records through its own bundle (an independent path)."""
    b = Bundle.load(teacher)
    train_rows = splits[0]
    data = b.encoder.transform(train_rows, tmp_path / "enc")
    got = np.asarray(distilled(data, b, b.encoder, shift, weight).label, dtype=np.float64)
    served = b.predict(train_rows)  # calibrate="none": sigmoid(raw logit + the teacher's shift)
    want = (1 - weight) * train_rows["click"].to_numpy() + weight / (1 + np.exp(-(logit(served) - shift)))
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert not np.isin(got, (0.0, 1.0)).all()  # soft targets, not the labels


def test_a_student_learns_the_teacher(teacher: Path, splits: tuple[pl.DataFrame, ...],
                                      tmp_path: Path) -> None:
    """The distilled model sits nearer the teacher than the same model, seed and data without it, and its run
    says what it was distilled from; its bundle reloads and scores raw records the same."""
    student = fit(splits, tmp_path / "student", seed=5, distill=teacher)
    plain = fit(splits, None, seed=5)
    test = splits[2]
    t = logit(Bundle.load(teacher).predict(test))
    gap = lambda run: float(np.mean(np.abs(logit(run.bundle.predict(test)) - t)))  # noqa: E731
    assert gap(student) < 0.8 * gap(plain)
    m = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert m["train"]["distill"] == {"teacher": str(teacher), "model": "deepfm x2", "weight": 1.0,
                                     "teacher_test_auc": Bundle.load(teacher).metrics["test"]["auc"]}
    assert m["model"]["members"] == 1
    report = (tmp_path / "student" / "report.html").read_text()
    assert f"<td>distilled from</td><td>{teacher} (deepfm x2, test AUC " in report
    loaded = Bundle.load(tmp_path / "student" / "bundle")
    np.testing.assert_allclose(loaded.predict(test.head(50).to_dicts()), student.bundle.predict(test.head(50)),
                               atol=1e-6)


def test_a_student_of_any_seed_encodes_as_its_teacher(splits: tuple[pl.DataFrame, ...], tmp_path: Path) -> None:
    """Without --valid the validation rows are cut at random by the seed, and so is the vocabulary: a student
    with a seed of its own still reads its teacher's ids, since it encodes with the teacher's seed."""
    tr = pl.concat(splits[:2])
    kw = dict(schema=synth_schema(), model="deepfm", epochs=1, batch_size=512, split="random", progress=False,
              calibrate="none", model_options={"emb_l2": 1e-4})
    train(tr, out=tmp_path / "t", seed=1, **kw)  # type: ignore[arg-type]
    own = train(tr, out=None, seed=8, **kw)  # type: ignore[arg-type]
    assert Bundle.load(tmp_path / "t" / "bundle").encoder.difference(own.bundle.encoder) is not None
    student = train(tr, out=None, seed=8, distill=tmp_path / "t" / "bundle", **kw)  # type: ignore[arg-type]
    assert student.bundle.encoder.difference(Bundle.load(tmp_path / "t" / "bundle").encoder) is None
    assert student.metrics["train"]["config"]["seed"] == 8


def test_a_teacher_of_other_rows_is_refused(teacher: Path, splits: tuple[pl.DataFrame, ...],
                                                    tmp_path: Path) -> None:
    tr, va, te = splits
    with pytest.raises(DataError, match=r"teacher's encoding is not this run's \(the ids of 'user_id' differ"):
        train(tr.head(3000), schema=synth_schema(), valid=va, model="deepfm", out=None, epochs=1, progress=False,
              distill=teacher)
    assert not (tmp_path / "x").exists()


def test_bad_distill_settings_fail_before_any_data_is_read(teacher: Path, splits: tuple[pl.DataFrame, ...],
                                                           tmp_path: Path) -> None:
    missing = tmp_path / "no-such-data.csv"  # never read: the settings fail first
    for weight in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"--distill-weight must be in \(0, 1\]"):
            train(missing, schema=synth_schema(), model="deepfm", distill=teacher, distill_weight=weight)
    with pytest.raises(ValueError, match="no-such-bundle"):
        train(missing, schema=synth_schema(), model="deepfm", distill=tmp_path / "no-such-bundle")


def test_a_log_of_several_labels_is_refused(teacher: Path, splits: tuple[pl.DataFrame, ...]) -> None:
    """A one-head teacher's probability is a click's; a log of clicks and conversions is not distilled from it."""
    sch = synth_schema()
    sch.labels = ["click", "conversion"]
    tr, va = (d.with_columns(conversion=pl.col("click") * (pl.col("price") > 0)) for d in splits[:2])
    with pytest.raises(ValueError, match="--distill apply to logs with one label"):
        train(tr, schema=sch, valid=va, model="esmm", epochs=1, progress=False, distill=teacher)


def test_encoder_difference_names_what_differs(splits: tuple[pl.DataFrame, ...]) -> None:
    tr = splits[0]
    a = Encoder(synth_schema()).fit(tr)
    assert a.difference(Encoder(synth_schema()).fit(tr)) is None
    fewer = Encoder(synth_schema()).fit(tr.head(2000))
    assert a.difference(fewer) == f"the ids of 'user_id' differ: {a.sizes['user_id']:,} here, " \
        f"{fewer.sizes['user_id']:,} in the other"
    renamed = Encoder(synth_schema()).fit(tr.with_columns(pl.col("device").replace({"mobile": "phone"})))
    assert a.difference(renamed) == "the vocabulary of 'device' differs"  # as many ids, other values
    scaled = Encoder(synth_schema()).fit(tr.with_columns(pl.col("price") * 2))
    assert a.difference(scaled) == "the numeric fields' scaling differs"
    other = synth_schema()
    other.fields = other.fields[:-1]
    assert a.difference(Encoder(other).fit(tr)) == "the schemas differ"


def test_a_distilled_run_resumes_only_with_its_own_teacher(teacher: Path, splits: tuple[pl.DataFrame, ...],
                                                           tmp_path: Path) -> None:
    """The checkpoint names the training targets (a digest): the same rows and settings learning another
    teacher's probabilities are another run, and --resume says so; its own teacher resumes."""
    other = tmp_path / "other"
    fit(splits, other, seed=9)  # one DeepFM: other probabilities of the same rows
    student = tmp_path / "student"
    fit(splits, student, seed=4, distill=teacher)
    with pytest.raises(RuntimeError, match=r"belongs to another run.*training targets \(digest\)"):
        fit(splits, student, seed=4, distill=other / "bundle", resume=True)
    fit(splits, student, seed=4, distill=teacher, resume=True)
