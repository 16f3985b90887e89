"""Tiny data-parallel cases: run under torchrun (writes rank 0's results) or imported for the 1-process reference.

`python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_helpers/dp_cases.py OUT.pt`
runs every case with the torchrun ranks; `run_cases(SINGLE)` runs them in one process.
"""

from __future__ import annotations

import sys

import torch

from mim4dd_fast.data import load_dataset
from mim4dd_fast.distributed import SINGLE, Dist, init_from_env, shutdown  # noqa: F401 (SINGLE: the tests)
from mim4dd_fast.methods.mtt import MTTConfig, unroll_checkpointed
from mim4dd_fast.methods.registry import build_method  # noqa: F401 (tests use it too)
from mim4dd_fast.methods.shard import Shard
from mim4dd_fast.models import build_model, flatten_params

WIDTH = 8
MIM = {"n_real": 4, "head_width": 8, "lam": 1.0}
CONFIGS = {
    "dc": {"outer_loop": 2, "inner_loop": 1, "batch_real": 8, "width": WIDTH},
    "dm": {"batch_real": 8, "width": WIDTH},
    "mtt": {"syn_steps": 3, "expert_epochs": 1, "max_start_epoch": 2, "batch_syn": 7, "width": WIDTH,
            "lr_img": 100.0},
}


def fake_experts(dataset, n: int = 2, epochs: int = 3) -> list[torch.Tensor]:
    """Deterministic stand-in trajectories: a real initialisation plus growing noise per epoch."""
    kwargs = MTTConfig(width=WIDTH).model_kwargs(dataset)
    gen = torch.Generator().manual_seed(123)
    trajectories = []
    for e in range(n):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(e)
            theta = flatten_params(build_model(dataset.channels, dataset.num_classes, dataset.image_size, **kwargs))
        steps = [theta + 0.01 * k * torch.randn(theta.shape, generator=gen) for k in range(epochs + 1)]
        trajectories.append(torch.stack(steps))
    return trajectories


def _method(name: str, dataset, experts, dist: Dist):
    base = name.split("+")[0]
    return build_method(name, dataset, 2, config=dict(CONFIGS[base]), mim=dict(MIM) if "+mim" in name else None,
                        experts=experts if base == "mtt" else None, seed=7, dist=dist)


def run_cases(dist: Dist) -> dict[str, torch.Tensor]:
    """Every quantity the test compares, computed with ``dist``'s ranks (identical on every rank)."""
    dataset = load_dataset("digits")
    experts = fake_experts(dataset)
    out: dict[str, torch.Tensor] = {}
    # one raw unroll: loss, image gradient and step-size gradient
    mtt = _method("mtt", dataset, experts, dist)
    traj = experts[0]
    loss, g_img, g_lr = unroll_checkpointed(mtt.model, traj[0], traj[1], mtt.images, mtt.labels, mtt.syn_lr,
                                            mtt._plan(), shard=Shard(dist))
    out.update({"unroll/loss": loss, "unroll/g_img": g_img, "unroll/g_lr": g_lr})
    # two full iterations of each method: the images (and MTT's step size, the MIM heads) afterwards
    for name in ("mtt", "mtt+mim", "dc", "dm+mim", "dc+mim"):
        method = _method(name, dataset, experts, dist)
        losses = [method.step()["loss"] for _ in range(2)]
        out[f"{name}/images"] = method.images.detach().clone()
        out[f"{name}/loss"] = torch.tensor(losses, dtype=torch.float64)
        state = method.state_dict()
        if "syn_lr" in state:
            out[f"{name}/syn_lr"] = state["syn_lr"]
        if "optimizer" in state:
            out[f"{name}/momentum"] = state["optimizer"]["state"][0]["momentum_buffer"]
        if method.term is not None:
            out[f"{name}/heads"] = torch.cat([p.detach().reshape(-1) for p in method.term.parameters()])
    return out


def main(path: str) -> None:
    torch.set_num_threads(1)
    dist = init_from_env(60.0, "cpu")
    try:
        results = run_cases(dist)
        gathered = dist.all_gather_objects({k: v.clone() for k, v in results.items()}, "comparing ranks")
        if dist.is_main:
            # every rank must hold the same replica (else a later step would silently diverge)
            for other in gathered[1:]:
                for key, value in results.items():
                    assert torch.equal(value, other[key]), f"ranks disagree on {key}"
            torch.save({"world_size": dist.world_size, "results": results}, path)
    finally:
        shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
