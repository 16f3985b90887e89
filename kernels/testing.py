"""Comparisons for kernel tests and checks that cannot pass by accident.

An elementwise ``atol`` is blind when the values themselves are smaller than it (a contrastive
gradient at N = 4096 is ~1e-6 per entry, so an all-zero gradient passes ``atol=1e-5``). The relative
norm error ||got - want|| / ||want|| is scale-free: 1 for a zeroed result, 2 for a sign flip,
whatever the size.
"""

from __future__ import annotations

import torch

__all__ = ["rel_err", "assert_rel_close", "loss_and_grads", "check_against_float64",
           "reference_float64", "PRECISION_RTOL"]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (0 when both are zero, inf when only want is)."""
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        raise AssertionError(f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}")
    diff, scale = (got - want).norm().item(), want.norm().item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rtol: float, name: str = "value") -> float:
    """Raise AssertionError unless rel_err(got, want) <= rtol (NaN fails); returns the error."""
    err = rel_err(got, want)
    if not err <= rtol:
        raise AssertionError(f"{name}: relative norm error {err:.3e} > {rtol:.1e}")
    return err


# gradient tolerance of each precision mode against float64 (relative norm); the loss is held to
# the same bound. tf32 keeps 10 mantissa bits of each operand, bf16 keeps 7.
PRECISION_RTOL = {"ieee": 1e-4, "tf32x3": 1e-4, "tf32": 2e-2, "bf16": 5e-2}


def loss_and_grads(fn, a, b, ya, yb, **kw):
    """(loss, grad_a, grad_b) of ``fn`` on fresh leaves; reduction 'none' gets a non-uniform upstream
    gradient so per-anchor weighting is exercised."""
    a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
    loss = fn(a, b, ya, yb, **kw)
    weight = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype, device=loss.device) if loss.dim() else 1.0
    ga, gb = torch.autograd.grad((loss * weight).sum(), (a, b))
    return loss.detach(), ga, gb


def reference_float64(a, b, ya, yb, **kw):
    """(loss, grad_a, grad_b) of the plain reference on the same input values in float64."""
    from .reference import contrastive_loss_reference

    return loss_and_grads(contrastive_loss_reference, a.double(), b.double(), ya, yb, **kw)


def check_against_float64(fn, a, b, ya, yb, rtol: float, want=None, **kw) -> dict[str, float]:
    """Loss and both gradients of ``fn`` against the float64 reference on the same input values, each
    by relative norm; raises AssertionError naming the first one above ``rtol``. ``want`` may pass
    ``reference_float64(a, b, ya, yb, **kw)`` computed once for several checks."""
    want = reference_float64(a, b, ya, yb, **kw) if want is None else want
    got = loss_and_grads(fn, a, b, ya, yb, **kw)
    errors = {}
    for name, g, w in zip(("loss", "grad_a", "grad_b"), got, want, strict=True):
        if g.shape != w.shape:
            raise AssertionError(f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}")
        errors[name] = assert_rel_close(g, w, rtol, name)
    return errors
