"""The model zoo: every model composes the shared pieces in :mod:`ctrkit.nn`; look them up by name."""

from ctrkit.models import (autoint, dcn, deep, din, dlrm, fat, ffm, fibinet, final, fm, gbdt_lr,  # noqa: F401
                           linear, multitask, xdeepfm)  # importing registers the models
from ctrkit.models.base import (CTRModel, ModelConfig, build_model, default_config, model_class, model_names,
                                register)

__all__ = ["CTRModel", "ModelConfig", "build_model", "default_config", "model_class", "model_names", "register"]
