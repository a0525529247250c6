"""The server's scorer: a bundle's records -> calibrated pCTR on the fastest of the bundle's model paths.

A bundle always scores through torch. When ``ctrkit export`` has written ONNX graphs into the bundle folder
(``model.onnx``, and ``model.int8.onnx`` where INT8 kept the AUC), each path is timed at load on a batch of
encoded rows the size of a ranking request, taking turns, and the one with the lowest median serves. Records go
through the same validation and encoding as :meth:`Bundle.predict` (the ONNX graphs hold the calibrator), so
only the model's arithmetic differs between paths; the fp32 graph is checked against torch before it may serve.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from ctrkit.data.dataset import Batch
from ctrkit.serve.bundle import Bundle, BundleError
from ctrkit.validate import Records, records_frame

ONNX_FILES = {"onnx fp32": "model.onnx", "onnx int8": "model.int8.onnx"}
FP32_TOLERANCE = 1e-4


class Scorer:
    """Scores raw records through ``bundle`` on its fastest model path (``backend``), timed at load."""

    def __init__(self, bundle: Bundle, path: str | Path | None = None, threads: int = 1, rows: int = 1000,
                 reps: int = 15) -> None:
        self.bundle, self.threads = bundle, threads
        self.sessions: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        if path is not None:
            self._open_sessions(Path(path))
        self.timings_ms = self._time_paths(rows, reps)
        self.backend = min(self.timings_ms, key=self.timings_ms.__getitem__)

    def _open_sessions(self, path: Path) -> None:
        present = {name: path / file for name, file in ONNX_FILES.items() if (path / file).exists()}
        if not present:
            return
        if self.bundle.encoder.seq_names or self.bundle._heads > 1:
            self.skipped = {name: "the graph takes ids and dense only, one head" for name in present}
            return
        try:
            from ctrkit.serve.export import session
        except ImportError as exc:
            self.skipped = {name: str(exc) for name in present}
            return
        for name, file in present.items():
            try:
                self.sessions[name] = session(file, self.threads)
            except Exception as exc:  # noqa: BLE001 - a graph ONNX Runtime cannot load is reported, torch serves
                self.skipped[name] = f"{file}: {exc}"

    def _probe(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Encoded rows of random in-vocabulary ids and standard normal dense values."""
        enc = self.bundle.encoder
        rng = np.random.default_rng(0)
        sizes = np.asarray(enc.field_sizes(), dtype=np.int64)
        offsets = np.asarray([enc.offsets[n] for n in enc.sparse_names], dtype=np.int64)
        ids = (offsets + (rng.random((rows, len(sizes))) * sizes).astype(np.int64)).astype(np.int32)
        dense = rng.standard_normal((rows, len(enc.dense_names))).astype(np.float32)
        return ids, dense

    def _time_paths(self, rows: int, reps: int) -> dict[str, float]:
        """Median milliseconds of each path on one batch of ``rows``, the paths taking turns (a loaded machine
        slows them alike); an fp32 graph that disagrees with torch is dropped."""
        paths = ["torch", *self.sessions]
        if len(paths) == 1:
            return {"torch": float("nan")}
        ids, dense = self._probe(rows)
        ref = self._probabilities("torch", ids, dense)
        if "onnx fp32" in self.sessions:
            gap = float(np.max(np.abs(self._probabilities("onnx fp32", ids, dense) - ref)))
            if not gap <= FP32_TOLERANCE:
                self.skipped["onnx fp32"] = f"differs from torch by {gap:.2g} (> {FP32_TOLERANCE})"
                paths.remove("onnx fp32")
                del self.sessions["onnx fp32"]
        ms: dict[str, list[float]] = {p: [] for p in paths}
        for _ in range(reps):
            for p in paths:
                t0 = time.perf_counter()
                self._probabilities(p, ids, dense)
                ms[p].append((time.perf_counter() - t0) * 1e3)
        return {p: round(float(np.median(v)), 3) for p, v in ms.items()}

    @torch.no_grad()
    def _probabilities(self, path: str, ids: np.ndarray, dense: np.ndarray) -> np.ndarray:
        if path == "torch":
            logits = self.bundle.model(Batch(torch.from_numpy(ids), torch.from_numpy(dense)))
            return self.bundle.calibrator(logits.double().numpy())
        out = self.sessions[path].run(None, {"ids": ids.astype(np.int64, copy=False), "dense": dense})[0]
        return out.astype(np.float64, copy=False)

    def frame(self, records: Records, context: Mapping[str, Any] | None = None,
              extra: Sequence[str] | None = None) -> pl.DataFrame:
        """The typed, validated feature frame of raw records (``_line`` numbers them), as Bundle.predict reads it."""
        return self.bundle._frame(records_frame(records, self.bundle.schema, context, extra))

    def score(self, good: pl.DataFrame) -> np.ndarray:
        """Calibrated pCTR of a frame from :meth:`frame`, on the chosen path."""
        if good.height == 0:
            return np.zeros((0, self.bundle._heads) if self.bundle._heads > 1 else 0)
        if self.backend == "torch":
            return self.bundle._score(good, 65536)
        ids, dense = self.bundle.encoder.transform_frame(good)
        p = self._probabilities(self.backend, ids, dense)
        if not np.isfinite(p).all():
            row = good["_line"][int(np.flatnonzero(~np.isfinite(p))[0])]
            raise BundleError(f"the model gave a non-finite score for row {row}")
        return p

    def predict(self, records: Records, context: Mapping[str, Any] | None = None,
                extra: Sequence[str] | None = None) -> np.ndarray:
        """Calibrated pCTR of raw records (the checks and answers of :meth:`Bundle.predict`)."""
        return self.score(self.frame(records, context, extra))

    def describe(self) -> dict[str, Any]:
        """The serving path, each path's median ms at load, and the paths left out with the reason."""
        return {"backend": self.backend, "threads": self.threads, "probe_ms": self.timings_ms,
                "skipped": self.skipped}
