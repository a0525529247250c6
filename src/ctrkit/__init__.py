"""ctrkit: click-through-rate prediction and measurement."""

__version__ = "0.1.0"
