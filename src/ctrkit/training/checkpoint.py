"""Atomic training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the model and optimizer states, every random generator (Python, NumPy, torch, the batch
iterator's shuffling), the position in the data (epoch and step) and the early-stopping state (best score,
best weights, epochs without improvement, learning rate, history). It is written to a temporary file in the
same folder, flushed to disk and renamed over the previous one, so a crash at any moment leaves the last
complete checkpoint in place. It is read back with ``torch.load(weights_only=True)``: tensors and plain
Python values only, nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "last.pt"


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
