"""Atomic training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the model and optimizer states, every random generator (Python, NumPy, torch, the batch
iterator's shuffling), the position in the data (epoch and step) and the early-stopping state (best score,
best weights, epochs without improvement, learning rate, history). It is written to a temporary file in the
same folder, flushed to disk and renamed over the previous one, so a crash at any moment leaves the last
complete checkpoint in place. It is read back with ``torch.load(weights_only=True)``: tensors and plain
Python values only, nothing is unpickled.

A folder holds a checkpoint of one of two kinds, both found through ``last.pt``:

- ``plain`` (ctrkit's own tables): ``last.pt`` holds everything, the whole model included, written by rank 0.
- ``torchrec`` (tables sharded by TorchRec, :mod:`ctrkit.training.sharded`): ``last.pt`` holds the same small
  state (position, random generators, dense optimizer, early stopping) and names a sibling folder
  ``sharded-*`` that every rank wrote its shards into with ``torch.distributed.checkpoint`` (DCP): the model's
  weights (each table as its row shards, the dense layers once), the fused table optimizer's state, sharded
  the same way, and the best weights so far. No rank ever holds a whole table. The shards are written first,
  into a folder of their own; renaming ``last.pt`` over the previous one is what commits them, and only then
  are older shard folders removed, so a crash while writing leaves the previous checkpoint whole. DCP
  reshards on load, so the checkpoint resumes on any number of ranks. DCP's own index (``.metadata``) is a
  pickle: it is read by an unpickler that builds only DCP's index classes, torch sizes, dtypes and layouts,
  so here too nothing else is unpickled.

:func:`check_backend` tells the two apart and says what a checkpoint is when it cannot be resumed.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctrkit.fsutil import fsync_dir

CHECKPOINT = "last.pt"
SHARDS = "sharded-"  # prefix of the folders that hold the DCP shards of a "torchrec" checkpoint


def rng_states() -> dict[str, Any]:
    """The global random states a training step draws from."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically to ``folder/last.pt`` (and its position, readable, to ``last.json``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CHECKPOINT
    fd, tmp = tempfile.mkstemp(prefix=".last-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    where = {k: state[k] for k in ("epoch", "step", "global_step", "epoch_done") if k in state}
    tmp_json = folder / ".last.json.tmp"
    tmp_json.write_text(json.dumps(where))
    os.replace(tmp_json, folder / "last.json")
    return target


def load_checkpoint(folder: str | Path) -> dict[str, Any] | None:
    """The last checkpoint in ``folder``, or None when there is none."""
    path = Path(folder) / CHECKPOINT
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a file that is not a checkpoint of this format
        raise RuntimeError(f"{path} is not a readable ctrkit checkpoint: {exc}") from exc


def backend_of(state: dict[str, Any]) -> str:
    """The embedding backend that wrote a checkpoint: "plain" (no ``backend`` key: every checkpoint written
    before sharded ones existed) or "torchrec"."""
    return str(state.get("backend", "plain"))


def describe(folder: str | Path, state: dict[str, Any]) -> str:
    """What the checkpoint in ``folder`` is, in words: its kind, who wrote it, where its weights are and where
    in the run it stands."""
    where = f"epoch {state.get('epoch')}, step {state.get('step')}"
    if backend_of(state) == "torchrec":
        return (f"a checkpoint of TorchRec-sharded tables (--embedding-backend torchrec), written by "
                f"{state.get('ranks', '?')} rank(s) at {where}, its shards in {Path(folder) / state['tables']}")
    return f"a checkpoint of ctrkit's plain tables (--embedding-backend plain), the whole model in one file, at {where}"


def check_backend(folder: str | Path, state: dict[str, Any], backend: str) -> None:
    """Raise a RuntimeError naming the file and the reason when the checkpoint in ``folder`` cannot be resumed
    with ``backend``: it was written by the other backend, or its shards are missing."""
    path = Path(folder) / CHECKPOINT
    saved = backend_of(state)
    if saved != backend:
        raise RuntimeError(f"{path} is {describe(folder, state)}; this run uses --embedding-backend {backend}. "
                           f"Resume it with --embedding-backend {saved} (the two keep their tables and optimizer "
                           "states in different forms), or start the run in another folder")
    if saved == "torchrec" and not (Path(folder) / state["tables"] / ".metadata").is_file():
        raise RuntimeError(f"{path} is {describe(folder, state)}, but that folder is missing or has no .metadata "
                           "(it was moved, deleted or not copied with last.pt): the checkpoint cannot be resumed")


def save_sharded_checkpoint(folder: str | Path, state: dict[str, Any], shards: dict[str, Any]) -> Path:
    """Write a "torchrec" checkpoint; every rank calls it (DCP writes collectively).

    ``shards`` is the DCP state dict (ShardedTensors, each rank writing its own shards; plain tensors, written
    once); ``state`` is the small rest, written by rank 0 into ``last.pt``, which commits the checkpoint.
    Returns the path of ``last.pt``.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    main = not dist.is_initialized() or dist.get_rank() == 0
    name = f"{SHARDS}e{state['epoch']}-s{state['step']}-g{state['global_step']}"
    target = folder / name
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        if target.exists():  # left by a run that died before committing it: never what last.pt names
            shutil.rmtree(target)
    _barrier()
    dcp.save(shards, checkpoint_id=target)  # returns on every rank once .metadata is written
    path = folder / CHECKPOINT
    if main:
        fsync_dir(target)
        path = save_checkpoint(folder, {**state, "backend": "torchrec", "tables": name,
                                        "ranks": dist.get_world_size() if dist.is_initialized() else 1})
        for old in folder.glob(f"{SHARDS}*"):  # committed: the shards of earlier checkpoints can go
            if old.name != name and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def load_sharded_checkpoint(folder: str | Path, state: dict[str, Any], shards: dict[str, Any]) -> None:
    """Read the shards of the "torchrec" checkpoint ``state`` (from :func:`load_checkpoint`) into ``shards``, in
    place; every rank calls it and gets the rows its ShardedTensors hold, whatever the ranks that wrote them."""
    import torch.distributed.checkpoint as dcp

    target = Path(folder) / state["tables"]
    try:
        dcp.load(shards, storage_reader=_reader(target))
    except (Exception, dcp.CheckpointException) as exc:  # a missing, partial, foreign or crafted shard folder
        reason = (" | ".join(f"rank {r}: {e}" for r, (e, _) in exc.failures.items())
                  if isinstance(exc, dcp.CheckpointException) else str(exc))
        raise RuntimeError(f"{target} (named by {Path(folder) / CHECKPOINT}) could not be read as the shards of "
                           f"{describe(folder, state)}: {reason}") from exc


_INDEX_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                  ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict"),
                  ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` index, refusing any global but its own data classes, torch sizes and dtypes
    (so that a crafted index cannot run code, as ``torch.load(weights_only=True)`` guarantees for ``last.pt``)."""

    def find_class(self, module: str, name: str) -> Any:
        # decided on the names, before anything is imported (importing a module can run code)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _INDEX_GLOBALS or module == "torch.distributed.checkpoint.metadata":
            found = super().find_class(module, name)
            if isinstance(found, type) or (module, name) in _INDEX_GLOBALS:
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


def _reader(path: Path) -> Any:
    """DCP's file-system reader of the shards in ``path``, reading its index with :class:`_IndexUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            index = path / ".metadata"
            metadata = _IndexUnpickler(io.BytesIO(index.read_bytes())).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(path)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
