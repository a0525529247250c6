"""One call from raw files to a saved, evaluated bundle: encode, train, evaluate, save.

This is what ``ctrkit train`` runs; from Python, ``ctrkit.train(...)``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctrkit.data.encode import EncodeResult, encode_files
from ctrkit.data.readers import ReadReport, Source, data_parts, libfm_schema
from ctrkit.evaluate.metrics import cold_start, evaluate, evaluate_heads
import ctrkit.models  # noqa: F401  (registers the model zoo)
from ctrkit.models.base import SMALL_TABLE, CTRModel, build_model, default_config, model_class
from ctrkit.models.ensemble import Ensemble
from ctrkit.schema import Schema
from ctrkit.serve.bundle import Bundle
from ctrkit.data.dataset import EncodedData
from ctrkit.evaluate.calibrate import CHOICES as CALIBRATE_CHOICES, Calibrator, fit_calibrator
from ctrkit.evaluate.report import render_report, save_report_data
from ctrkit.serve.monitor import feature_reference, reference_distribution
from ctrkit.devices import available_memory
from ctrkit.training.distributed import world
from ctrkit.training.sampling import check_rate, downsample_negatives, logit_shift, transfer_rows
from ctrkit.nn.embedding import FeatureLinear, FeatureSpec, tables_on
from ctrkit.training.first_order import FOLDS, fit_first_order, load_first_order
from ctrkit.training.trainer import TrainConfig, TrainResult, predict_logits, train as train_model
from ctrkit.validate import DataError, check_labels

@dataclass
class Run:
    """The outcome of :func:`train`: the bundle, its metrics and the training record (of an ensemble's first
    member; ``metrics["train"]["members"]`` holds every member's)."""

    bundle: Bundle
    metrics: dict[str, Any]
    result: TrainResult
    out: Path | None = None
    reports: dict[str, Any] = field(default_factory=dict)


TRANSFER_SWAP = 0.3  # distillation's transfer rows: the chance that a field is another row's (Frappe_x1: 0.1-0.5)
MAX_TRANSFER = 10  # transfer rows per training row at most: they are held in memory
REFERENCE_ROWS = 200_000  # training rows sampled for the inputs' drift reference (monitor.feature_reference)
RUN_FILES = {"bundle", "checkpoints", "metrics.json", "report.html", "report_data.npz", "report_segments.json",
             "tune.json"}  # what a training run (or a search) writes into its --out


def _resolve_schema(schema: Schema | str | Path | None, fmt: str | None, fields: list[str] | None) -> Schema:
    if isinstance(schema, Schema):
        return schema
    if schema is not None:
        if fields:
            raise ValueError("--fields names the tokens of a libFM file without a schema; with --schema, list "
                             "the fields in the schema instead")
        return Schema.load(schema)
    if fmt == "libfm":
        if not fields:
            raise ValueError("--format libfm needs --fields a,b,... (the field of each token, in order)")
        return libfm_schema(list(fields))
    raise ValueError("a schema is needed: pass --schema YAML (see `ctrkit schema infer`) or --format libfm --fields")


def train(train_data: Source, *, schema: Schema | str | Path | None = None, valid: Source | None = None,
          test: Source | None = None, model: str = "deepfm", out: str | Path | None = None,
          fmt: str | None = None, fields: list[str] | None = None, epochs: int | None = None,
          batch_size: int | None = None, lr: float | None = None, embed_dim: int | None = None,
          seed: int = 0, device: str = "cpu", bad_rows: str | Path | None = None, progress: bool = True,
          model_options: dict[str, Any] | None = None, train_options: dict[str, Any] | None = None,
          loss: str = "bce", pos_weight: float | str = "auto", neg_sample_rate: float = 1.0,
          calibrate: str = "auto", split: str = "auto", report_by: list[str] | None = None,
          resume: bool = False, checkpoint_every: int = 0, embedding_backend: str = "plain",
          ensemble: int = 1, distill: str | Path | None = None, distill_weight: float = 1.0,
          distill_transfer: float = 1.0, log: Any = None, encoded: EncodeResult | None = None,
          on_epoch: Any = None, first_order_fits: list[Any] | None = None) -> Run:
    """Encode ``train_data`` (fitting the encoder on it only), train ``model``, calibrate, evaluate, save.

    Without ``valid`` a validation part is cut from the training data (``split``: by time when the schema has
    a time field, else at random, or by group). ``neg_sample_rate`` W < 1 keeps every positive and a fraction
    W of the negatives for training; the bundle corrects the odds exactly. The calibrator (``calibrate``) is
    fitted on the validation rows only, so the test figures are untouched by it. With ``out``, writes
    ``out/bundle/``, ``out/metrics.json``, ``out/report.html`` and checkpoints under ``out/checkpoints/``.
    ``embedding_backend`` "torchrec" trains the tables sharded by TorchRec (sparse gradients and the batch L2,
    no first-order fit, distributed checkpoints); the bundle holds them as plain tables.
    ``ensemble`` N > 1 trains N models one after another, with seeds ``seed`` .. ``seed + N - 1``, and serves
    the mean of their logits (:class:`~ctrkit.models.ensemble.Ensemble`); each has its own checkpoints.
    ``distill``: a bundle trained on the same training rows and schema (an ensemble, typically), whose seed the
    encoding then takes (``seed`` still starts the weights: one that none of the teacher's members had is best);
    the model learns ``(1 - distill_weight) * label + distill_weight * the teacher's probability`` of each
    training row (knowledge distillation, :func:`distilled`): one network that serves at its own cost what the
    teacher learned. ``distill_transfer`` R adds R transfer rows per training row (training rows with fields
    swapped between them, :func:`~ctrkit.training.sampling.transfer_rows`), labelled by the teacher alone.
    ``encoded``: the :func:`~ctrkit.data.encode.encode_files` result of these sources, made earlier (by
    :func:`ctrkit.tune.tune`, which trains many models on one encode); the sources then only name the data.
    ``on_epoch`` gets each epoch's record (its "valid" figures among them), as the trainer writes it; what it
    raises ends the run (a tuning trial pruned). ``first_order_fits``: a list that holds, or will hold, the exact
    first-order fit of this encode (it depends on the rows and the seed only), shared by runs that pass the same
    list, as tuning's trials do.
    """
    t0 = time.perf_counter()
    sch = _resolve_schema(schema, fmt, fields)
    cls = model_class(model)
    if calibrate not in CALIBRATE_CHOICES:
        raise ValueError(f"--calibrate must be one of {CALIBRATE_CHOICES}, got {calibrate!r}")
    for name in report_by or []:
        if name not in [f.name for f in sch.sparse_fields]:
            raise ValueError(f"--report-by {name!r}: not a categorical field of the schema "
                             f"({[f.name for f in sch.sparse_fields]})")
    if resume and not out:
        raise ValueError("--resume needs --out, where the checkpoints of the run are")
    if ensemble < 1:
        raise ValueError(f"--ensemble must be >= 1 (members), got {ensemble}")
    if ensemble > 1 and embedding_backend == "torchrec":
        raise ValueError("--ensemble trains plain tables; TorchRec-sharded members are not supported")
    # the settings the caller chose, checked before any data is read (a typo must not wait for the encode)
    explicit = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)) if v is not None}
    TrainConfig(**{**cls.train_defaults, **(train_options or {}), **explicit, "seed": seed,
                   "checkpoint_every": checkpoint_every}, device=device, loss=loss,
                pos_weight=1.0 if pos_weight == "auto" else float(pos_weight), embedding_backend=embedding_backend)
    default_config(model, **{**(model_options or {}), **({"embed_dim": embed_dim} if embed_dim is not None else {})})
    check_rate(neg_sample_rate)
    teacher = _teacher(distill, distill_weight, distill_transfer) if distill is not None else None
    _check_distinct_files(train_data, valid, test, log)
    read_kwargs: dict[str, Any] = {"fmt": fmt} if fmt else {}
    created = bool(out) and not Path(out).exists()
    if out:
        if Path(out).exists() and not Path(out).is_dir():
            raise DataError(f"--out {out} exists and is not a folder")
        others = sorted(p.name for p in Path(out).glob("*") if p.name not in RUN_FILES) if Path(out).is_dir() else []
        if others and log:
            log(f"warning: --out {out} holds files that are not a run's ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}): the run's are written beside them, and a metrics.json or "
                "report.html there is replaced; a folder of its own keeps runs apart")
        Path(out).mkdir(parents=True, exist_ok=True)
    if pos_weight != "auto" and loss != "weighted" and log:
        log(f"warning: --pos-weight {pos_weight} is not used: it weighs positives in --loss weighted, and the loss "
            f"is {loss}")
    if valid is not None and split != "auto" and log:
        log(f"warning: --split {split} is not used: it chooses how TRAIN is cut for validation, and --valid gives "
            "the validation rows")
    if valid is None and split == "random" and sch.time and log:
        log(f"warning: --split random although the schema has a time field ({sch.time!r}): "
            "validation rows from the same period as training rows overstate what the model will do on "
            "tomorrow's traffic; --split time is the honest choice for a click log")
    work = Path(tempfile.mkdtemp(prefix="ctrkit-data-", dir=str(out) if out else None))
    try:
        # a student encodes as its teacher did (the seed draws the numeric fields' sample and a random validation
        # cut), so that it reads the teacher's ids whatever seed its own weights start from
        data_seed = seed if teacher is None else int(teacher.metrics.get("train", {}).get("config", {}).get("seed",
                                                                                                           seed))
        enc = encoded if encoded is not None else encode_files(sch, train_data, work, valid=valid, test=test,
                                                               seed=data_seed, bad_rows=bad_rows, split=split,
                                                               **read_kwargs)
        if log:
            for name, rep in enc.reports.items():
                log(f"{name}: {rep.summary()}")
            log(f"encoded {enc.rows:,} rows in {enc.seconds:.1f}s; {enc.encoder.n_ids:,} ids")
        sources = {"train": train_data, "valid": train_data if valid is None else valid, "test": test}
        for name, part in (("train", "training"), ("valid", "validation"), ("test", "test")):
            data = enc.data.get(name)
            if data is not None:
                src = sources[name]
                check_labels(np.asarray(data.label), sch, str(src) if isinstance(src, (str, Path)) else "<frame>",
                             part)
        spec = FeatureSpec.from_encoder(enc.encoder)
        full_train = enc.data["train"]
        if np.asarray(full_train.label).ndim == 2 and (neg_sample_rate != 1.0 or loss != "bce" or teacher):
            raise ValueError("--neg-sample-rate, --loss weighted/focal and --distill apply to logs with one label")
        train_set = downsample_negatives(full_train, neg_sample_rate, seed)
        labels = np.asarray(train_set.label, dtype=np.float64)
        labels = labels if labels.ndim == 1 else labels[:, 0]  # clicks: the first label
        weights = None if train_set.weight is None else np.asarray(train_set.weight, dtype=np.float64)
        w = np.ones_like(labels) if weights is None else weights
        pos_mass, neg_mass = float(np.dot(w, labels)), float(np.dot(w, 1 - labels))
        if pos_weight == "auto":
            pw = neg_mass / pos_mass if loss == "weighted" and pos_mass > 0 else 1.0
        else:
            pw = float(pos_weight)
        shift = logit_shift(neg_sample_rate, pw if loss == "weighted" else 1.0)
        torchrec = embedding_backend == "torchrec"
        fit = can_fit_first_order(loss, neg_sample_rate, embedding_backend, train_set)
        auto = adaptive_settings(model, len(train_set), int(labels.sum()), enc.encoder.n_ids, fit=fit)
        if "emb_l2" in (model_options or {}):
            auto["model"].pop("linear_l2", None)  # the user's L2 covers the first-order weights too
        mopts = {**auto["model"], **(model_options or {})}
        if torchrec:  # a sharded table is only ever read at a batch's rows: no whole-table L2
            mopts.update(sparse_grad=True, emb_l2_scope="batch")
            if "emb_l2" in auto["model"] and "emb_l2" not in (model_options or {}):
                mopts.pop("emb_l2")  # the automatic value is a whole-table L2
        if embed_dim is not None:
            mopts["embed_dim"] = embed_dim
        mcfg = default_config(model, **mopts)
        topts = {**cls.train_defaults, **auto["train"], **(train_options or {}), **explicit}
        valid_set = enc.data.get("valid")
        labelled = train_set  # the first-order fit of a small log stays the exact fit of the labels
        if teacher is not None:
            train_set = distilled(train_set, teacher, enc.encoder, shift, distill_weight, device,
                                  distill_transfer, seed)
            if log:
                log(f"distilling from {distill} ({_teacher_name(teacher)}), weight {distill_weight}, "
                    f"{len(train_set) - len(labelled):,} transfer rows")
        first_order = auto.pop("first_order_fit")
        members, results, configs = [], [], []
        fits = first_order_fits if first_order_fits is not None else []
        for i in range(ensemble):
            net, tcfg, result = _train_member(
                model, spec, mcfg, train_set, valid_set, auto, topts, first_order, model_options,
                seed=seed + i, device=device, progress=progress, loss=loss, pos_weight=pw, logit_shift=shift,
                resume=resume, checkpoint_every=checkpoint_every, embedding_backend=embedding_backend,
                checkpoint_dir=str(Path(out) / "checkpoints" / (f"member{i}" if ensemble > 1 else "")) if out
                else None, n_ids=enc.encoder.n_ids, fits=fits, labelled=labelled,
                log=(lambda line, i=i: log(f"member {i + 1}/{ensemble}: {line}" if ensemble > 1 else line))
                if log else None, on_epoch=on_epoch)
            members.append(net)
            results.append(result)
            configs.append(tcfg)
        net = members[0] if ensemble == 1 else Ensemble(members)
        outputs = {name: _outputs(net, d, device) for name in ("valid", "test")
                   if (d := enc.data.get(name)) is not None and len(d)}
        if getattr(net, "multi_head", False):  # each head serves its own sigmoid
            if calibrate not in ("auto", "none"):
                raise ValueError(f"--calibrate {calibrate} applies to one-head models; {model} has "
                                 f"{len(spec.label_names)} heads")
            calibrator = Calibrator("none", shift)
        else:
            calibrator = _fit_calibration(calibrate, _first_head(outputs.get("valid")), shift, seed)
        if log:
            log(f"calibration: {calibrator.method} (asked: {calibrate}), fitted on the validation rows")
        metrics: dict[str, Any] = {name: served_metrics(o, calibrator, spec.label_names)
                                   for name, o in outputs.items()}
        for name, o in outputs.items():  # how new users, items, ... fare beside the rest (first head)
            first = _first_head(o)
            metrics[name]["cold_start"] = cold_start(first["label"], calibrator(first["logits"]),
                                                     enc.encoder.unseen(o["ids"]), o["weight"])
        if "valid" in outputs:  # what live pCTR is compared with for drift (PSI): the served (first-head) pCTR
            metrics["pctr_reference"] = reference_distribution(calibrator(_first_head(outputs["valid"])["logits"]))
        rows = np.sort(np.random.default_rng(seed).choice(len(full_train), min(len(full_train), REFERENCE_ROWS),
                                                          replace=False))
        metrics["feature_reference"] = feature_reference(enc.encoder, np.asarray(full_train.ids)[rows],
                                                         np.asarray(full_train.dense)[rows])
        metrics["train"] = {**_train_record(results), "rows": len(labelled), "config": configs[0].to_dict(),
                            "rows_before_sampling": len(full_train), "neg_sample_rate": neg_sample_rate,
                            "positives": int(labels.sum()), "auto": auto}
        if teacher is not None:
            metrics["train"]["distill"] = {"teacher": str(distill), "model": _teacher_name(teacher),
                                           "weight": distill_weight, "transfer_rows": len(train_set) - len(labelled),
                                           "transfer_swap": TRANSFER_SWAP,
                                           "teacher_test_auc": teacher.metrics.get("test", {}).get("auc")}
        metrics["calibration"] = calibrator.to_dict()
        metrics["encode"] = {"seconds": round(enc.seconds, 3), "rows": enc.rows, "n_ids": enc.encoder.n_ids,
                             "rows_per_s": round(enc.rows / enc.seconds, 1) if enc.seconds else None}
        metrics["data"] = {k: r.to_dict() for k, r in enc.reports.items()}
        if enc.encoder.snapshot is not None:
            metrics["encode"]["stats"] = enc.encoder.snapshot.describe()
        metrics["model"] = {"name": model, "config": net.config.to_dict(), "members": ensemble,
                            "parameters": int(sum(p.numel() for p in net.parameters()))}
        metrics["seconds"] = round(time.perf_counter() - t0, 3)
        net.to("cpu")
        bundle = Bundle(sch, enc.encoder, net, model, metrics, {"version": 1}, calibrator)
        if out and world().main:  # under torchrun, rank 0 writes the run's files
            bundle.save(Path(out) / "bundle")
            (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
            save_report_data(Path(out), {k: _first_head(o) for k, o in outputs.items()}, calibrator, enc.encoder,
                             report_by or [])
            render_report(Path(out))
        return Run(bundle=bundle, metrics=metrics, result=results[0], out=Path(out) if out else None,
                   reports={k: r.to_dict() for k, r in enc.reports.items()})
    except BaseException:
        # a failed run leaves no half-written output folder behind, unless a checkpoint to resume from is there
        if created and not any((Path(out) / "checkpoints").rglob("last.pt")):  # type: ignore[arg-type]
            shutil.rmtree(out, ignore_errors=True)  # type: ignore[arg-type]
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_distinct_files(train_data: Source, valid: Source | None, test: Source | None, log: Any) -> None:
    """Training rows given again as --valid or --test are an error (early stopping, the calibrator and the test
    figures need rows the model did not train on): the same file, or a file of a TRAIN folder of parts; the same
    file as both --valid and --test, a warning."""
    def parts(src: Source | None) -> set[Path]:
        if not isinstance(src, (str, Path)):
            return set()
        try:
            return {p.resolve() for p in data_parts(src)}
        except (OSError, DataError):  # the read names what is wrong with it
            return set()

    tr = parts(train_data)
    for flag, src in (("--valid", valid), ("--test", test)):
        if src is train_data and not isinstance(src, (str, Path)):  # the same frame object
            raise ValueError(f"{flag[2:]} is the training frame itself: early stopping, the calibrator and the "
                             "figures need rows the model did not train on")
        shared = sorted(parts(src) & tr)
        if shared:
            what = ("is the training file" if Path(str(src)).resolve() == Path(str(train_data)).resolve() else
                    f"shares {len(shared)} file(s) with TRAIN {train_data} (first: {shared[0]})")
            raise ValueError(f"{flag} {src} {what}: early stopping, the calibrator and the figures need rows the "
                             "model did not train on (without --valid the last 10% is held out)")
    va, te = parts(valid), parts(test)
    if va and va == te and log:
        log(f"warning: --valid and --test are the same file ({valid}): the test figures are those early stopping "
            "and the calibrator were chosen on, and overstate what the model will do on new rows")


def _train_member(model: str, spec: FeatureSpec, mcfg: Any, train_set: EncodedData, valid_set: EncodedData | None,
                  auto: dict[str, Any], topts: dict[str, Any], first_order: bool,
                  model_options: dict[str, Any] | None, *, n_ids: int, fits: list[Any], labelled: EncodedData,
                  log: Any, on_epoch: Any = None, **settings: Any) -> tuple[CTRModel, TrainConfig, TrainResult]:
    """Build and train one model (one member of an ensemble) with the seed and settings given; ``fits`` holds
    the run's first-order fit once a member has made it, which the next members start from; ``labelled``: the
    training rows with their labels, what that fit is made on (``train_set`` may hold a teacher's targets)."""
    seed = settings["seed"]
    torch.manual_seed(seed)
    # sharded tables larger than a small one are allocated only as shards, never whole in this process
    lazy = settings["embedding_backend"] == "torchrec" and n_ids * mcfg.embed_dim > SMALL_TABLE
    with tables_on("meta") if lazy else contextlib.nullcontext():
        net = build_model(model, spec, mcfg)
    tcfg = TrainConfig(**settings, **topts)
    # not with downsampling: there the fit served a mean pCTR 13-17% under the actual rate, also when its L2
    # was chosen by the served (corrected, negatives reweighted) out-of-fold logloss
    if (first_order and not {"emb_l2", "linear_l2"} & set(model_options or {})
            and not getattr(net, "multi_head", False)
            and any(isinstance(m, FeatureLinear) for m in net.modules())):
        net = _fit_first_order(model, spec, mcfg, tcfg, labelled, auto, fits)
    listeners = [f for f in ((lambda r: log(_epoch_line(r))) if log else None, on_epoch) if f is not None]

    def each_epoch(record: dict[str, Any]) -> None:
        for f in listeners:
            f(record)

    # the batch iterator decides whether the data becomes resident or streams from the memory map
    result = train_model(net, train_set, valid_set, tcfg, on_epoch=each_epoch if listeners else None)
    return net, tcfg, result


def _train_record(results: list[TrainResult]) -> dict[str, Any]:
    """The ``train`` block of metrics.json: the training record, or for an ensemble each member's under
    ``members`` with the totals of time, samples and epochs (``best_epoch`` is then each member's)."""
    if len(results) == 1:
        return results[0].to_dict()
    train_s = sum(r.train_seconds for r in results)
    return {"seconds": round(sum(r.seconds for r in results), 3), "train_seconds": round(train_s, 3),
            "samples_per_s": round(sum(r.samples for r in results) / train_s, 1) if train_s > 0 else float("nan"),
            "epochs": sum(r.epochs for r in results), "precision": results[0].precision,
            "best_epoch": [r.best_epoch for r in results], "monitor": results[0].monitor,
            "members": [r.to_dict() for r in results]}


def _fit_first_order(model: str, spec: FeatureSpec, mcfg: Any, tcfg: TrainConfig, train_set: EncodedData,
                     auto: dict[str, Any], fits: list[Any]) -> torch.nn.Module:
    """The model rebuilt with its first-order weights and their L2 fitted exactly (``ctrkit.training.first_order``),
    the fit recorded in ``auto``; or with the fit in ``fits`` (an ensemble's later members share the first's, so
    all members have one config; tuning's trials share one too)."""
    if not fits:
        fits.append(fit_first_order(spec, train_set, tcfg.pos_weight if tcfg.loss == "weighted" else 1.0,
                                    seed=tcfg.seed))
    fit = fits[0]
    torch.manual_seed(tcfg.seed)
    net = build_model(model, spec, replace(mcfg, linear_l2=fit.l2))
    load_first_order(net, fit.state)
    tcfg.init_bias = False  # the fitted bias is the right start
    tcfg.validate_start = True  # and the fit is kept when no epoch beats it (always so for `lr`, on most logs)
    if "first_order" not in auto:
        auto["model"]["linear_l2"] = fit.l2
        auto["first_order"] = fit.path
        auto["reasons"].append(f"first-order weights and their L2 {fit.l2:.2g} ({fit.l2 * len(train_set):g} / "
                               f"rows) fitted by L-BFGS on every training row, the L2 chosen by {FOLDS}-fold "
                               "cross-validated logloss on the training rows")
    return net


def _outputs(net: torch.nn.Module, data: EncodedData, device: str) -> dict[str, np.ndarray | None]:
    """What evaluation and the report need of one split: logits, labels, weights, groups, ids."""
    return {"logits": predict_logits(net, data, device=device), "label": np.asarray(data.label, np.float64),
            "weight": None if data.weight is None else np.asarray(data.weight, np.float64),
            "group": None if data.group is None else np.asarray(data.group), "ids": np.asarray(data.ids)}


def _teacher(path: str | Path, weight: float, transfer: float) -> Bundle:
    """The teacher bundle of ``--distill``, read before the data, so that a wrong path, weight or number of
    transfer rows fails at once."""
    if not 0.0 < weight <= 1.0:
        raise ValueError(f"--distill-weight must be in (0, 1], got {weight}")
    if not 0.0 <= transfer <= MAX_TRANSFER:
        raise ValueError(f"--distill-transfer must be in [0, {MAX_TRANSFER}] (transfer rows per training row), "
                         f"got {transfer}")
    teacher = Bundle.load(path)
    if getattr(teacher.model, "multi_head", False):
        raise ValueError(f"--distill {path}: the teacher has {len(teacher.model.spec.label_names)} heads; "
                         "distillation takes a one-head teacher")
    return teacher


def _teacher_name(teacher: Bundle) -> str:
    members = teacher.metrics.get("model", {}).get("members", 1)
    return f"{teacher.model_name} x{members}" if members > 1 else teacher.model_name


def distilled(data: EncodedData, teacher: Bundle, encoder: Any, shift: float, weight: float,
              device: str = "cpu", transfer: float = 0.0, seed: int = 0) -> EncodedData:
    """``data`` whose labels are ``(1 - weight) * label + weight * q``, q the teacher's probability of each row
    in the odds this run trains in (its served log-odds less ``shift``, the run's downsampling and class-weight
    correction), followed by ``transfer`` times as many transfer rows (:func:`transfer_rows`, drawn with
    ``seed``) whose targets are q alone. The teacher must encode rows as ``encoder`` does (the same training rows
    and schema; the run encodes with the teacher's seed), so that it reads the run's encoded rows as its own."""
    diff = teacher.encoder.difference(encoder)
    if diff is not None:
        raise DataError(f"--distill: the teacher's encoding is not this run's ({diff}); a teacher is trained on "
                        "the same training rows, with the same schema")

    def q(rows: EncodedData) -> np.ndarray:
        z = predict_logits(teacher.model.to(device), rows, device=device) + teacher.calibrator.shift - shift
        return 1.0 / (1.0 + np.exp(-z))

    rows = round(transfer * len(data))
    need, free = data.nbytes * (len(data) + rows) // max(len(data), 1), available_memory()
    if rows and free is not None and need > free // 2:  # both sets are held in memory while the run trains
        raise ValueError(f"--distill-transfer {transfer}: the training rows and {rows:,} transfer rows take "
                         f"{need / 2**30:.1f} GiB in memory, more than half of the {free / 2**30:.1f} GiB "
                         "available; ask for fewer (0: none)")
    label = np.asarray(data.label, dtype=np.float64)
    out = replace(data, label=((1.0 - weight) * label + weight * q(data)).astype(np.float32))
    if not rows:
        return out
    extra = transfer_rows(data, rows, TRANSFER_SWAP, seed)
    return out.concat(replace(extra, label=q(extra).astype(np.float32)))


def _fit_calibration(method: str, valid: dict[str, Any] | None, shift: float, seed: int) -> Calibrator:
    """The calibrator asked for, fitted on the validation outputs; only the exact shift without them."""
    if method == "none" or valid is None:
        if method not in ("none", "auto"):
            raise ValueError(f"--calibrate {method} needs validation rows to fit on")
        return Calibrator("none", shift)
    y = valid["label"]
    if y.min() == y.max():
        if method != "auto":
            raise ValueError(f"--calibrate {method}: the validation rows hold one class only")
        return Calibrator("none", shift)
    return fit_calibrator(method, valid["logits"], y, valid["weight"], shift=shift, seed=seed)


def _first_head(o: dict[str, Any] | None) -> dict[str, Any] | None:
    """The outputs of the first (click) head: logits and labels [n] (a one-head model of multi-label data is
    scored against the first label)."""
    if o is None:
        return None
    z, y = o["logits"], o["label"]
    return {**o, "logits": z if z.ndim == 1 else z[:, 0], "label": y if y.ndim == 1 else y[:, 0]}


def served_metrics(o: dict[str, Any], calibrator: Calibrator, names: tuple[str, ...] | list[str] = ()
                   ) -> dict[str, Any]:
    """Metrics of the served probabilities (per head for a multi-task model), plus ``logloss_raw``,
    ``ece_raw``, ``pred_actual_ratio_raw`` (and ``auc_raw``) of the network's own sigmoid of the first head,
    before any correction or calibration."""
    m = evaluate_heads(o["label"], calibrator(o["logits"]), names, o["group"], o["weight"])
    first = _first_head(o)
    raw = evaluate(first["label"], 1.0 / (1.0 + np.exp(-first["logits"])), None, o["weight"])
    m.update({f"{k}_raw": raw[k] for k in ("auc", "logloss", "ece", "pred_actual_ratio")})
    return m


def recalibrate(bundle: str | Path, data: Source, out: str | Path, method: str = "auto", seed: int = 0,
                **read_kwargs: Any) -> Bundle:
    """Refit the calibrator of ``bundle`` on newer labelled ``data`` and save a new bundle version at ``out``.

    The exact downsampling / class-weight shift is kept; the weights, encoder and schema are unchanged.
    """
    if method not in CALIBRATE_CHOICES:  # before the data is scored
        raise ValueError(f"--method must be one of {CALIBRATE_CHOICES}, got {method!r}")
    _check_new_version(bundle, out)
    b = Bundle.load(bundle)
    if getattr(b.model, "multi_head", False):
        raise ValueError(f"{bundle}: a calibrator applies to one-head models; this one has "
                         f"{len(b.model.spec.label_names)} heads")
    d = b.labelled_logits(data, **read_kwargs)
    cal = _fit_calibration(method, d, b.calibrator.shift, seed)
    cal.info["fitted_on"] = str(data) if isinstance(data, (str, Path)) else "frame"
    version = int(b.info.get("version", 1)) + 1
    metrics = {**b.metrics, "recalibration": {"data": cal.info["fitted_on"], "method": cal.method,
                                              "before": served_metrics(d, b.calibrator),
                                              "after_in_sample": served_metrics(d, cal)}}
    new = Bundle(b.schema, b.encoder, b.model, b.model_name, metrics,
                 {**b.info, "version": version, "parent": str(bundle)}, cal)
    new.save(out)
    return new


def _check_new_version(bundle: str | Path, out: str | Path) -> None:
    """A new bundle version goes to a folder of its own, never over the bundle it comes from."""
    if Path(out).resolve() == Path(bundle).resolve():
        raise ValueError(f"--out {out} is the bundle itself: write the new version to a folder of its own (the "
                         "server swaps it in with POST /admin/reload), so that this one stays to go back to")


def refresh_stats(bundle: str | Path, data: Source, out: str | Path, **read_kwargs: Any) -> Bundle:
    """Roll the rolling statistics of ``bundle`` forward over newer labelled ``data`` (the log since training, or
    since the last refresh) and save a new bundle version at ``out``: served rows then see their history up to
    the newest row, as each training row saw its own. Weights, calibrator, vocabularies and scaling are unchanged.
    ``data`` may be the event log of ``ctrkit serve``: its impressions with their attributed clicks, at the times
    they were served.
    """
    from ctrkit.serve.events import attributed_impressions, is_event_log

    _check_new_version(bundle, out)
    b = Bundle.load(bundle)
    report = ReadReport()
    rows = attributed_impressions(data, label=b.schema.label, time=b.schema.time) \
        if isinstance(data, (str, Path)) and is_event_log(data) else data
    encoder, changes = b.encoder.rolled(rows, report=report, **read_kwargs)
    assert encoder.snapshot is not None and b.encoder.snapshot is not None
    refresh = {"data": str(data) if isinstance(data, (str, Path)) else "frame", "rows": report.rows,
               "bad_rows": report.bad_rows, "as_of_before": b.encoder.snapshot.end,
               "as_of": encoder.snapshot.end, "stats": changes, "snapshot": encoder.snapshot.describe()}
    metrics = {**b.metrics, "stats_refresh": refresh}
    new = Bundle(b.schema, encoder, b.model, b.model_name, metrics,
                 {**b.info, "version": int(b.info.get("version", 1)) + 1, "parent": str(bundle)}, b.calibrator)
    new.save(out)
    return new


def can_fit_first_order(loss: str, neg_sample_rate: float, embedding_backend: str, data: EncodedData) -> bool:
    """Whether a run can fit the first-order term of a small log exactly: not with focal loss, downsampling,
    sharded tables or several labels (see :func:`adaptive_settings`)."""
    return (loss != "focal" and neg_sample_rate == 1.0 and embedding_backend != "torchrec"
            and np.asarray(data.label).ndim == 1)


def adaptive_settings(model: str, rows: int, positives: int, n_ids: int, fit: bool = True) -> dict[str, Any]:
    """Training and model settings chosen from the data: rows, positives and the size of the id space.

    ``fit``: whether the run can fit the first-order term of a small log exactly (not with downsampling, focal
    loss or several labels); where it cannot, the first-order weights get the rows rule's L2 instead.

    Explicit options override them; docs/training.md explains each rule. Returns ``{"train": ..., "model":
    ..., "reasons": [...]}``; the reasons go into metrics.json and the report.
    """
    train: dict[str, Any] = {"batch_size": default_batch_size(rows)}
    reasons = [f"batch {train['batch_size']}: about {SMALL_STEPS} updates per epoch on {rows:,} rows "
               "(4096 at most)"]
    cfg = default_config(model)
    mopts: dict[str, Any] = {}
    table_l2 = cfg.emb_l2_scope in ("auto", "table") and n_ids * cfg.embed_dim <= SMALL_TABLE
    small = table_l2 and rows < SMALL_LOG
    first_order = small and fit  # the pipeline fits it when the model has a first-order term
    if cfg.emb_l2 == 0.0 and table_l2 and not first_order:
        mopts["emb_l2"] = LR_L2_ROWS / max(rows, 1)
        reasons.append(f"L2 {mopts['emb_l2']:.2g} on the first-order weights ({LR_L2_ROWS:g} / rows): an "
                       "unregularised weight per id overfits ids seen a few times")
    elif small and not fit:
        mopts["linear_l2"] = LR_L2_ROWS / max(rows, 1)
        reasons.append(f"L2 {mopts['linear_l2']:.2g} on the first-order weights ({LR_L2_ROWS:g} / rows): under "
                       f"{SMALL_LOG:,} rows, where this run does not fit them exactly (downsampling, focal loss "
                       "or several labels), a fixed L2 tuned on larger logs leaves rare ids overfitted")
    if rows < SMALL_LOG and "hidden" in model_class(model).defaults:  # a model with an MLP
        mopts.update({"hidden": SMALL_HIDDEN, "dropout": SMALL_DROPOUT, "batch_norm": False})
        reasons.append(f"MLP {'-'.join(map(str, SMALL_HIDDEN))}, dropout {SMALL_DROPOUT}, no batch norm: fewer "
                       f"than {SMALL_LOG:,} training rows ({positives:,} clicks) cannot feed a 400-400 MLP, and "
                       "batch norm would rescale the embeddings that their L2 keeps small")
    return {"train": train, "model": mopts, "reasons": reasons, "first_order_fit": first_order}


SMALL_STEPS = 32  # updates per epoch that a small log still gets
LR_L2_ROWS = 20.0  # first-order L2 = LR_L2_ROWS / training rows (sklearn's C of about 0.05)
SMALL_LOG = 100_000  # training rows below which an MLP is made small and strongly regularised
SMALL_HIDDEN, SMALL_DROPOUT = (64, 64), 0.5


def default_batch_size(n_train: int, largest: int = 4096, steps: int = SMALL_STEPS) -> int:
    """4096, or the power of two that still gives about ``steps`` updates per epoch on small data (>= 64)."""
    if n_train >= largest * steps:
        return largest
    return max(64, 1 << max(int(n_train // steps).bit_length() - 1, 0))


def _epoch_line(r: dict[str, Any]) -> str:
    v = r.get("valid") or {}
    s = f"epoch {r['epoch']}: {r['samples_per_s']:,.0f} samples/s, lr {r['lr']:.0e}"
    if v:
        s += f", valid auc {v['auc']:.4f} logloss {v['logloss']:.4f}"
    return s
