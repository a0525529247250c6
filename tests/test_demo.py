"""`make demo` runs end to end: three models trained, compared, and the reloaded bundle scores raw records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctrkit import demo


def test_demo_runs_end_to_end_on_a_small_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    demo.main(["--rows", "6000", "--epochs", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "raw records scored by the reloaded bundle" in out
    assert "unseen user" in out and "done: bundles in" in out
    for name in ("lr", "fm", "deepfm"):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert 0.5 < metrics["test"]["auc"] <= 1.0
        assert (tmp_path / name / "bundle" / "manifest.json").exists()
