"""Bounds checked before any work: seeds, float32-representable numbers, and memory.

A run that cannot work is refused up front with one sentence, instead of failing after minutes with
an allocation traceback (or being killed by the kernel without a word). The memory check compares a
*lower bound* of what the largest tensors need (the dataset at its final size, the synthetic set, one
network forward, MTT's unrolled parameter vectors and expert trajectories, the MIM heads and features,
the evaluation nets) with the memory available now; it refuses only when that lower bound alone does
not fit, so it never refuses a run that could have worked. See docs/reliability.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

# Seeds: one range for every command. seed + k offsets (expert k, evaluation net i, ablation cells) stay far
# inside torch's generator range [0, 2^64), and numpy's legacy seeding takes the same 32-bit range.
SEED_MAX = 2**32 - 1

FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32: anything smaller flushes towards 0
BYTES = 4  # float32

# Native size of the built-in datasets (all splits together): (images, channels, side, classes).
KNOWN_DATASETS = {
    "digits": (1797, 1, 8, 10),
    "mnist5k": (5000, 1, 28, 10),
    "cifar10": (60000, 3, 32, 10),
    "cifar100": (60000, 3, 32, 100),
    "mnist": (70000, 1, 28, 10),
    "fashion-mnist": (70000, 1, 28, 10),
    "fashionmnist": (70000, 1, 28, 10),
}


def check_seed(seed: Any, what: str = "seed") -> int:
    """The seed as an int in [0, SEED_MAX]; a ConfigError (one sentence) otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"{what} must be an integer in [0, {SEED_MAX}], got {short(repr(seed))}.")
    return seed


def check_float32(value: float, name: str) -> None:
    """Every tensor is float32: a setting it cannot represent (1e308, 1e-300) would overflow to inf or
    flush to 0 inside the run, where the NaN it causes no longer names the setting."""
    magnitude = abs(float(value))
    if magnitude > FLOAT32_MAX or 0.0 < magnitude < FLOAT32_TINY:
        raise ConfigError(f"Setting {name} = {value!r} cannot be represented in float32, the precision every "
                          f"tensor is computed in; use a value whose magnitude is 0 or in "
                          f"[{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.3g}].")


def short(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters (a 50 MB value must not make a 50 MB message)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def human_bytes(n: float) -> str:
    for unit, scale in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{int(n)} B"


# -- memory ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Need:
    """One tensor (or group) of a run and a lower bound of its bytes."""

    what: str
    bytes: int


def convnet_params(channels: int, classes: int, image_size: int, width: int, depth: int,
                   norm: str = "instancenorm") -> int:
    """Parameter count of models.ConvNet, from its formula (no allocation)."""
    size = 32 if image_size == 28 else image_size
    total, in_ch = 0, channels
    for _ in range(depth):
        total += in_ch * width * 9 + width + (2 * width if norm == "instancenorm" else 0)
        in_ch = width
    side = size >> depth
    return total + width * side * side * classes + classes


def forward_bytes(images: int, width: int, image_size: int) -> int:
    """Activations one ConvNet forward keeps for backward: at least conv, norm and ReLU outputs of the
    first block (width x side x side floats each) per image."""
    side = 32 if image_size == 28 else image_size
    return 3 * images * width * side * side * BYTES


def available_bytes(device: str = "cpu") -> int | None:
    """Memory free now on ``device`` (CPU: the smaller of the system's and the cgroup's); None if unknown."""
    if str(device).startswith("cuda"):
        try:
            import torch

            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # no driver, another process holds the device: do not guess
            return None
    free = []
    try:
        import psutil

        free.append(int(psutil.virtual_memory().available))
    except Exception:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            free.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(free) if free else None


def check_memory(needs: list[Need], device: str, advice: str) -> None:
    """ConfigError naming the estimate and its largest part when the lower bound exceeds what is free."""
    total = sum(n.bytes for n in needs)
    if total <= 0:
        return
    free = available_bytes(device)
    if free is None or total <= free:
        return
    largest = max(needs, key=lambda n: n.bytes)
    where = "GPU memory" if str(device).startswith("cuda") else "memory"
    raise ConfigError(f"This needs at least {human_bytes(total)} of {where} (largest: {largest.what}, "
                      f"{human_bytes(largest.bytes)}) but only {human_bytes(free)} is available; {advice}.")


def _count_image_files(path: Path, limit: int = 10_000_000) -> int:
    """Files under ``path`` (at most three levels: split/class/file), without reading any."""
    count = 0
    for _root, dirs, files in os.walk(path):
        count += len(files)
        if _root.count(os.sep) - str(path).count(os.sep) >= 2:
            dirs[:] = []
        if count >= limit:
            break
    return max(count, 1)


def data_needs(name: str, data_dir: str | None, image_size: int | None) -> list[Need]:
    """The dataset's images at their final size, float32 (what loading will allocate), before loading."""
    key = str(name).strip().lower()
    if key.startswith("imagefolder"):
        path = str(name).strip().split(":", 1)[1] if ":" in str(name) else (data_dir or "")
        if not path or not Path(path).is_dir():
            return []  # the loader says what is wrong with the path
        n, c, side = _count_image_files(Path(path)), 1, image_size or 32
    elif key in KNOWN_DATASETS:
        n, c, side, _ = KNOWN_DATASETS[key]
        side = image_size or side
    else:
        return []
    return [Need(f"the {name} images at {side}x{side}", n * c * side * side * BYTES)]


def check_data_memory(name: str, data_dir: str | None, image_size: int | None) -> None:
    check_memory(data_needs(name, data_dir, image_size), "cpu", "lower --image-size (image_size)")


def method_needs(settings: Any, dataset: Any) -> list[Need]:
    """Lower bounds of the largest tensors a run of ``settings`` holds on ``dataset`` (already loaded)."""
    run, cfg = settings.run, settings.method_config
    c, side, k = dataset.channels, dataset.image_size, dataset.num_classes
    n_syn = k * run.ipc
    needs = [Need("the synthetic images, their gradient and momentum", 3 * n_syn * c * side * side * BYTES)]
    kwargs = cfg.model_kwargs(dataset) if hasattr(cfg, "model_kwargs") else {}
    width, depth = int(kwargs.get("width", 128)), int(kwargs.get("depth", 1))
    params = convnet_params(c, k, side, width, depth)
    needs.append(Need(f"the width-{width} ConvNet's {params} parameters and their gradient", 2 * params * BYTES))
    per_forward = max(int(getattr(cfg, "batch_real", 0) or 0), min(int(getattr(cfg, "batch_syn", 0) or n_syn), n_syn))
    needs.append(Need(f"one forward of {per_forward} images through the width-{width} ConvNet",
                      forward_bytes(per_forward, width, side)))
    steps = int(getattr(cfg, "syn_steps", 0) or 0)
    if steps:
        needs.append(Need(f"{steps} unrolled student parameter vectors ({params} parameters each)",
                          steps * params * BYTES))
    plan_for = settings.choice.spec.expert_plan
    if plan_for is not None:
        epochs = run.expert_epochs or plan_for(cfg, dataset).epochs
        needs.append(Need(f"{run.num_experts} expert trajectories of {epochs + 1} x {params} parameters",
                          run.num_experts * (epochs + 1) * params * BYTES))
    mim = settings.mim
    if mim is not None:
        layers = len(mim.layers) if mim.layers else depth
        in_dim = width * mim.pool * mim.pool
        head = in_dim * mim.head_width + (mim.head_width**2 if mim.head == "mlp" else 0)
        if mim.head == "identity":
            head = 0
        sets = 2 if mim.head_sharing == "separate" else 1
        needs.append(Need(f"the MIM heads (pool {mim.pool}, head_width {mim.head_width}) with their optimizer",
                          4 * sets * layers * head * BYTES))
        needs.append(Need(f"the pooled MIM features of {layers} layers",
                          layers * (n_syn + mim.n_real * k) * in_dim * BYTES))
    ev = settings.eval
    needs.append(Need(f"one evaluation forward (width {ev.width})",
                      forward_bytes(min(ev.batch_size, n_syn), ev.width, side)))
    return needs


def check_run_memory(settings: Any, dataset: Any, device: str) -> None:
    check_memory(method_needs(settings, dataset), device,
                 "lower the sizes it names (image_size, width, batch sizes, syn_steps, pool, head_width, num_experts)")


def expert_needs(dataset: Any, *, num_experts: int, epochs: int, batch_size: int, model_kwargs: dict) -> list[Need]:
    """The expert command's largest tensors: the net and its gradient, one trajectory, one batch forward."""
    width, depth = int(model_kwargs["width"]), int(model_kwargs["depth"])
    params = convnet_params(dataset.channels, dataset.num_classes, dataset.image_size, width, depth)
    batch = min(batch_size, int(dataset.x_train.shape[0]))
    return [Need(f"a width-{width} ConvNet ({params} parameters) and its gradient", 2 * params * BYTES),
            Need(f"one trajectory of {epochs + 1} x {params} parameters", (epochs + 1) * params * BYTES),
            Need(f"one forward of {batch} images", forward_bytes(batch, width, dataset.image_size))]
