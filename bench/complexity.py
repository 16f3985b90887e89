"""Analytic cost model of DC, DM, MTT and MIM4DD (FLOPs and memory per iteration), checked against
FlopCounterMode and the saved-for-backward counter in the same run.

    python bench/complexity.py                      # the default grid, model vs measured, PNG plots
    python bench/complexity.py --quick --out DIR    # a small grid (seconds)

FLOPs follow FlopCounterMode's convention: convolutions and matmuls (forward and backward), plus the
custom contrastive op's registered formula; norms, pooling and elementwise ops count zero. The unit
of work is one image through one layer's forward: c_k = 2 * Cin * Cout * 9 * H_k * W_k per conv
(H_k its output side) and l = 2 * embed * classes for the classifier. Every pass is a count of such
units per image (see UNITS). Memory is the peak of bytes held for backward (each storage once), the
CPU figure the suite reports; per-image activation counts are in ``activation_floats``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Parser, random_dataset, random_experts  # noqa: E402

# Units of work per image, as (layer 0, each deeper conv, classifier): how many forward-sized
# convolutions / matmuls each pass runs. Derived from which gradients each pass needs, and checked
# against FlopCounterMode (tests/test_complexity.py):
UNITS = {
    "forward": (1, 1, 1),
    # forward + backward for the weights; the images need no gradient, layer 0 skips grad-input
    "train": (2, 3, 3),
    # forward + backward into the images through frozen weights (grad-input only)
    "to_input": (2, 2, 0),
    # forward + create_graph backward for the weights, then backward of that into the images (DC's
    # synthetic side); torch's convolution double backward runs 4 convolutions per deeper layer
    "double": (5, 8, 7),
    # MTT full unroll, first student step (theta_0 is a constant) and every later step
    "mtt_full_first": (5, 8, 7),
    "mtt_full": (6, 9, 9),
    # MTT checkpointed: forward pass (forward + grad) and the backward pass (recompute + create_graph
    # grad + vector-Hessian product into theta and the images)
    "mtt_ckpt": (8, 12, 12),
}

METHODS = ("dc", "dm", "mtt", "dc+mim", "dm+mim", "mtt+mim")


@dataclass
class CostSetting:
    """Everything the cost of one distillation iteration depends on."""

    method: str = "mtt"
    ipc: int = 1
    classes: int = 10
    channels: int = 3
    image_size: int = 32
    width: int = 128
    depth: int = 3
    # MTT
    syn_steps: int = 20
    batch_syn: int | None = None  # None: all synthetic images each student step
    unroll: str = "checkpointed"  # checkpointed | full
    # DC / DM
    batch_real: int = 256  # real images per class per matching step
    outer_loop: int = 1
    inner_loop: int = 1
    batch_train: int = 256
    # MIM
    n_real: int = 32  # real images per class for the term
    tapped: tuple[int, ...] | None = None  # tapped block indices; None = every block
    head: str = "linear"  # identity | linear | mlp
    head_width: int = 128
    pool: int = 2
    contrastive: str = "fused"  # fused | reference
    dsa: bool = True

    @property
    def n_syn(self) -> int:
        return self.ipc * self.classes

    @property
    def base(self) -> str:
        return self.method.split("+")[0]

    @property
    def mim(self) -> bool:
        return self.method.endswith("+mim")


# -- architecture ---------------------------------------------------------------------------------


def conv_geometry(s: CostSetting) -> list[tuple[int, int, int, int]]:
    """(Cin, Cout, H_out, H_in) of each conv; 28x28 inputs are padded to 32 as in models.ConvNet."""
    size = 32 if s.image_size == 28 else s.image_size
    out, cin, h, h_in = [], s.channels, size, s.image_size
    for _ in range(s.depth):
        out.append((cin, s.width, h, h_in))
        cin, h_in, h = s.width, h // 2, h // 2
    return out


def embed_dim(s: CostSetting) -> int:
    size = 32 if s.image_size == 28 else s.image_size
    return s.width * (size >> s.depth) ** 2


def conv_flops(s: CostSetting) -> list[int]:
    """Forward FLOPs per image of each conv: 2 * Cin * Cout * 9 * H * W."""
    return [2 * cin * cout * 9 * h * h for cin, cout, h, _ in conv_geometry(s)]


def linear_flops(s: CostSetting) -> int:
    return 2 * embed_dim(s) * s.classes


def convnet_forward_flops(s: CostSetting, embed_only: bool = False) -> int:
    """FLOPs of one image through the ConvNet (without the classifier when ``embed_only``)."""
    return sum(conv_flops(s)) + (0 if embed_only else linear_flops(s))


def num_params(s: CostSetting) -> int:
    """Parameters of the ConvNet: conv weight+bias, GroupNorm weight+bias, classifier."""
    p = sum(cin * cout * 9 + cout + 2 * cout for cin, cout, _, _ in conv_geometry(s))
    return p + embed_dim(s) * s.classes + s.classes


def units(s: CostSetting, u: tuple[int, int, int], upto: int | None = None) -> int:
    """FLOPs per image of a pass with per-layer unit counts ``u`` (convs deeper than ``upto`` skipped)."""
    c = conv_flops(s)
    upto = len(c) - 1 if upto is None else upto
    return u[0] * c[0] + u[1] * sum(c[1 : upto + 1]) + u[2] * linear_flops(s)


def activation_floats(s: CostSetting, kind: str) -> int:
    """Floats held for backward per image by one pass (each storage once).

    train:    each conv keeps its input, GroupNorm its input (the conv output) and two stats per
              channel, ReLU its output (shared with the pool); the classifier its input, CE its output.
    frozen:   weights need no gradient (DM, the MIM term): the same tensors (autograd's convolution
              keeps its input even then) without the classifier's.
    step:     a create_graph step (MTT student step, DC's synthetic side): the forward's tensors plus
              the gradients kept for the double backward: 4 C H^2 per block, the pooled output, and
              16 floats per channel of statistics.
    """
    geo = conv_geometry(s)
    if kind == "train":
        return sum(cin * hi * hi + 2 * c * h * h + 2 * c for cin, c, h, hi in geo) + embed_dim(s) + s.classes
    if kind == "frozen":
        return sum(cin * hi * hi + 2 * c * h * h + 2 * c for cin, c, h, hi in geo)
    if kind == "step":
        cin0, _, _, hi0 = geo[0]
        return cin0 * hi0 * hi0 + sum(4 * c * h * h + c * (h // 2) ** 2 + 16 * c for _, c, h, _ in geo) + s.classes
    raise ValueError(kind)


def dsa_floats(s: CostSetting) -> int:
    """DSA on an image that needs a gradient keeps about two image-sized tensors (grid + sampled input)."""
    return 2 * s.channels * s.image_size**2 if s.dsa else 0


def step_sizes(s: CostSetting) -> list[int]:
    """Images in each MTT student step: shuffled chunks of batch_syn, the last chunk smaller."""
    n = s.n_syn
    b = min(s.batch_syn or n, n)
    chunks = [b] * (n // b) + ([n % b] if n % b else [])
    return [chunks[i % len(chunks)] for i in range(s.syn_steps)]


# -- the model ------------------------------------------------------------------------------------


def _tapped(s: CostSetting) -> list[int]:
    return list(range(s.depth)) if s.tapped is None else sorted(s.tapped)


def _head_dims(s: CostSetting) -> list[int]:
    return [s.width * s.pool * s.pool for _ in _tapped(s)]


def mim_flops(s: CostSetting) -> int:
    """The MIM term: synthetic forward + backward into the images (frozen net, to the deepest tapped
    layer), real forward, heads, and 2NMD forward + 4NMD backward of the contrastive loss per layer."""
    n, m, w = s.n_syn, s.classes * s.n_real, s.head_width
    deepest = max(_tapped(s))
    total = n * (convnet_forward_flops(s) + units(s, (1, 1, 0), upto=deepest)) + m * convnet_forward_flops(s)
    for d in _head_dims(s):
        if s.head == "identity":
            total += 2 * n * m * d * 2  # keys need no gradient: forward + grad of the anchors only
            continue
        layers = [(d, w)] + ([(w, w)] if s.head == "mlp" else [])
        for i, (din, dout) in enumerate(layers):
            # anchors: forward, grad-weight, grad-input; keys (constant features): forward, grad-weight
            # (the first layer of the key side needs no grad-input)
            total += 3 * 2 * n * din * dout + (2 if i == 0 else 3) * 2 * m * din * dout
        total += 6 * n * m * w
    return total


def mim_saved_floats(s: CostSetting) -> int:
    """Held for the term's backward: the synthetic forward through the frozen net, the pooled
    features and head outputs of both sides; the reference loss also keeps N x M logits per layer."""
    n, m, w = s.n_syn, s.classes * s.n_real, s.head_width
    total = n * (activation_floats(s, "frozen") + dsa_floats(s)) + num_params(s)
    for d in _head_dims(s):
        out = d if s.head == "identity" else w
        total += (n + m) * (d + out) + (2 * (n + m) * w if s.head == "mlp" else 0)
        if s.contrastive == "reference":
            total += 2 * n * m + 2 * (n + m) * out
    return total


def _mtt_cost(s: CostSetting) -> tuple[float, float]:
    p, sizes = num_params(s), step_sizes(s)
    if s.unroll == "full":
        flops = sum(b * units(s, UNITS["mtt_full_first" if i == 0 else "mtt_full"]) for i, b in enumerate(sizes))
        saved = sum(sizes) * (activation_floats(s, "step") + dsa_floats(s)) + (2 * s.syn_steps + 1) * p
    else:
        flops = sum(b * units(s, UNITS["mtt_ckpt"]) for b in sizes)
        saved = max(sizes) * (activation_floats(s, "step") + dsa_floats(s)) + p
    if s.mim:
        flops += mim_flops(s)
        saved = max(saved, mim_saved_floats(s))
    return flops, saved


def _dc_cost(s: CostSetting) -> tuple[float, float]:
    p, n, k = num_params(s), s.n_syn, s.classes
    real = s.batch_real * units(s, UNITS["train"])
    syn = s.ipc * units(s, UNITS["double"])
    flops = s.outer_loop * k * (real + syn)
    flops += (s.outer_loop - 1) * s.inner_loop * n * units(s, UNITS["train"])
    # one class at a time: the real pass (graph freed by autograd.grad), then the synthetic
    # create_graph pass; the inner training (only between outer rounds) on a batch of N
    phases = [s.batch_real * activation_floats(s, "train"),
              s.ipc * (activation_floats(s, "step") + dsa_floats(s)) + p]
    if s.outer_loop > 1 and s.inner_loop > 0:
        phases.append(min(s.batch_train, n) * activation_floats(s, "train"))
    saved = max(phases) + p
    if s.mim:
        flops += mim_flops(s)
        saved = max(saved, mim_saved_floats(s))
    return flops, saved


def _dm_cost(s: CostSetting) -> tuple[float, float]:
    """Real embeddings under no_grad, synthetic forward + backward into the images."""
    fc = convnet_forward_flops(s, embed_only=True)
    flops = s.classes * s.batch_real * fc + s.n_syn * units(s, UNITS["to_input"])
    saved = s.n_syn * (activation_floats(s, "frozen") + dsa_floats(s)) + num_params(s)
    if s.mim:  # the method's graph is freed by its backward before the term runs
        flops += mim_flops(s)
        saved = max(saved, mim_saved_floats(s))
    return flops, saved


# The analytical model of each base method (this file models the three methods the library ships).
COST_MODELS = {"mtt": _mtt_cost, "dc": _dc_cost, "dm": _dm_cost}


def cost_model(s: CostSetting) -> dict[str, float]:
    """FLOPs per iteration and peak bytes held for backward, for ``s.method`` at setting ``s``."""
    if s.method not in METHODS:
        raise ValueError(f"unknown method {s.method!r}")
    flops, saved = COST_MODELS[s.base](s)
    return {"flops": float(flops), "saved_bytes": float(4 * saved)}


def asymptotic() -> dict[str, str]:
    """Leading terms (F = forward FLOPs per image, A = activation floats per image)."""
    return {
        "dc": "outer x classes x (8 F x ipc + 3 F x batch_real) + (outer-1) x inner x 3 F x N; "
              "memory max(batch_real, ipc) x A",
        "dm": "F x (classes x batch_real + 2 N); memory N x A",
        "mtt (full)": "9 F x syn_steps x batch_syn; memory syn_steps x batch_syn x A_step",
        "mtt (checkpointed)": "12 F x syn_steps x batch_syn; memory batch_syn x A_step (flat in syn_steps)",
        "mim term": "F x (2 N + classes x n_real) + L x (6 N M W + heads); memory N x A + L x (N+M) x W",
    }


# -- measurement ---------------------------------------------------------------------------------


def _method_config(s: CostSetting) -> tuple[dict, dict | None]:
    common = {"width": s.width, "depth": s.depth, "dsa": s.dsa}
    if s.base == "mtt":
        cfg = {**common, "syn_steps": s.syn_steps, "batch_syn": s.batch_syn, "unroll": s.unroll,
               "max_start_epoch": 1, "expert_epochs": 1}
        cfg = {k: v for k, v in cfg.items() if v is not None}
    elif s.base == "dc":
        cfg = {**common, "batch_real": s.batch_real, "outer_loop": s.outer_loop, "inner_loop": s.inner_loop,
               "batch_train": s.batch_train}
    else:
        cfg = {**common, "batch_real": s.batch_real}
    mim = None
    if s.mim:
        mim = {"n_real": s.n_real, "head": s.head, "head_width": s.head_width, "pool": s.pool,
               "impl": "reference" if s.contrastive == "reference" else "auto"}
        if s.tapped is not None:
            mim["layers"] = [f"blocks.{i}" for i in s.tapped]
    return cfg, mim


def measure(s: CostSetting, seed: int = 0) -> dict[str, float]:
    """One iteration of the real method at setting ``s`` on random data: FlopCounterMode FLOPs, then
    (next iteration) peak bytes held for backward."""
    from mim4dd_fast.profiling import SavedTensorBytes, measure_flops
    from mim4dd_fast.runner import build_run
    from mim4dd_fast.settings import build_settings

    per_class = max(s.batch_real, s.n_real, s.ipc) + 1
    data = random_dataset(n_per_class=per_class, channels=s.channels, size=s.image_size, classes=s.classes,
                          seed=seed)
    cfg, mim = _method_config(s)
    settings = build_settings({"method": s.method, "ipc": s.ipc, "seed": seed, "device": "cpu",
                               "method_config": cfg, **({"mim": mim} if mim else {})})
    experts = None
    plan = settings.choice.spec.expert_plan
    if plan is not None:
        experts = random_experts(data, plan(settings.method_config, data), seed=seed)
    method = build_run(settings, dataset=data, experts=experts).method
    _, flops = measure_flops(method.step)
    with SavedTensorBytes() as saved:
        method.step()
    return {"flops": float(flops.total), "saved_bytes": float(saved.peak)}


def rel_err(model: float, measured: float) -> float:
    return (model - measured) / measured if measured else math.inf


# Per base method, the settings its cost grows with (beyond IPC).
EXTRA_POINTS = {"mtt": [{"ipc": 2, "syn_steps": 8, "unroll": "full"}, {"ipc": 4, "batch_syn": 10}],
                "dc": [{"ipc": 2, "outer_loop": 2, "inner_loop": 2}, {"ipc": 1, "batch_real": 32}],
                "dm": [{"ipc": 1, "batch_real": 32}]}


def default_grid(quick: bool) -> list[CostSetting]:
    """Small ConvNets on 16x16 (quick) or 32x32 images: every method, several settings each."""
    size, width = (16, 16) if quick else (32, 32)
    base = CostSetting(image_size=size, width=width, depth=3 if size == 32 else 2, batch_real=16, n_real=8,
                       head_width=32, syn_steps=4)
    grid = []
    for m in METHODS:
        for ipc in (1, 3):
            grid.append(dataclasses.replace(base, method=m, ipc=ipc))
        for extra in EXTRA_POINTS[dataclasses.replace(base, method=m).base]:
            grid.append(dataclasses.replace(base, method=m, **extra))
        if m.endswith("+mim"):
            grid.append(dataclasses.replace(base, method=m, ipc=2, tapped=(0,), head_width=16))
    return grid


def run_grid(grid: list[CostSetting], console=None) -> list[dict]:
    rows = []
    for s in grid:
        model, meas = cost_model(s), measure(s)
        rows.append({"setting": s, "model": model, "measured": meas,
                     "flops_err": rel_err(model["flops"], meas["flops"]),
                     "mem_err": rel_err(model["saved_bytes"], meas["saved_bytes"])})
        if console is not None:
            console.print(f"  {describe(s)}: FLOPs err {rows[-1]['flops_err']:+.1%}, "
                          f"memory err {rows[-1]['mem_err']:+.1%}")
    return rows


def describe(s: CostSetting) -> str:
    bits = [s.method, f"ipc {s.ipc}"]
    if s.base == "mtt":
        bits += [f"steps {s.syn_steps}", f"batch_syn {s.batch_syn or 'all'}", s.unroll]
    if s.base in ("dc", "dm"):
        bits.append(f"real {s.batch_real}")
    if s.base == "dc":
        bits.append(f"loops {s.outer_loop}/{s.inner_loop}")
    if s.mim:
        bits.append(f"taps {list(s.tapped) if s.tapped is not None else 'all'}, W {s.head_width}")
    return ", ".join(bits)


def plots(out: Path, at: CostSetting) -> list[Path]:
    """Model curves of FLOPs and memory vs syn_steps, IPC and real batch (PNG, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - used as matplotlib.ticker

    out.mkdir(parents=True, exist_ok=True)
    written = []
    sweeps = {
        "syn_steps": ([5, 10, 20, 30, 50, 80],
                      [("mtt", "checkpointed"), ("mtt", "full"), ("mtt+mim", "checkpointed")]),
        "ipc": ([1, 2, 5, 10, 20, 50],
                [("dc", None), ("dm", None), ("mtt", "checkpointed"), ("mtt+mim", "checkpointed")]),
        "batch_real": ([16, 32, 64, 128, 256, 512], [("dc", None), ("dm", None), ("dm+mim", None)]),
    }
    for field, (values, curves) in sweeps.items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for method, unroll in curves:
            label = method + (f" ({unroll})" if unroll else "")
            costs = [cost_model(dataclasses.replace(at, method=method, unroll=unroll or at.unroll, **{field: v}))
                     for v in values]
            axes[0].plot(values, [c["flops"] / 1e9 for c in costs], marker="o", label=label)
            axes[1].plot(values, [c["saved_bytes"] / 2**20 for c in costs], marker="o", label=label)
        for ax, what in zip(axes, ("GFLOP / iteration", "MiB held for backward (peak)"), strict=True):
            ax.set_xlabel(field)
            ax.set_ylabel(what)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(values)
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"cost model vs {field} (CIFAR-10 shape, ConvNet-{at.depth} width {at.width})")
        fig.tight_layout()
        path = out / f"cost_vs_{field}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    from mim4dd_fast.errors import run_command

    return run_command(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    parser = Parser(prog="bench/complexity.py", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small grid on 16x16 images (seconds)")
    parser.add_argument("--out", default="runs/bench/complexity", help="directory for the PNG plots")
    parser.add_argument("--no-measure", action="store_true", help="only the model and the plots")
    parser.add_argument("--json", default=None, help="write model vs measured per grid point here")
    args = parser.parse_args(argv)
    import torch

    torch.manual_seed(0)
    rows = [] if args.no_measure else run_grid(default_grid(args.quick), console)
    if rows:
        table = Table(title="cost model vs measured (one iteration; FLOPs by FlopCounterMode, memory = peak bytes "
                            "held for backward)")
        for col in ("setting", "GFLOP model", "GFLOP measured", "err", "MiB model", "MiB measured", "err"):
            table.add_column(col, justify="left" if col == "setting" else "right")
        for r in rows:
            table.add_row(describe(r["setting"]), f"{r['model']['flops'] / 1e9:.4g}",
                          f"{r['measured']['flops'] / 1e9:.4g}", f"{r['flops_err']:+.1%}",
                          f"{r['model']['saved_bytes'] / 2**20:.3g}", f"{r['measured']['saved_bytes'] / 2**20:.3g}",
                          f"{r['mem_err']:+.1%}")
        console.print(table)
        worst_f = max(abs(r["flops_err"]) for r in rows)
        worst_m = max(abs(r["mem_err"]) for r in rows)
        console.print(f"worst FLOP error {worst_f:.1%} (target 10%), worst memory error {worst_m:.1%} (target 25%)")
        if args.json:
            import json

            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(
                [{"setting": dataclasses.asdict(r["setting"]), "model": r["model"], "measured": r["measured"],
                  "flops_err": r["flops_err"], "mem_err": r["mem_err"]} for r in rows], indent=2) + "\n")
            console.print(f"wrote {args.json}")
    at = CostSetting(ipc=10, syn_steps=30, batch_real=64, n_real=64)
    for path in plots(Path(args.out), at):
        console.print(f"wrote {path}")
    for name, formula in asymptotic().items():
        console.print(f"  {name}: {formula}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
