"""Distillation methods (DC, DM, MTT) and the MIM4DD term; ``build_method`` builds one by name."""

from .base import AuxTerm, DistillMethod
from .registry import METHOD_NAMES, build_method, canonical_name, config_class

__all__ = ["AuxTerm", "DistillMethod", "METHOD_NAMES", "build_method", "canonical_name", "config_class"]
