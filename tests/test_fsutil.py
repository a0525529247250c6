"""fsync_dir flushes a folder that exists and names the one that does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctrkit.fsutil import fsync_dir


def test_fsync_dir_on_a_folder_and_a_missing_one(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    fsync_dir(tmp_path)  # a folder holding a new file: flushed without error
    with pytest.raises(FileNotFoundError, match="gone"):
        fsync_dir(tmp_path / "gone")
