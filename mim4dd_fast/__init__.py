"""mim4dd_fast: fast, measured dataset distillation built around MIM4DD."""

__version__ = "0.1.0"
