"""The model zoo: every model composes the shared pieces in :mod:`ctrkit.nn`; look them up by name."""

from ctrkit.models import din, fm, linear, multitask  # noqa: F401  (registers the models)
from ctrkit.models.base import (CTRModel, ModelConfig, build_model, default_config, model_class, model_names,
                                register)

__all__ = ["CTRModel", "ModelConfig", "build_model", "default_config", "model_class", "model_names", "register"]
