"""ctrkit: click-through-rate prediction and measurement.

The Python API in one line each: :class:`Schema` names the columns, :class:`Encoder` turns them into ids,
:func:`train` goes from raw files to a saved bundle, and ``Bundle.load(path).predict(records)`` scores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Bundle", "Encoder", "Field", "Schema", "train"]

if TYPE_CHECKING:
    from ctrkit.data.encode import Encoder
    from ctrkit.pipeline import train
    from ctrkit.schema import Field, Schema
    from ctrkit.serve.bundle import Bundle

_LAZY = {"Schema": "ctrkit.schema", "Field": "ctrkit.schema", "Encoder": "ctrkit.data.encode",
         "Bundle": "ctrkit.serve.bundle", "train": "ctrkit.pipeline"}


def __getattr__(name: str) -> Any:
    """Import the public names on first use, so `import ctrkit` stays light (no torch until needed)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ctrkit' has no attribute {name!r}")
