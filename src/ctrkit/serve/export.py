"""ONNX export of a bundle's model, and the lossy serving forms (INT8, bf16) kept only where they keep AUC.

Exported into the bundle folder (the default), the graphs and ``onnx.json`` (the AUC decision) join the bundle's
manifest, so ``Bundle.load`` checks them like every other file and ``ctrkit serve`` can score through them.
The exported graph takes the encoder's output (``ids`` int64 [B, F], ``dense`` float32 [B, D]) and returns the
click probability [B], so any ONNX runtime scores pre-encoded rows; the encoder stays in the bundle. INT8
dynamic quantisation (weights int8, activations quantised on the fly) is compared with fp32 on labelled rows
and written only when the AUC moves by at most ``max_auc_drop``. The same rows judge the bf16 form of the torch
model and, where the model folds, the folded form with its MLP in bf16 (:mod:`ctrkit.serve.bf16`); ``onnx.json``
records the decisions, and the scorer offers only the forms kept.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ctrkit.data.dataset import Batch
from ctrkit.data.readers import Source, iter_chunks
from ctrkit.devices import eval_rows
from ctrkit.evaluate.calibrate import Calibrator
from ctrkit.evaluate.metrics import evaluate
from ctrkit.serve.bundle import MANIFEST, Bundle, _sha256

MAX_AUC_DROP = 0.0005
OPSET = 18


def _need_onnx(export: bool = True) -> Any:
    """onnxruntime (and, to export, onnx and onnxscript), or an error naming the extra to install."""
    try:
        import onnxruntime as ort

        if export:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401  (torch's ONNX exporter)
    except ImportError as exc:
        raise ImportError(f"ONNX export needs the 'onnx' extra: pip install 'ctrkit[onnx]' ({exc})") from exc
    return ort


class _Probability(nn.Module):
    """The bundle's model with its calibrator (correction shift, Platt or isotonic), which the scorer applies,
    inside the graph."""

    def __init__(self, model: nn.Module, calibrator: Calibrator) -> None:
        super().__init__()
        self.model, self.calibrator = model, calibrator

    def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.calibrator.torch(self.model(Batch(ids, dense)))


@dataclass
class ExportResult:
    """Paths written and, with labelled rows, the AUC of fp32, INT8 and bf16 and the decisions."""

    fp32: str
    int8: str | None = None
    auc_fp32: float | None = None
    auc_int8: float | None = None
    rows: int = 0
    decision: str = ""
    bf16: bool = False
    auc_torch: float | None = None
    auc_bf16: float | None = None
    bf16_folded: bool = False
    auc_bf16_folded: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def export_onnx(bundle: Bundle, out: str | Path) -> Path:
    """Write the model as ONNX (inputs ``ids``, ``dense``; output ``pctr``) with a dynamic batch size."""
    _need_onnx()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = bundle.model.spec
    ids = torch.zeros(2, len(spec.sparse_names), dtype=torch.int64)
    dense = torch.zeros(2, len(bundle.encoder.dense_names), dtype=torch.float32)
    net = _Probability(bundle.model, bundle.calibrator).eval()
    with torch.no_grad():
        batch = torch.export.Dim("batch")
        torch.onnx.export(net, (ids, dense), str(out), input_names=["ids", "dense"], output_names=["pctr"],
                          dynamic_shapes=({0: batch}, {0: batch}), opset_version=OPSET, dynamo=True,
                          external_data=False, verbose=False)
    return out


def session(path: str | Path, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session for an exported model."""
    ort = _need_onnx(export=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # idle threads sleep instead of spinning: on a few shared cores a spinning pool takes them from the rest
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_session(sess: Any, ids: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """Click probabilities of pre-encoded rows."""
    return sess.run(["pctr"], {"ids": ids.astype(np.int64, copy=False),
                               "dense": dense.astype(np.float32, copy=False)})[0]


def quantize_int8(fp32: str | Path, out: str | Path) -> Path:
    """INT8 dynamic quantisation of an exported model's matrix products."""
    _need_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)
    return Path(out)


def encoded_rows(bundle: Bundle, source: Source, max_rows: int = 200_000, **read_kwargs: Any
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, dense, label) of up to ``max_rows`` labelled rows, encoded by the bundle's encoder."""
    ids, dense, label, n = [], [], [], 0
    for chunk in iter_chunks(source, bundle.schema, **read_kwargs):
        chunk = chunk.head(max_rows - n)
        i, d = bundle.encoder.transform_frame(chunk)
        ids.append(i)
        dense.append(d)
        label.append(chunk[bundle.schema.label].to_numpy())
        n += chunk.height
        if n >= max_rows:
            break
    return np.concatenate(ids), np.concatenate(dense), np.concatenate(label)


def export_bundle(bundle_path: str | Path, out_dir: str | Path | None = None, valid: Source | None = None,
                  max_auc_drop: float = MAX_AUC_DROP, **read_kwargs: Any) -> ExportResult:
    """``model.onnx`` (and ``model.int8.onnx`` when it keeps AUC on ``valid``) and ``onnx.json`` in ``out_dir``,
    default the bundle folder, whose manifest then lists them.

    The labelled rows are read before anything is written, and the files are made in a hidden folder beside their
    place and moved in at the end: a failure leaves the bundle as it was, loadable, with its earlier export."""
    bundle = Bundle.load(bundle_path)
    out = Path(out_dir) if out_dir else Path(bundle_path)
    rows = None if valid is None else encoded_rows(bundle, valid, **read_kwargs)
    out.mkdir(parents=True, exist_ok=True)
    res = ExportResult(fp32=str(out / "model.onnx"))
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as scratch:
        tmp = Path(scratch)
        fp32, int8 = export_onnx(bundle, tmp / "model.onnx"), tmp / "model.int8.onnx"
        if rows is None:
            res.decision = ("no labelled rows given (--valid): INT8 not written and bf16 not served, their AUC "
                            "cannot be checked")
        else:
            ids, dense, y = rows
            quantize_int8(fp32, int8)
            res.rows = len(y)
            res.auc_fp32 = float(evaluate(y, run_session(session(fp32), ids, dense).astype(np.float64))["auc"])
            res.auc_int8 = float(evaluate(y, run_session(session(int8), ids, dense).astype(np.float64))["auc"])
            if res.auc_fp32 - res.auc_int8 <= max_auc_drop:
                res.int8 = str(out / int8.name)
                res.decision = f"INT8 kept: AUC {res.auc_int8:.5f} vs fp32 {res.auc_fp32:.5f}"
            else:
                int8.unlink()
                res.decision = (f"INT8 dropped: AUC {res.auc_int8:.5f} is more than {max_auc_drop} below fp32 "
                                f"{res.auc_fp32:.5f}")
            res.decision += "; " + _judge_bf16(bundle, ids, dense, y, max_auc_drop, res)
        (tmp / "onnx.json").write_text(json.dumps(res.to_dict(), indent=1))
        names = ["model.onnx", "model.int8.onnx", "onnx.json"]
        for name in names:  # an INT8 graph of an earlier export belongs to other weights: it goes when none is new
            if (tmp / name).exists():
                os.replace(tmp / name, out / name)
            else:
                (out / name).unlink(missing_ok=True)
    if (out / MANIFEST).exists() and out.resolve() == Path(bundle_path).resolve():
        _list_in_manifest(out, names)
    return res


def _judge_bf16(bundle: Bundle, ids: np.ndarray, dense: np.ndarray, y: np.ndarray, max_auc_drop: float,
                res: ExportResult) -> str:
    """Set ``res.bf16`` and ``res.bf16_folded`` (and the AUCs) by whether the bf16 form, and the folded form with
    its MLP in bf16 where the model folds, keep the torch model's AUC on these rows, all through the bundle's
    calibrator; the decisions in words."""
    from ctrkit.serve.bf16 import bf16_form, folded_bf16
    from ctrkit.serve.fold import FoldError, fold

    step = eval_rows("cpu")

    @torch.no_grad()
    def probabilities(net: Any) -> np.ndarray:
        """The calibrated probabilities of every row, a block of rows at a time."""
        logits = [net(torch.from_numpy(ids[i:i + step]), torch.from_numpy(dense[i:i + step]))
                  for i in range(0, len(ids), step)]
        return bundle.calibrator(torch.cat(logits).double().numpy())

    def on_batch(net: nn.Module) -> Any:
        return lambda i, d: net(Batch(i, d))

    p = probabilities(on_batch(bundle.model))
    res.auc_torch = float(evaluate(y, p)["auc"])
    words = []
    try:
        res.auc_bf16 = float(evaluate(y, probabilities(on_batch(bf16_form(bundle.model))))["auc"])
        res.bf16 = res.auc_torch - res.auc_bf16 <= max_auc_drop
        words.append(f"bf16 {_verdict(res.bf16, max_auc_drop)}: AUC {res.auc_bf16:.5f} vs torch fp32 "
                     f"{res.auc_torch:.5f}")
    except (RuntimeError, TypeError) as exc:  # a layer that reads a linear layer's weight itself
        words.append(f"bf16 not kept: the bf16 form does not run ({exc})")
    try:
        folded = folded_bf16(fold(bundle.model, [bundle.encoder.offsets[n] for n in bundle.encoder.sparse_names]))
    except FoldError:
        return "; ".join(words)
    res.auc_bf16_folded = float(evaluate(y, probabilities(folded))["auc"])
    res.bf16_folded = res.auc_torch - res.auc_bf16_folded <= max_auc_drop
    words.append(f"folded bf16 {_verdict(res.bf16_folded, max_auc_drop)}: AUC {res.auc_bf16_folded:.5f}")
    return "; ".join(words)


def _verdict(kept: bool, max_auc_drop: float) -> str:
    return "kept" if kept else f"dropped (more than {max_auc_drop} below)"


def _list_in_manifest(root: Path, names: list[str]) -> None:
    """Record the sha256 of the files ``names`` in the bundle's manifest (dropping those that do not exist)."""
    manifest = json.loads((root / MANIFEST).read_text())
    for name in names:
        if (root / name).exists():
            manifest["files"][name] = _sha256(root / name)
        else:
            manifest["files"].pop(name, None)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
