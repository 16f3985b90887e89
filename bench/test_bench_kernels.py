"""pytest-benchmark timings of the contrastive loss (forward + backward) at small sizes.

Not part of CI's test command (testpaths = tests); run explicitly:
    pytest bench/test_bench_kernels.py --benchmark-enable
"""

import pytest
import torch
from mim4dd_fast.kernels import contrastive_loss
from mim4dd_fast.kernels.reference import contrastive_loss_reference


def _inputs(N, D):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(N, D, generator=g, requires_grad=True)
    b = torch.randn(N, D, generator=g, requires_grad=True)
    ya = torch.randint(0, 10, (N,), generator=g)
    yb = torch.randint(0, 10, (N,), generator=g)
    return a, b, ya, yb


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("N, D", [(256, 64), (1024, 128)])
def test_contrastive_forward_backward(benchmark, impl, N, D):
    a, b, ya, yb = _inputs(N, D)
    if impl == "reference":
        fn = lambda: contrastive_loss_reference(a, b, ya, yb)
    else:
        fn = lambda: contrastive_loss(a, b, ya, yb, impl="chunked")

    def step():
        loss = fn()
        ga, gb = torch.autograd.grad(loss, (a, b))
        return loss

    loss = benchmark(step)
    want = contrastive_loss_reference(a, b, ya, yb)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
