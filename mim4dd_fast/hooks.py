"""FeatureTap: forward hooks that keep only the pooled feature of each tapped layer.

MIM4DD compares layer-wise features of synthetic and real images. Keeping the full feature maps
(B x C x H x W per layer) would double the activation memory of a forward pass, so each hook
immediately reduces its module's output with ``feature_reduce`` (adaptive average pooling to
p x p, optional cast, saving nothing of the input for backward) and stores only that [B, C*p*p]
tensor. Module hooks also fire under ``torch.func.functional_call``, so the same tap works for
MTT's student run from a flat parameter vector.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .kernels import feature_reduce


def valid_tap_names(model: nn.Module) -> list[str]:
    """Layers a tap may name: the model's ``tap_names`` if it declares them, else every named module."""
    names = getattr(model, "tap_names", None)
    if names is not None:
        return list(names)
    return [name for name, _ in model.named_modules() if name]


def resolve_layers(model: nn.Module, layers: list[str] | None) -> list[str]:
    """``layers`` checked against the model (None = all of ``model.tap_names``); ConfigError if unknown."""
    valid = valid_tap_names(model)
    if layers is None:
        if getattr(model, "tap_names", None) is None:
            raise ConfigError("The model declares no tap_names; give the layers to tap explicitly.")
        return valid
    layers = list(layers)
    if not layers:
        raise ConfigError(f"The list of layers to tap is empty; choose from: {', '.join(valid)}.")
    for name in layers:
        if name not in valid:
            raise ConfigError(f"Unknown layer {name!r} to tap; valid layers are: {', '.join(valid)}.")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"A layer is listed twice in the layers to tap: {layers}.")
    return layers


class FeatureTap:
    """Context manager: while active, record ``feature_reduce(output, p)`` of each named layer.

    ``tap.features`` maps layer name -> [B, C*p*p] (the last forward's value, in tap order);
    ``tap.clear()`` forgets them between the synthetic and the real pass. Hooks are removed on
    exit, also when the body raises. Run the real side under ``torch.no_grad()`` so no graph
    through the network is kept for it.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[str] | None = None,
        p: int = 2,
        out_dtype: torch.dtype | None = None,
        mode: str = "fused",
    ) -> None:
        if mode not in ("fused", "naive"):
            raise ConfigError(f"Unknown tap mode {mode!r}; choose 'fused' or 'naive'.")
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ConfigError(f"The pooled feature size p must be an integer of at least 1, got {p!r}.")
        self.model = model
        self.layers = resolve_layers(model, layers)
        self.p = p
        self.out_dtype = out_dtype
        self.mode = mode  # "naive" keeps the full map and pools on access: the baseline we beat
        self._features: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs, output: Tensor) -> None:
            if not isinstance(output, Tensor) or output.dim() not in (2, 4):
                raise ConfigError(f"Layer {name!r} outputs neither a [B, C, H, W] feature map nor a [B, D] vector, "
                                  "so it cannot be tapped.")
            if output.dim() == 2:  # already a vector per image (e.g. a Linear or Flatten layer): kept as it is
                self._features[name] = output if self.out_dtype is None else output.to(self.out_dtype)
            elif self.mode == "naive":
                self._features[name] = output
            else:
                self._features[name] = feature_reduce(output, self.p, out_dtype=self.out_dtype)

        return hook

    def __enter__(self) -> FeatureTap:
        if self._handles:
            raise RuntimeError("FeatureTap is already active; it cannot be entered twice.")
        modules = dict(self.model.named_modules())
        try:
            for name in self.layers:
                self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this tap registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def features(self) -> dict[str, Tensor]:
        """Layer name -> reduced feature [B, C*p*p] of the last forward pass, in tap order."""
        missing = [name for name in self.layers if name not in self._features]
        if missing:
            raise RuntimeError(f"FeatureTap saw no forward pass through layer(s) {missing}.")
        if self.mode == "naive":  # full maps were kept; pooling here makes autograd save them too
            return {name: self._reduce_naive(f) if f.dim() == 4 else f
                    for name, f in ((n, self._features[n]) for n in self.layers)}
        return {name: self._features[name] for name in self.layers}

    def _reduce_naive(self, x: Tensor) -> Tensor:
        out = torch.nn.functional.adaptive_avg_pool2d(x, self.p).flatten(1)
        return out if self.out_dtype is None else out.to(self.out_dtype)

    def clear(self) -> None:
        """Drop the recorded features (call between the synthetic and the real pass)."""
        self._features.clear()
