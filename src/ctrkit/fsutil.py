"""File-system durability shared by the event log and the training checkpoints."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries to disk, so a file created or renamed in it survives a crash (fsyncing a file
    does not record its name in the folder)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
