"""Distillation methods (DC, DM, MTT) and the MIM4DD term; ``build_method`` builds one by name."""

from .base import AuxTerm, DistillMethod
from .registry import METHODS, build_method, canonical_name, config_class, method_names, register, resolve
from .spec import ExpertPlan, MethodSpec

__all__ = ["AuxTerm", "DistillMethod", "ExpertPlan", "METHODS", "MethodSpec", "build_method", "canonical_name",
           "config_class", "method_names", "register", "resolve"]
