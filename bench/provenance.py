"""Which code a benchmark ran: the commit, marked when the tracked files differ from it; and the JSON record of a
run, stamped with it.

A benchmark run on another machine (the GPU machine gets a copy of the working tree beside an older ``.git``) would
otherwise record a commit whose code it did not run. Then the tree id of the files it ran is recorded too: the
tree of the commit they were copied from, found with ``git log --all --format='%h %t' | grep TREE``.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _git(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, env=env)


def working_tree_id(root: Path = ROOT) -> str | None:
    """The git tree id of the files under ``root`` that git does not ignore, as ``git add -A && git write-tree``
    would give, without touching the repository's index; None without git."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": os.path.join(tmp, "index")}
        try:
            if _git(root, "add", "-A", ".", env=env).returncode != 0:
                return None
            tree = _git(root, "write-tree", env=env)
        except OSError:
            return None
    return tree.stdout.strip()[:7] if tree.returncode == 0 else None


def source_commit(root: Path = ROOT) -> str:
    """``git rev-parse --short HEAD``; when tracked files differ from it, "+changes" and the tree id of the files
    (:func:`working_tree_id`); "unknown" without git."""
    try:
        head = _git(root, "rev-parse", "--short", "HEAD")
        diff = _git(root, "status", "--porcelain", "--untracked-files=no")
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    if not diff.stdout.strip():
        return head.stdout.strip()
    tree = working_tree_id(root)
    return head.stdout.strip() + "+changes" + (f", tree {tree}" if tree else "")


def write_record(path: Path, record: dict[str, Any], root: Path = ROOT) -> None:
    """Write a benchmark's JSON record to ``path`` (its folder made), with the commit it ran unless the record
    names one, and say where."""
    record.setdefault("commit", source_commit(root))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=float))
    print(f"wrote {path}")
