"""Which code a benchmark ran: the commit, marked when the tracked files differ from it.

A benchmark run on another machine (the GPU machine gets a copy of the working tree beside an older ``.git``) would
otherwise record a commit whose code it did not run.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def source_commit(root: Path = ROOT) -> str:
    """``git rev-parse --short HEAD``, with "+changes" when tracked files differ from it; "unknown" without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        diff = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                              capture_output=True, text=True)
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+changes" if diff.stdout.strip() else "")
