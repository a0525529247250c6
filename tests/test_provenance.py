"""bench/provenance.py: the commit a benchmark ran, marked when the tracked files differ from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from provenance import source_commit  # noqa: E402


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_source_commit_names_head_and_marks_changed_tracked_files(tmp_path: Path) -> None:
    assert source_commit(tmp_path) == "unknown"  # not a repository
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@example.com")
    git(tmp_path, "config", "user.name", "t")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "commit", "-q", "-m", "one")
    head = git(tmp_path, "rev-parse", "--short", "HEAD")
    assert source_commit(tmp_path) == head
    (tmp_path / "new.txt").write_text("untracked files do not count\n")
    assert source_commit(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    (tmp_path / ".gitignore").write_text("*.log\n")
    (tmp_path / "run.log").write_text("ignored files are not code\n")
    said = source_commit(tmp_path)
    assert git(tmp_path, "status", "--porcelain", "--untracked-files=no") == "M a.py"  # the index is untouched
    # the tree id is that of the commit these files become: how a run on a copy with an older .git is traced
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "two")
    assert said == f"{head}+changes, tree {git(tmp_path, 'rev-parse', '--short=7', 'HEAD^{tree}')}"
