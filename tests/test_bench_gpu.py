"""bench_gpu's FuxiCTR part reads the harness's result lines: one row per batch size with its steady-state and its
epoch-inclusive samples/s, and says which batch sizes did not run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"
sys.path.insert(0, str(_PATH.parent))  # its sibling modules, as when it runs as a script
_SPEC = importlib.util.spec_from_file_location("bench_gpu", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
bench_gpu = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_gpu)

NOTES = ("GPU time-boxed 30s run of model.fit (Ray Data parquet loader, shuffle, num_workers=3 prefetch) on first "
         "1000000 rows; timed 400 full steps after 3 warm-up (median step 66.5 ms; incl. epoch boundaries+eval "
         "105243/s); peak GPU mem 3.1 GiB")


def fake_harness(lines: list[dict[str, Any]], rc: int = 1) -> Any:
    """A stand-in for the harness process: writes ``lines`` where ``--results`` points, exits with ``rc``."""
    def run(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        path = Path(cmd[cmd.index("--results") + 1])
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        return subprocess.CompletedProcess(cmd, rc, "ray: failed to kill actor", "")
    return run


def test_fuxictr_rows_from_the_harness_results(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    lines = [{"lib": "environment", "metric": "torch_cuda_versions", "value": "{}", "notes": ""},
             {"lib": "fuxictr 2.3.10", "metric": "train_samples_per_s_bs65536", "value": 986185.0, "notes": NOTES},
             {"lib": "fuxictr 2.3.10", "metric": "train_samples_per_s_bs4096", "value": None, "notes": "FAILED: x"}]
    monkeypatch.setattr(bench_gpu.subprocess, "run", fake_harness(lines))
    rows = bench_gpu.fuxictr_run(tmp_path, "4096,65536", 30.0, "cuda", python="python3")
    assert [(r["batch"], r["samples_per_s"], r["with_epochs_samples_per_s"]) for r in rows] == [
        (65536, 986185.0, 105243.0), (4096, None, None)]
    assert rows[0]["lib"] == "fuxictr 2.3.10 DeepFM (harness data, 30 s per batch size)"
    assert capsys.readouterr().out == ""  # both batch sizes reported: the exit code after Ray's shutdown is no news


def test_fuxictr_says_when_batch_sizes_are_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench_gpu.subprocess, "run", fake_harness([], rc=2))
    assert bench_gpu.fuxictr_run(tmp_path, "4096,16384", 30.0, "cuda", python="python3") == []
    assert "FuxiCTR: 0 of 2 batch sizes ran (rc 2)" in capsys.readouterr().out


def test_fuxictr_time_to_quality_is_the_drivers_result_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    row = {"lib": "fuxictr 2.3.10 DeepFM to early stopping", "batch": 65536, "epochs": 3, "best_epoch": 2,
           "seconds_to_best": 41.5, "test_auc": 0.79}
    seen: list[list[str]] = []

    def run(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "encoded and wrote {}\nRESULT " + json.dumps(row) + "\n", "")

    monkeypatch.setattr(bench_gpu.subprocess, "run", run)
    assert bench_gpu.fuxictr_ttq(tmp_path, 1000, 65536, 8, "cuda", python="python3") == row
    cmd = seen[0]
    assert cmd[1].endswith("fuxictr_ttq.py") and cmd[cmd.index("--batch-size") + 1] == "65536"
    assert cmd[cmd.index("--rows") + 1] == "1000" and cmd[cmd.index("--epochs") + 1] == "8"
    monkeypatch.setattr(bench_gpu.subprocess, "run",
                        lambda cmd, **_: subprocess.CompletedProcess(cmd, 1, "", "Traceback: no GPU"))
    assert bench_gpu.fuxictr_ttq(tmp_path, 1000, 65536, 8, "cuda", python="python3") is None
    assert "gave no result (rc 1)" in capsys.readouterr().out
