"""ONNX export: the exported graph gives the bundle's probabilities; INT8 is kept only when AUC holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="ONNX export needs the 'onnx' extra: pip install 'ctrkit[onnx]'")
pytest.importorskip("onnxscript", reason="ONNX export needs the 'onnx' extra: pip install 'ctrkit[onnx]'")

from ctrkit.data.synth import make_click_log, split_by_time, synth_schema  # noqa: E402
from ctrkit.pipeline import train  # noqa: E402
from ctrkit.serve.export import encoded_rows, export_bundle, run_session, session  # noqa: E402


def test_onnx_matches_bundle_and_int8_guard(tmp_path: Path) -> None:
    log, _ = make_click_log(n_rows=3000, n_users=100, n_items=80, seed=2)
    tr, va, te = split_by_time(log.drop("p_click"))
    run = train(tr, schema=synth_schema(), valid=va, model="deepfm", out=tmp_path / "m", epochs=1,
                batch_size=512, progress=False)
    bundle_dir = tmp_path / "m" / "bundle"
    res = export_bundle(bundle_dir, tmp_path / "onnx", valid=te)
    ids, dense, y = encoded_rows(run.bundle, te)
    onnx_p = run_session(session(res.fp32), ids, dense)
    assert np.max(np.abs(onnx_p - run.bundle.predict(te))) < 1e-5
    assert res.rows == te.height and res.auc_fp32 is not None and res.auc_int8 is not None
    kept = res.auc_fp32 - res.auc_int8 <= 0.0005
    assert (res.int8 is not None) == kept == (tmp_path / "onnx" / "model.int8.onnx").exists()
    assert res.bf16 == (res.auc_torch - res.auc_bf16 <= 0.0005) and abs(res.auc_torch - res.auc_fp32) < 1e-3
    assert res.bf16_folded == (res.auc_torch - res.auc_bf16_folded <= 0.0005)
    record = json.loads((tmp_path / "onnx" / "onnx.json").read_text())
    assert record["bf16"] == res.bf16 and record["bf16_folded"] == res.bf16_folded
    strict = export_bundle(bundle_dir, tmp_path / "strict", valid=te, max_auc_drop=-1.0)
    assert strict.int8 is None and "INT8 dropped" in strict.decision
    assert not strict.bf16 and "bf16 dropped" in strict.decision
    assert not strict.bf16_folded and "folded bf16 dropped" in strict.decision
    assert not (tmp_path / "strict" / "model.int8.onnx").exists()
    json.dumps(res.to_dict())


def test_an_ensemble_exports_one_graph_that_the_scorer_accepts(tmp_path: Path) -> None:
    """An ensemble bundle exports to one ONNX graph that averages its members, and the scorer may use it."""
    from ctrkit.serve.bundle import Bundle
    from ctrkit.serve.scorer import Scorer

    log, _ = make_click_log(n_rows=3000, n_users=100, n_items=80, seed=2)
    tr, va, te = split_by_time(log.drop("p_click"))
    run = train(tr, schema=synth_schema(), valid=va, model="deepfm", out=tmp_path / "m", epochs=1,
                batch_size=512, ensemble=2, progress=False)
    bundle_dir = tmp_path / "m" / "bundle"
    res = export_bundle(bundle_dir, valid=te)
    ids, dense, _ = encoded_rows(run.bundle, te)
    assert np.max(np.abs(run_session(session(res.fp32), ids, dense) - run.bundle.predict(te))) < 1e-5
    scorer = Scorer(Bundle.load(bundle_dir), bundle_dir)
    assert "onnx fp32" in scorer.timings_ms and "onnx fp32" not in scorer.skipped
    assert np.max(np.abs(scorer.predict(te.head(50).to_dicts()) - run.bundle.predict(te.head(50)))) < 5e-3


def test_a_failed_export_leaves_the_bundle_loadable_with_its_earlier_export(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An export into the bundle wrote model.onnx first and read --valid after: a missing file left a model.onnx
    that the manifest did not list, and the bundle no longer loaded."""
    import ctrkit.serve.export as export_module
    from ctrkit.serve.bundle import Bundle

    log, _ = make_click_log(n_rows=2000, n_users=100, n_items=80, seed=3)
    tr, va, te = split_by_time(log.drop("p_click"))
    train(tr, schema=synth_schema(), valid=va, model="lr", out=tmp_path / "m", epochs=1, progress=False)
    bundle_dir = tmp_path / "m" / "bundle"
    with pytest.raises(FileNotFoundError, match="nope.csv: no such file"):
        export_bundle(bundle_dir, valid=tmp_path / "nope.csv")
    assert not (bundle_dir / "model.onnx").exists() and Bundle.load(bundle_dir) is not None
    export_bundle(bundle_dir)
    before = {name: (bundle_dir / name).read_bytes() for name in ("model.onnx", "onnx.json", "manifest.json")}

    def broken(fp32: object, out: object) -> None:
        raise RuntimeError("quantisation failed")

    monkeypatch.setattr(export_module, "quantize_int8", broken)
    with pytest.raises(RuntimeError, match="quantisation failed"):
        export_bundle(bundle_dir, valid=te)
    assert {name: (bundle_dir / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in bundle_dir.iterdir() if p.name.startswith(".")) == []  # no scratch left
    assert Bundle.load(bundle_dir) is not None


def test_a_recalibrated_version_says_that_its_onnx_graphs_need_an_export(tmp_path: Path) -> None:
    """The graphs end in the calibrator they were exported with, so the new version does not take them along."""
    from typer.testing import CliRunner

    from ctrkit.cli import app

    log, _ = make_click_log(n_rows=2000, n_users=100, n_items=80, seed=4)
    tr, va, te = split_by_time(log.drop("p_click"))
    train(tr, schema=synth_schema(), valid=va, model="lr", out=tmp_path / "m", epochs=1, progress=False)
    export_bundle(tmp_path / "m" / "bundle")
    te.write_csv(tmp_path / "te.csv")
    res = CliRunner().invoke(app, ["calibrate", str(tmp_path / "m" / "bundle"), str(tmp_path / "te.csv"), "--out",
                                   str(tmp_path / "v2"), "--method", "platt"])
    assert res.exit_code == 0, res.output
    assert "ONNX graphs hold its old calibrator and were not copied" in res.output
    assert f"ctrkit export {tmp_path / 'v2'}" in " ".join(res.output.split())
    assert not (tmp_path / "v2" / "model.onnx").exists()
