"""The server's scorer: a bundle's records -> calibrated pCTR on the fastest of the bundle's model paths.

A bundle always scores through torch. With ``device="cuda"`` the model also runs on the GPU from CUDA graphs
(:mod:`ctrkit.serve.gpu`), checked against torch like the other fp32 paths. The embedding-sum models (lr,
fm, deepfm, dnn, wide_deep) also have a folded torch form (:mod:`ctrkit.serve.fold`: the first layer read from
a precomputed table). When ``ctrkit export`` has written ONNX graphs into the bundle folder (``model.onnx``,
and ``model.int8.onnx`` where INT8 kept the AUC), those are paths too, and so are the bf16 form of the torch
model and the folded form with its MLP in bf16 (:mod:`ctrkit.serve.bf16`), each where that export kept its AUC
and the CPU has bf16 units. Each path is timed at load on a batch of encoded rows the size of a ranking request,
taking turns, and the one with the lowest median serves. Records go through the same validation and encoding as
:meth:`Bundle.predict` (the ONNX graphs hold the calibrator), so only the model's arithmetic differs between
paths; the folded form, the GPU path and the fp32 graph are checked against torch before they may serve (INT8
and the bf16 forms were judged by AUC at export).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from ctrkit.data.dataset import Batch
from ctrkit.data.readers import Prefetch, ReadReport, Source, dataset_root, iter_chunks, would_read
from ctrkit.devices import cpu_has_bf16, eval_rows
from ctrkit.schema import Field, Schema
from ctrkit.serve.bf16 import bf16_form, folded_bf16
from ctrkit.serve.bundle import Bundle, BundleError
from ctrkit.serve.fold import FoldedModel, FoldError, fold
from ctrkit.serve.gpu import GPUError, GraphedModel
from ctrkit.validate import DataError, Records, records_frame

ONNX_FILES = {"onnx fp32": "model.onnx", "onnx int8": "model.int8.onnx"}
FOLDED = "torch folded"
GRAPHED = "torch cuda graph"
BF16 = "torch bf16"
FOLDED_BF16 = "torch folded bf16"
FP32_TOLERANCE = 1e-4
WARMUP_CALLS = 3


class Scorer:
    """Scores raw records through ``bundle`` on its fastest model path (``backend``), timed at load."""

    def __init__(self, bundle: Bundle, path: str | Path | None = None, threads: int = 1, rows: int = 1000,
                 reps: int = 15, like: Scorer | None = None, device: str = "cpu", keep_paths: bool = False) -> None:
        """``like``: the scorer this one replaces (a hot swap). When both bundles have the same model, layout and
        paths, its timings stand for this one's (speed depends on the shapes, not the weights), so a swap costs
        the correctness checks and not the timing, which would slow the requests served meanwhile.
        ``device``: "cuda" adds the GPU path; a GPU that cannot be used is an error, not a silent CPU fallback.
        The paths that lose the timing are let go (a folded table and an ONNX Runtime arena hold hundreds of MB),
        unless ``keep_paths`` (to compare paths by setting :attr:`backend`)."""
        self.bundle, self.threads, self.device = bundle, threads, device
        self.sessions: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        self.folded: FoldedModel | None = None
        self.graphed: GraphedModel | None = None
        self.bf16: torch.nn.Module | None = None
        self.folded_bf16: FoldedModel | None = None
        if torch.device(device).type == "cuda":
            if bundle.encoder.seq_names or bundle._heads > 1:
                raise BundleError("the GPU path takes ids and dense only, one head; this bundle has list fields "
                                  "or several heads: serve it on the CPU")
            try:
                self.graphed = GraphedModel(bundle.model, device)
            except GPUError as exc:
                raise BundleError(f"cannot serve on {device}: {exc}") from exc
        try:
            self.folded = fold(bundle.model, [bundle.encoder.offsets[n] for n in bundle.encoder.sparse_names])
        except FoldError as exc:
            self.skipped[FOLDED] = str(exc)
        if path is not None:
            self._open_sessions(Path(path))
            self._open_bf16(Path(path))
        self.records = "compiled" if bundle.encoder.records_plan() is not None else "reference"
        self.timings_ms = self._time_paths(rows, reps, like)  # empty when torch is the only path
        self.backend = min(self.timings_ms, key=self.timings_ms.__getitem__) if self.timings_ms else "torch"
        if not keep_paths:
            self.sessions = {k: v for k, v in self.sessions.items() if k == self.backend}
            self.folded = self.folded if self.backend == FOLDED else None
            self.graphed = self.graphed if self.backend == GRAPHED else None
            self.bf16 = self.bf16 if self.backend == BF16 else None
            self.folded_bf16 = self.folded_bf16 if self.backend == FOLDED_BF16 else None

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

    def _open_bf16(self, path: Path) -> None:
        """The bf16 form and the folded form with its MLP in bf16, each where ``ctrkit export --valid`` recorded
        that it keeps the AUC and this CPU has bf16 units (elsewhere bf16 arithmetic is emulated and slower than
        fp32)."""
        record = path / "onnx.json"
        kept = json.loads(record.read_text()) if record.exists() else {}
        forms = [name for name, key in ((BF16, "bf16"), (FOLDED_BF16, "bf16_folded")) if kept.get(key)]
        for name in forms:
            if self.device != "cpu" or not cpu_has_bf16():
                self.skipped[name] = "this CPU has no bf16 units" if self.device == "cpu" else "served on the GPU"
            elif self.bundle.encoder.seq_names or self.bundle._heads > 1:
                self.skipped[name] = "the bf16 paths take ids and dense only, one head"
            elif name == BF16:
                self.bf16 = bf16_form(self.bundle.model)
            elif self.folded is not None:
                self.folded_bf16 = folded_bf16(self.folded)

    def _probe(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Encoded rows of random in-vocabulary ids and standard normal dense values, a tenth of them missing."""
        enc = self.bundle.encoder
        rng = np.random.default_rng(0)
        sizes = np.asarray(enc.field_sizes(), dtype=np.int64)
        offsets = np.asarray([enc.offsets[n] for n in enc.sparse_names], dtype=np.int64)
        ids = (offsets + (rng.random((rows, len(sizes))) * sizes).astype(np.int64)).astype(enc.id_dtype)
        dense = rng.standard_normal((rows, len(enc.dense_names))).astype(np.float32)
        dense[rng.random(dense.shape) < 0.1] = np.nan
        return ids, dense

    def _same_shapes(self, other: Scorer) -> bool:
        """True when ``other`` scores a model of the same kind, settings and id space with the same threads."""
        a, b = self.bundle, other.bundle
        return (a.model_name == b.model_name and a.model.config.to_dict() == b.model.config.to_dict()
                and len(getattr(a.model, "members", ())) == len(getattr(b.model, "members", ()))
                and a.encoder.fingerprint() == b.encoder.fingerprint() and self.threads == other.threads
                and self.device == other.device)

    def _time_paths(self, rows: int, reps: int, like: Scorer | None = None) -> dict[str, float]:
        """Median milliseconds of each path on one batch of ``rows``, the paths taking turns (a loaded machine
        slows them alike), or ``like``'s when it had these paths for the same shapes; a folded form or fp32
        graph that disagrees with torch is dropped."""
        paths = ["torch", *([FOLDED] if self.folded is not None else []),
                 *([GRAPHED] if self.graphed is not None else []), *([BF16] if self.bf16 is not None else []),
                 *([FOLDED_BF16] if self.folded_bf16 is not None else []), *self.sessions]
        if len(paths) == 1:
            return {}
        ids, dense = self._probe(rows)
        ref = self._probabilities("torch", ids, dense)
        for exact in (FOLDED, GRAPHED, "onnx fp32"):
            if exact not in paths:
                continue
            gap = float(np.max(np.abs(self._probabilities(exact, ids, dense) - ref)))
            if not gap <= FP32_TOLERANCE:
                self.skipped[exact] = f"differs from torch by {gap:.2g} (> {FP32_TOLERANCE})"
                paths.remove(exact)
                self.sessions.pop(exact, None)
                if exact == FOLDED:
                    self.folded = None
                    if FOLDED_BF16 in paths:  # the same table: a folded form that disagrees serves in neither
                        paths.remove(FOLDED_BF16)
                        self.folded_bf16 = None
                        self.skipped[FOLDED_BF16] = self.skipped[FOLDED]
                if exact == GRAPHED:
                    self.graphed = None
        if like is not None and set(like.timings_ms) == set(paths) and self._same_shapes(like):
            for _ in range(WARMUP_CALLS):  # the path that will serve runs before the swap: its first calls are slow
                self._probabilities(like.backend, ids, dense)
            return dict(like.timings_ms)
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
        if path in (FOLDED, FOLDED_BF16):
            folded = self.folded if path == FOLDED else self.folded_bf16
            assert folded is not None
            logits = folded(torch.from_numpy(ids), torch.from_numpy(dense))
            return self.bundle.calibrator(logits.double().numpy())
        if path == GRAPHED:
            assert self.graphed is not None
            return self.bundle.calibrator(self.graphed(ids, dense).astype(np.float64))
        if path == BF16:
            assert self.bf16 is not None
            logits = self.bf16(Batch(torch.from_numpy(ids), torch.from_numpy(dense)))
            return self.bundle.calibrator(logits.double().numpy())
        out = self.sessions[path].run(None, {"ids": ids.astype(np.int64, copy=False), "dense": dense})[0]
        return out.astype(np.float64, copy=False)

    def frame(self, records: Records, context: Mapping[str, Any] | None = None,
              extra: Sequence[str] | None = None) -> pl.DataFrame:
        """The typed, validated feature frame of raw records (``_line`` numbers them), as Bundle.predict reads it."""
        return self.bundle._frame(records_frame(records, self.bundle.schema, context, extra))

    def score_encoded(self, ids: np.ndarray, dense: np.ndarray, lines: np.ndarray | None = None) -> np.ndarray:
        """Calibrated pCTR of encoded rows (:meth:`Encoder.encode_records`, :meth:`Encoder.encode_json`) on the
        chosen path; ``lines`` numbers the rows in errors (default: their position)."""
        if len(ids) == 0:
            return self._none()
        rows = eval_rows(self.device)  # as Bundle.predict: a block's activations stay in the caches
        parts = [self._probabilities(self.backend, ids[s:s + rows], dense[s:s + rows])
                 for s in range(0, len(ids), rows)]
        p = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if not np.isfinite(p).all():
            first = int(np.flatnonzero(~np.isfinite(p))[0]) // (self.bundle._heads if p.ndim == 2 else 1)
            raise BundleError(f"the model gave a non-finite score for row {first if lines is None else lines[first]}")
        return p

    def score(self, good: pl.DataFrame) -> np.ndarray:
        """Calibrated pCTR of a frame from :meth:`frame`, on the chosen path."""
        if good.height == 0:
            return self._none()
        if self.backend == "torch":  # the bundle's own path: it also takes list fields
            return self.bundle._score(good)
        rows = eval_rows(self.device)
        parts = [self.score_encoded(*self.bundle.encoder.transform_frame(block), block["_line"].to_numpy())
                 for block in good.iter_slices(rows)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _none(self) -> np.ndarray:
        return np.zeros((0, self.bundle._heads) if self.bundle._heads > 1 else 0)

    def predict(self, records: Records, context: Mapping[str, Any] | None = None,
                extra: Sequence[str] | None = None) -> np.ndarray:
        """Calibrated pCTR of raw records (the checks and answers of :meth:`Bundle.predict`): plain records in one
        compiled pass (:meth:`Encoder.encode_records`), others through :meth:`frame`, which names any bad value."""
        encoded = self.bundle.encoder.encode_records(records, context, extra)
        if encoded is None:
            return self.score(self.frame(records, context, extra))
        return self.score_encoded(*encoded)

    def describe(self) -> dict[str, Any]:
        """The serving path, how records are encoded (``compiled``: :meth:`Encoder.encode_records` where they are
        plain), each path's median ms at load, and the paths left out with the reason."""
        return {"backend": self.backend, "device": self.device, "threads": self.threads, "records": self.records,
                "probe_ms": self.timings_ms, "skipped": self.skipped}

    def score_file(self, source: Source, out: str | Path, keep: Sequence[str] = (),
                   progress: Callable[[int], None] | None = None, **read_kwargs: Any) -> ReadReport:
        """Stream ``source`` chunk by chunk into ``out`` (.csv or .parquet): the ``keep`` columns as text, then
        ``pctr`` (``p_<label>`` per head of a multi-task bundle), one row per input row, in order.

        Memory stays at a few chunks whatever the file's size; the next chunk is read while one is scored. The
        output appears only complete: a file with rows that cannot be scored is read to its end, to count and
        report them as ``ctrkit predict`` always has, and leaves no output. ``progress`` gets each chunk's rows.
        """
        out = Path(out)
        if out.suffix not in (".csv", ".parquet"):
            raise ValueError(f"the output must end in .csv or .parquet, got {out.name}")
        if isinstance(source, (str, Path)) and out.resolve() == Path(source).resolve():
            raise ValueError(f"{out} is the file being scored: the scores would replace it; write them elsewhere")
        if isinstance(source, (str, Path)) and would_read(source, out):
            raise ValueError(f"{out} is inside {dataset_root(source)}, the folder being scored: the next read of the "
                             "folder would take the scores for a part of it; write them elsewhere")
        report = ReadReport()
        chunks = iter_chunks(source, self.bundle._features, report=report, with_label=False, **read_kwargs)
        kept = _Rows(iter_chunks(source, _text_schema(keep, self.bundle.schema), with_label=False, **read_kwargs)
                     ) if keep else None
        partial = out.with_name(f".{out.name}.partial")
        writer = _Writer(partial, out.suffix)
        try:
            with Prefetch(chunks) as stream:
                for chunk in stream:
                    if report.bad_rows == 0 and chunk.height:
                        self.bundle._check_required(chunk)
                        writer.write(self._scores_frame(chunk, kept))
                    if progress is not None:
                        progress(chunk.height)
            if not writer.rows:
                heads = self.bundle.schema.label_columns
                names = ["pctr"] if self.bundle._heads == 1 else [f"p_{h}" for h in heads]
                writer.write(pl.DataFrame(schema={**dict.fromkeys(keep, pl.String), **dict.fromkeys(names, pl.Float64)}))
            writer.close()
            if report.bad_rows:
                raise DataError(f"{report.bad_rows} row(s) cannot be scored: " + "; ".join(report.examples))
            partial.replace(out)
        finally:
            writer.close()
            partial.unlink(missing_ok=True)
        return report

    def _scores_frame(self, chunk: pl.DataFrame, kept: _Rows | None) -> pl.DataFrame:
        p = self.score(chunk)
        heads = self.bundle.schema.label_columns
        scores = pl.DataFrame({"pctr": p} if p.ndim == 1 else {f"p_{h}": p[:, t] for t, h in enumerate(heads)})
        return scores if kept is None else pl.concat([kept.take(chunk.height), scores], how="horizontal")


def _text_schema(columns: Sequence[str], schema: Schema) -> Schema:
    """A schema reading ``columns`` (any: features, the label, an id) as text."""
    label = next((c for c in [schema.label, *(schema.columns or [])] if c not in columns), "_label")
    return Schema(fields=[Field(name=c) for c in columns], label=label, columns=schema.columns)


class _Rows:
    """The rows of a stream of chunks, taken in runs of any length (the kept columns, beside the scored rows)."""

    def __init__(self, chunks: Iterator[pl.DataFrame]) -> None:
        self.chunks, self.buffer = chunks, pl.DataFrame()

    def take(self, n: int) -> pl.DataFrame:
        parts = [self.buffer]
        have = self.buffer.height
        while have < n:
            part = next(self.chunks).drop("_line")
            parts.append(part)
            have += part.height
        rows = pl.concat([p for p in parts if p.width]) if have else self.buffer
        self.buffer = rows.slice(n)
        return rows.head(n)


class _Writer:
    """Appends frames to a CSV file (one header) or a Parquet file (one row group per frame)."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt, self.rows = path, fmt, 0
        self._parquet: Any = None
        self._csv: Any = None

    def write(self, frame: pl.DataFrame) -> None:
        self.rows += frame.height
        if self.fmt == ".parquet":
            import pyarrow.parquet as pq

            table = frame.to_arrow()
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.path, table.schema)
            self._parquet.write_table(table.cast(self._parquet.schema))
        else:
            first = self._csv is None
            if first:
                self._csv = open(self.path, "wb")  # noqa: SIM115 - closed by close()
            frame.write_csv(self._csv, include_header=first)

    def close(self) -> None:
        for handle in (self._parquet, self._csv):
            if handle is not None:
                handle.close()
        self._parquet = self._csv = None
