"""Knowledge distillation (`--distill`): a model trained on a teacher bundle's probabilities of its training rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctrkit.data.encode import Encoder
from ctrkit.data.synth import make_click_log, split_by_time, synth_schema
from ctrkit.pipeline import Run, distilled, train
from ctrkit.serve.bundle import Bundle
from ctrkit.training.sampling import transfer_rows
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


def test_transfer_rows_follow_the_training_rows_and_take_the_teachers_probabilities(
        teacher: Path, splits: tuple[pl.DataFrame, ...], tmp_path: Path) -> None:
    """With transfer R the training rows keep their targets and R times as many transfer rows follow, each
    targeted at the teacher's probability alone (its model read by hand, not through the training loader)."""
    import torch

    from ctrkit.data.dataset import Batch

    b = Bundle.load(teacher)
    data = b.encoder.transform(splits[0], tmp_path / "enc")
    plain = distilled(data, b, b.encoder, 0.3, 0.7)
    got = distilled(data, b, b.encoder, 0.3, 0.7, transfer=1.5, seed=4)
    n = len(data)
    assert len(got) == n + round(1.5 * n)
    np.testing.assert_array_equal(got.label[:n], plain.label)
    np.testing.assert_array_equal(got.ids[:n], data.ids)
    extra = transfer_rows(data, round(1.5 * n), 0.3, seed=4)
    np.testing.assert_array_equal(got.ids[n:], extra.ids)
    with torch.no_grad():
        z = b.model.eval()(Batch(torch.from_numpy(np.asarray(extra.ids)), torch.from_numpy(np.asarray(extra.dense))))
    want = 1 / (1 + np.exp(-(z.double().numpy() + b.calibrator.shift - 0.3)))
    np.testing.assert_allclose(got.label[n:], want, atol=2e-6)


def test_transfer_rows_that_would_fill_memory_are_refused(teacher: Path, splits: tuple[pl.DataFrame, ...],
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctrkit.pipeline

    b = Bundle.load(teacher)
    data = b.encoder.transform(splits[0], tmp_path / "enc")
    monkeypatch.setattr(ctrkit.pipeline, "available_memory", lambda: 3 * data.nbytes)  # 2x fits, 2x + more not
    assert len(distilled(data, b, b.encoder, 0.0, 1.0, transfer=0.5)) == len(data) + round(0.5 * len(data))
    with pytest.raises(ValueError, match=r"--distill-transfer 2.0: the training rows and 8,000 transfer rows take "
                                         r".* GiB in memory, more than half of the .* GiB available"):
        distilled(data, b, b.encoder, 0.0, 1.0, transfer=2.0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), rows=st.integers(0, 60), swap=st.sampled_from([0.0, 0.3, 1.0]),
       seed=st.integers(0, 99), seqs=st.booleans())
def test_each_transfer_column_comes_from_its_source_row_or_from_another_row(
        n: int, rows: int, swap: float, seed: int, seqs: bool) -> None:
    """Row i of the transfer set is a training row s_i whose every column holds s_i's value or, swapped, the
    same column's value in some training row; swap 0 copies rows whole, and a row's weight and group are its
    source's. A sequence moves with its length. Values are unique per (row, column) so the origin is readable."""
    from ctrkit.data.dataset import EncodedData

    ids = (np.arange(n * 3, dtype=np.int32).reshape(n, 3) * 10)
    dense = np.arange(n * 2, dtype=np.float32).reshape(n, 2) + 0.5
    seq = np.arange(n * 2 * 4, dtype=np.int32).reshape(n, 2, 4) if seqs else None
    seq_len = (np.arange(n * 2, dtype=np.int32).reshape(n, 2) % 5) if seqs else None
    data = EncodedData(ids=ids, dense=dense, label=np.ones(n, np.float32), group=np.arange(n) + 100,
                       weight=np.arange(n, dtype=np.float32) + 1, seq=seq, seq_len=seq_len)
    t = transfer_rows(data, rows, swap, seed)
    assert len(t) == rows and t.ids.dtype == ids.dtype and (t.label == 0).all()
    src = (t.group - 100).astype(int)
    np.testing.assert_array_equal(t.weight, src + 1.0)
    for mine, full in ((t.ids, ids), (t.dense, dense)):
        for c in range(full.shape[1]):
            assert np.isin(mine[:, c], full[:, c]).all()
        if swap == 0.0:
            np.testing.assert_array_equal(mine, full[src])
    if seqs:
        for i in range(rows):
            for f in range(2):
                donor = int(np.flatnonzero((seq[:, f] == t.seq[i, f]).all(axis=1))[0])
                assert t.seq_len[i, f] == seq_len[donor, f]
                assert swap > 0.0 or donor == src[i]
    if swap == 1.0 and rows >= 10 and n > 1:  # every column from a random row: not all from their own
        assert (t.ids != ids[src]).any()


def test_transfer_rows_refuse_bad_settings() -> None:
    from ctrkit.data.dataset import EncodedData

    data = EncodedData(ids=np.zeros((0, 2), np.int32), dense=np.zeros((0, 0), np.float32),
                       label=np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="there are none"):
        transfer_rows(data, 5)
    for rows, swap in ((-1, 0.3), (3, 1.5), (3, -0.1)):
        with pytest.raises(ValueError, match="rows >= 0 and swap in"):
            transfer_rows(data, rows, swap)


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
    rows = len(splits[0])
    assert m["train"]["distill"] == {"teacher": str(teacher), "model": "deepfm x2", "weight": 1.0,
                                     "teacher_test_auc": Bundle.load(teacher).metrics["test"]["auc"],
                                     "transfer_rows": rows, "transfer_swap": 0.3}
    assert m["model"]["members"] == 1 and m["train"]["rows"] == rows  # the log's rows, not the transfer rows
    report = (tmp_path / "student" / "report.html").read_text()
    assert f"<td>distilled from</td><td>{teacher} (deepfm x2, test AUC " in report
    assert f"share of each target 1.0, {rows:,} transfer rows</td>" in report
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
    for transfer in (-1.0, 11.0, float("nan")):
        with pytest.raises(ValueError, match=r"--distill-transfer must be in \[0, 10\]"):
            train(missing, schema=synth_schema(), model="deepfm", distill=teacher, distill_transfer=transfer)
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
