"""Our DC, DM and MTT beside the ORIGINAL code, on this machine, in one run.

    python bench/baselines.py --mtt-repo ~/src/mtt-distillation --dc-repo ~/src/DatasetCondensation
    python bench/baselines.py --mtt-repo M --dc-repo D --rows 'dm*,mtt1_s10_*' --json b.json
    python bench/baselines.py --list                          # rows and a time estimate
    python bench/baselines.py --smoke --repeats 1             # tiny shapes: checks the script runs

``--mtt-repo`` / ``--dc-repo`` name the user's own checkouts of GeorgeCazenavette/mtt-distillation and
VICO-UoE/DatasetCondensation. Their ``networks.py``, ``utils.py`` (and MTT's ``reparam_module.py``) are
imported unedited (``bench/_originals.py`` says how they run on a current CPU torch) and one
distillation iteration of theirs is timed beside ours, row by row. Their main scripts are not
importable (argparse, dataset download and evaluation at module level), so the iteration itself is
the loop body of ``distill.py`` / ``main.py`` / ``main_DM.py`` (the ``Original*`` classes below,
line for line, calling their functions for all the work).

Each row is one setting: CIFAR-10-shaped random data (3x32x32, 10 classes, 500 real images per
class), ConvNet-3 width 128 with instance norm, DSA on in both; DC and DM draw 256 real images per
class; MTT trains the student on all synthetic images in every step. Our MTT comes twice, with
``unroll="full"`` (the original's one big graph) and ``"checkpointed"`` (exact, one step's graph alive
at a time); both are compared with the same original measurement. MTT's expert trajectories are
random parameter vectors of the right length (an iteration's cost does not depend on their values).

Every measurement runs in a FRESH process (so its peak RSS is its own), and the sides are
interleaved: round 1 runs the original then ours, round 2 ours then the original, and so on
(``--rounds``), so drift on a busy machine hits both. In each process:
  1. data, experts and imports are set up, then the RSS is read (the baseline);
  2. the method is built; iteration 1 runs under FlopCounterMode (GFLOP/iteration; also the warm-up),
     iteration 2 under saved_tensors_hooks (bytes saved for backward, the most held at once), then
     ``--repeats`` timed iterations (median wall s/iteration, and median process CPU s/iteration: the
     CPU time of all threads, which a busy machine inflates far less than the wall time);
  3. peak RSS rise = the process peak over 2-3 minus the baseline.
A row's figure per side is the median over rounds (seconds: median of the per-round medians, with
the range); "ours/orig" divides ours by the original's measured in this run.

Without a checkout the original's column falls back to figures typed in from a measurement on
ANOTHER machine (2-core AMD EPYC, torch 2.13 CPU, original MTT @50dccea and DatasetCondensation
@53f63a6), labelled "other machine": seconds from different machines are not comparable, so no
ratio of seconds is printed against them.
"""

from __future__ import annotations

import copy
import fnmatch
import gc
import json
import math
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _originals  # noqa: E402
from _common import ArgError, Parser, mib, random_dataset, random_experts  # noqa: E402

MiB, GiB = 2**20, 2**30
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"  # the originals' default DSA strategy


@dataclass(frozen=True)
class Reference:
    """The original code's cost per iteration measured on ANOTHER machine (2-core CPU, 2 threads)."""

    seconds: float
    saved_bytes: float
    rss_bytes: float
    gflop: float


# Fallback only (no checkout given): the original code measured on another 2-core machine (AMD EPYC,
# torch 2.13.0+cpu, 2 threads), MTT @50dccea, DatasetCondensation @53f63a6.
OTHER_MACHINE: dict[str, Reference] = {
    "mtt1_s10": Reference(0.52, 310 * MiB, 327 * MiB, 89),
    "mtt1_s20": Reference(1.00, 617 * MiB, 630 * MiB, 178),
    "mtt1_s50": Reference(2.44, 1540 * MiB, 1536 * MiB, 446),
    "mtt10_s10": Reference(10.6, 2.8 * GiB, 2.9 * GiB, 892),
    "mtt10_s30": Reference(30.6, 8.4 * GiB, 8.4 * GiB, 2677),
    "dc1": Reference(6.8, 430 * MiB, 561 * MiB, 770),
    "dc10": Reference(161, 659 * MiB, 789 * MiB, 21888),
    "dm1": Reference(2.9, 16 * MiB, 275 * MiB, 262),
    "dm10": Reference(2.8, 151 * MiB, 396 * MiB, 280),
}


@dataclass(frozen=True)
class Row:
    """One measured setting of ours; ``setting`` names the original's measurement it is compared with."""

    name: str
    method: str  # "dc" | "dm" | "mtt"
    ipc: int
    label: str
    setting: str  # key of the original's measurement (and of OTHER_MACHINE)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def repo_kind(self) -> str:
        return "mtt" if self.method == "mtt" else "dc"


def _mtt_rows() -> list[Row]:
    rows = []
    for ipc, steps in ((1, 10), (1, 20), (1, 50), (10, 10), (10, 30)):
        for unroll, short in (("full", "full"), ("checkpointed", "ckpt")):
            # max_start_epoch 2 keeps the random trajectories short; it does not change the cost.
            cfg = {"syn_steps": steps, "batch_syn": None, "dsa": True, "unroll": unroll, "max_start_epoch": 2,
                   "expert_epochs": 2}
            label = f"{steps} steps x all {10 * ipc} images, {unroll}"
            rows.append(Row(f"mtt{ipc}_s{steps}_{short}", "mtt", ipc, label, f"mtt{ipc}_s{steps}", cfg))
    return rows


ROWS: dict[str, Row] = {r.name: r for r in [
    *_mtt_rows(),
    Row("dc1", "dc", 1, "outer 1 / inner 1, 256 real/class", "dc1", {"batch_real": 256, "dsa": True}),
    Row("dc10", "dc", 10, "outer 10 / inner 50, 256 real/class", "dc10", {"batch_real": 256, "dsa": True}),
    Row("dm1", "dm", 1, "256 real/class", "dm1", {"batch_real": 256, "dsa": True}),
    Row("dm10", "dm", 10, "256 real/class", "dm10", {"batch_real": 256, "dsa": True}),
]}


@dataclass(frozen=True)
class Shapes:
    """Data and model size: the reference setting, or tiny for ``--smoke`` (ratios then meaningless)."""

    image_size: int = 32
    width: int = 128
    n_per_class: int = 500  # real training images per class (>= batch_real, so batches are sampled)
    batch_real: int | None = None  # None: the row's (256)

    @property
    def is_reference_setting(self) -> bool:
        return self == Shapes()


SMOKE = Shapes(image_size=8, width=16, n_per_class=40, batch_real=16)


def _depth(shapes: Shapes) -> int:
    from mim4dd_fast.models import default_depth

    return default_depth(shapes.image_size)


# -- ours: one row in this process ----------------------------------------------------------------


def build_ours(row: Row, shapes: Shapes, seed: int = 0, precision: str = "fp32"):
    """Dataset and (for MTT) random experts, then a function that builds our method: (step, info)."""
    from mim4dd_fast.methods.registry import build_method, resolve

    dataset = random_dataset(n_per_class=shapes.n_per_class, size=shapes.image_size, seed=seed)
    config = {**row.config, "width": shapes.width, "precision": precision}
    if shapes.batch_real is not None and "batch_real" in config:
        config["batch_real"] = shapes.batch_real
    spec = resolve(row.method).spec
    experts = None
    if spec.needs_experts:
        experts = random_experts(dataset, spec.expert_plan(spec.config_class(**config), dataset), num=1, seed=seed)

    def make():
        method = build_method(row.method, dataset, row.ipc, config=config, experts=experts, seed=seed)
        info: dict[str, Any] = {"config": config}
        if row.method == "mtt":
            n_params = int(sum(p.numel() for p in method.model.parameters()))
            info["params"] = n_params
            if config["unroll"] == "checkpointed":  # flat theta_k per step, not seen by saved_tensors_hooks
                info["theta_store_bytes"] = (config["syn_steps"] + 1) * n_params * 4
        return method.step, info

    return make


# -- the original: its iteration, built from its own functions ------------------------------------


class _OriginalData:
    """The originals' real-data layout: ``images_all`` and per-class index lists, ``get_images`` by numpy."""

    def __init__(self, dataset) -> None:
        self.images_all = dataset.x_train
        labels = dataset.y_train.tolist()
        self.indices_class: list[list[int]] = [[] for _ in range(dataset.num_classes)]
        for i, lab in enumerate(labels):
            self.indices_class[lab].append(i)

    def get_images(self, c: int, n: int):  # get random n images from class c
        import numpy as np

        idx_shuffle = np.random.permutation(self.indices_class[c])[:n]
        return self.images_all[idx_shuffle]


def _original_net(orig, shapes: Shapes, num_classes: int, channel: int):
    """Their ``get_network('ConvNet', ...)`` at the reference setting; their ConvNet class at smoke shapes."""
    u = orig.utils
    im_size = (shapes.image_size, shapes.image_size)
    if shapes.is_reference_setting:
        if orig.kind == "mtt":
            return u.get_network("ConvNet", channel, num_classes, im_size, dist=False)
        return u.get_network("ConvNet", channel, num_classes, im_size)
    _, _, act, norm, pooling = u.get_default_convnet_setting()
    return orig.networks.ConvNet(channel=channel, num_classes=num_classes, net_width=shapes.width,
                                 net_depth=_depth(shapes), net_act=act, net_norm=norm, net_pooling=pooling,
                                 im_size=im_size)


class _Args:
    """The attributes of their argparse namespace that one iteration reads."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


class OriginalMTT:
    """One iteration of the original ``distill.py`` (its ``for it in range(...)`` body, lines 290-396 @50dccea)."""

    def __init__(self, orig, dataset, ipc: int, config: dict[str, Any], shapes: Shapes, experts) -> None:
        import numpy as np
        import torch
        import torch.nn as nn

        self.orig, self.shapes, self.np, self.torch = orig, shapes, np, torch
        u = orig.utils
        self.num_classes, self.channel = dataset.num_classes, dataset.channels
        self.args = _Args(dsa=True, no_aug=False, texture=False, distributed=False, dsa_strategy=DSA_STRATEGY,
                          dsa_param=u.ParamDiffAug(), syn_steps=config["syn_steps"],
                          expert_epochs=config["expert_epochs"], max_start_epoch=config["max_start_epoch"],
                          batch_syn=self.num_classes * ipc, lr_img=1000.0, lr_lr=1e-5, lr_teacher=0.01,
                          device="cpu")
        data = _OriginalData(dataset)
        size = shapes.image_size
        self.label_syn = torch.tensor(np.array([np.ones(ipc, dtype=np.int_) * i for i in range(self.num_classes)]),
                                      dtype=torch.long, requires_grad=False).view(-1)
        image_syn = torch.randn(size=(self.num_classes * ipc, self.channel, size, size), dtype=torch.float)
        for c in range(self.num_classes):  # pix_init 'real'
            image_syn.data[c * ipc:(c + 1) * ipc] = data.get_images(c, ipc).detach().data
        self.image_syn = image_syn.detach().requires_grad_(True)
        self.syn_lr = torch.tensor(self.args.lr_teacher).detach().requires_grad_(True)
        self.optimizer_img = torch.optim.SGD([self.image_syn], lr=self.args.lr_img, momentum=0.5)
        self.optimizer_lr = torch.optim.SGD([self.syn_lr], lr=self.args.lr_lr, momentum=0.5)
        self.optimizer_img.zero_grad()
        self.criterion = nn.CrossEntropyLoss()
        # The buffer: each epoch a list of parameter tensors shaped like the student's (random values).
        shapes_ = [p.shape for p in _original_net(orig, shapes, self.num_classes, self.channel).parameters()]
        sizes = [s.numel() for s in shapes_]
        self.buffer = [[[t.view(s).clone() for t, s in zip(epoch.split(sizes), shapes_, strict=True)]
                        for epoch in traj] for traj in experts]

    def step(self) -> None:
        np, torch, args = self.np, self.torch, self.args
        student_net = _original_net(self.orig, self.shapes, self.num_classes, self.channel)
        student_net = self.orig.reparam_module.ReparamModule(student_net)
        student_net.train()
        num_params = sum([np.prod(p.size()) for p in (student_net.parameters())])
        expert_trajectory = self.buffer[np.random.randint(0, len(self.buffer))]
        start_epoch = np.random.randint(0, args.max_start_epoch)
        starting_params = expert_trajectory[start_epoch]
        target_params = expert_trajectory[start_epoch + args.expert_epochs]
        target_params = torch.cat([p.data.to(args.device).reshape(-1) for p in target_params], 0)
        student_params = [torch.cat([p.data.to(args.device).reshape(-1) for p in starting_params], 0)
                          .requires_grad_(True)]
        starting_params = torch.cat([p.data.to(args.device).reshape(-1) for p in starting_params], 0)
        syn_images = self.image_syn
        y_hat = self.label_syn.to(args.device)
        indices_chunks: list = []
        for _step in range(args.syn_steps):
            if not indices_chunks:
                indices = torch.randperm(len(syn_images))
                indices_chunks = list(torch.split(indices, args.batch_syn))
            these_indices = indices_chunks.pop()
            x = syn_images[these_indices]
            this_y = y_hat[these_indices]
            if args.dsa and (not args.no_aug):
                x = self.orig.utils.DiffAugment(x, args.dsa_strategy, param=args.dsa_param)
            forward_params = student_params[-1]
            x = student_net(x, flat_param=forward_params)
            ce_loss = self.criterion(x, this_y)
            grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
            student_params.append(student_params[-1] - self.syn_lr * grad)
        param_loss = torch.tensor(0.0).to(args.device)
        param_dist = torch.tensor(0.0).to(args.device)
        param_loss += torch.nn.functional.mse_loss(student_params[-1], target_params, reduction="sum")
        param_dist += torch.nn.functional.mse_loss(starting_params, target_params, reduction="sum")
        param_loss /= num_params
        param_dist /= num_params
        param_loss /= param_dist
        grand_loss = param_loss
        self.optimizer_img.zero_grad()
        self.optimizer_lr.zero_grad()
        grand_loss.backward()
        self.optimizer_img.step()
        self.optimizer_lr.step()
        for _ in student_params:
            del _


class _OriginalDCBase:
    """What main.py and main_DM.py share: the real data, the synthetic images initialised from real ones."""

    lr_img = 0.1

    def __init__(self, orig, dataset, ipc: int, config: dict[str, Any], shapes: Shapes) -> None:
        import numpy as np
        import torch
        import torch.nn as nn

        self.orig, self.shapes, self.np, self.torch, self.ipc = orig, shapes, np, torch, ipc
        u = orig.utils
        self.num_classes, self.channel = dataset.num_classes, dataset.channels
        self.im_size = (shapes.image_size, shapes.image_size)
        outer, inner = u.get_loops(ipc)
        self.args = _Args(dsa=True, dsa_strategy=DSA_STRATEGY, dsa_param=u.ParamDiffAug(), dis_metric="ours",
                          batch_real=config["batch_real"], batch_train=256, lr_img=self.lr_img, lr_net=0.01,
                          outer_loop=outer, inner_loop=inner, device="cpu", dc_aug_param=None)
        self.data = _OriginalData(dataset)
        self.label_syn = torch.tensor(np.array([np.ones(ipc) * i for i in range(self.num_classes)]), dtype=torch.long,
                                      requires_grad=False).view(-1)
        self.image_syn = torch.randn(size=(self.num_classes * ipc, self.channel, *self.im_size), dtype=torch.float,
                                     requires_grad=True)
        for c in range(self.num_classes):  # init 'real'
            self.image_syn.data[c * ipc:(c + 1) * ipc] = self.data.get_images(c, ipc).detach().data
        self.optimizer_img = torch.optim.SGD([self.image_syn], lr=self.args.lr_img, momentum=0.5)
        self.optimizer_img.zero_grad()
        self.criterion = nn.CrossEntropyLoss()

    def _augment_pair(self, img_real, img_syn):
        seed = int(time.time() * 1000) % 100000
        u, args = self.orig.utils, self.args
        img_real = u.DiffAugment(img_real, args.dsa_strategy, seed=seed, param=args.dsa_param)
        img_syn = u.DiffAugment(img_syn, args.dsa_strategy, seed=seed, param=args.dsa_param)
        return img_real, img_syn


class OriginalDC(_OriginalDCBase):
    """One iteration of the original ``main.py`` (method DSA; its ``for it in ...`` body after evaluation, @53f63a6)."""

    def step(self) -> None:
        torch, args, u = self.torch, self.args, self.orig.utils
        channel, ipc, im_size, num_classes = self.channel, self.ipc, self.im_size, self.num_classes
        image_syn, label_syn = self.image_syn, self.label_syn
        net = _original_net(self.orig, self.shapes, num_classes, channel).to(args.device)  # get a random model
        net.train()
        net_parameters = list(net.parameters())
        optimizer_net = torch.optim.SGD(net.parameters(), lr=args.lr_net)
        optimizer_net.zero_grad()
        loss_avg = 0
        args.dc_aug_param = None
        for ol in range(args.outer_loop):
            for module in net.modules():  # their BatchNorm check (none in the instance-norm ConvNet)
                if "BatchNorm" in module._get_name():
                    raise RuntimeError("the bench measures the instance-norm ConvNet only")
            loss = torch.tensor(0.0).to(args.device)
            for c in range(num_classes):
                img_real = self.data.get_images(c, args.batch_real)
                lab_real = torch.ones((img_real.shape[0],), device=args.device, dtype=torch.long) * c
                img_syn = image_syn[c * ipc:(c + 1) * ipc].reshape((ipc, channel, im_size[0], im_size[1]))
                lab_syn = torch.ones((ipc,), device=args.device, dtype=torch.long) * c
                if args.dsa:
                    img_real, img_syn = self._augment_pair(img_real, img_syn)
                output_real = net(img_real)
                loss_real = self.criterion(output_real, lab_real)
                gw_real = torch.autograd.grad(loss_real, net_parameters)
                gw_real = list(_.detach().clone() for _ in gw_real)
                output_syn = net(img_syn)
                loss_syn = self.criterion(output_syn, lab_syn)
                gw_syn = torch.autograd.grad(loss_syn, net_parameters, create_graph=True)
                loss += u.match_loss(gw_syn, gw_real, args)
            self.optimizer_img.zero_grad()
            loss.backward()
            self.optimizer_img.step()
            loss_avg += loss.item()
            if ol == args.outer_loop - 1:
                break
            image_syn_train, label_syn_train = copy.deepcopy(image_syn.detach()), copy.deepcopy(label_syn.detach())
            dst_syn_train = u.TensorDataset(image_syn_train, label_syn_train)
            trainloader = torch.utils.data.DataLoader(dst_syn_train, batch_size=args.batch_train, shuffle=True,
                                                      num_workers=0)
            for _il in range(args.inner_loop):
                u.epoch("train", trainloader, net, optimizer_net, self.criterion, args, aug=bool(args.dsa))


class OriginalDM(_OriginalDCBase):
    """One iteration of the original ``main_DM.py`` (ConvNet branch of its ``for it in ...`` body, @53f63a6)."""

    lr_img = 1.0

    def step(self) -> None:
        torch, args = self.torch, self.args
        channel, ipc, im_size, num_classes = self.channel, self.ipc, self.im_size, self.num_classes
        net = _original_net(self.orig, self.shapes, num_classes, channel).to(args.device)  # get a random model
        net.train()
        for param in list(net.parameters()):
            param.requires_grad = False
        embed = net.embed
        loss = torch.tensor(0.0).to(args.device)
        for c in range(num_classes):
            img_real = self.data.get_images(c, args.batch_real)
            img_syn = self.image_syn[c * ipc:(c + 1) * ipc].reshape((ipc, channel, im_size[0], im_size[1]))
            if args.dsa:
                img_real, img_syn = self._augment_pair(img_real, img_syn)
            output_real = embed(img_real).detach()
            output_syn = embed(img_syn)
            loss += torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
        self.optimizer_img.zero_grad()
        loss.backward()
        self.optimizer_img.step()


def build_original(row: Row, shapes: Shapes, repo: str, seed: int = 0):
    """Import the checkout, make the data (same shapes as ours), then a function that builds their iteration."""
    import numpy as np
    import torch

    orig = _originals.load(repo, row.repo_kind)
    dataset = random_dataset(n_per_class=shapes.n_per_class, size=shapes.image_size, seed=seed)
    config = dict(row.config)
    if shapes.batch_real is not None and "batch_real" in config:
        config["batch_real"] = shapes.batch_real
    experts = None
    if row.method == "mtt":
        from mim4dd_fast.methods.registry import resolve

        spec = resolve("mtt").spec
        plan = spec.expert_plan(spec.config_class(**{**row.config, "width": shapes.width}), dataset)
        experts = random_experts(dataset, plan, num=1, seed=seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    cls = {"mtt": OriginalMTT, "dc": OriginalDC, "dm": OriginalDM}[row.method]

    def make():
        extra = (experts,) if row.method == "mtt" else ()
        driver = cls(orig, dataset, row.ipc, config, shapes, *extra)
        return driver.step, {"config": config, "repo": str(orig.repo), "commit": orig.commit}

    return make


# -- one measurement in this process ---------------------------------------------------------------


def measure(make, repeats: int = 3) -> dict[str, Any]:
    """The protocol of the module docstring for one side: ``make()`` -> (step, info), built after the RSS baseline."""
    import torch
    import torch.utils.flop_counter  # noqa: F401  (imported before the baseline: not the method's memory)

    from mim4dd_fast.profiling import PeakRSS, SavedTensorBytes, measure_flops, rss_bytes

    # The first optimizer built imports torch._dynamo (~70 MiB RSS): a one-time library cost, not the method's.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    gc.collect()
    rss0 = rss_bytes()
    with PeakRSS() as peak:
        step, info = make()
        _, flops = measure_flops(step)  # iteration 1: FLOPs, and the warm-up
        with SavedTensorBytes() as saved:  # iteration 2: bytes saved for backward
            step()
        times, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {
        **info,
        "s_per_iter_median": statistics.median(times),
        "s_per_iter_all": times,
        "cpu_s_per_iter_median": statistics.median(cpu),
        "cpu_s_per_iter_all": cpu,
        "saved_peak_bytes": saved.peak,
        "saved_total_bytes": saved.total,
        "rss_rise_bytes": max(0, peak.peak - rss0),
        "rss_method": peak.method,
        "gflop_per_iter": flops.total / 1e9,
        "flops_by_op": flops.by_op,
        "threads": torch.get_num_threads(),
    }


def measure_row(row: Row, shapes: Shapes = Shapes(), repeats: int = 3, seed: int = 0, side: str = "ours",
                repo: str | None = None, precision: str = "fp32") -> dict[str, Any]:
    """Measure one side of one row in this process (call it in a fresh process for a per-row peak RSS).
    ``precision`` is our method's setting (the original always runs float32)."""
    if side == "ours":
        make = build_ours(row, shapes, seed, precision)
    else:
        if repo is None:
            raise ValueError("the original side needs its checkout")
        make = build_original(row, shapes, repo, seed)
    return {"row": row.name, "side": side, "method": row.method, "ipc": row.ipc, **measure(make, repeats)}


# -- summaries ---------------------------------------------------------------------------------------

FIGURES = (("s_per_iter", "s_per_iter_median"), ("cpu_s_per_iter", "cpu_s_per_iter_median"),
           ("saved_for_backward", "saved_peak_bytes"), ("peak_rss_rise", "rss_rise_bytes"), ("gflop", "gflop_per_iter"))


def summarize(measurements: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per figure, the median over rounds (and, for seconds, the range); None when every round failed."""
    ok = [m for m in measurements if "error" not in m]
    if not ok:
        return None
    out: dict[str, Any] = {"rounds": len(ok)}
    for name, key in FIGURES:
        values = [m[key] for m in ok if key in m]
        if not values:
            continue
        out[name] = statistics.median(values)
        if name in ("s_per_iter", "cpu_s_per_iter"):
            out[f"{name}_range"] = [min(values), max(values)]
    return out


def ratios(ours: dict[str, Any], original: dict[str, Any]) -> dict[str, float]:
    """ours / original per figure (below 1: ours is cheaper); NaN where a figure is missing or zero."""
    def r(a: float | None, b: float | None) -> float:
        ok = a is not None and b is not None and b > 0 and math.isfinite(a) and math.isfinite(b)
        return a / b if ok else math.nan

    return {name: r(ours.get(name), original.get(name)) for name, _ in FIGURES}


def reference_summary(ref: Reference) -> dict[str, Any]:
    return {"s_per_iter": ref.seconds, "saved_for_backward": ref.saved_bytes, "peak_rss_rise": ref.rss_bytes,
            "gflop": ref.gflop, "source": "other machine"}


# -- the driver ------------------------------------------------------------------------------------


def select_rows(rows: str | None, skip: str | None) -> list[Row]:
    """Rows matching the comma list ``rows`` (names or globs; all when None) minus those in ``skip``."""
    def match(spec: str | None) -> list[str]:
        if spec is None:
            return list(ROWS)
        names: list[str] = []
        for pattern in (p.strip() for p in spec.split(",") if p.strip()):
            hits = [n for n in ROWS if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise ArgError(f"No row matches {pattern!r}; rows are: {', '.join(ROWS)}.")
            names += [n for n in hits if n not in names]
        return names

    chosen = match(rows)
    dropped = set(match(skip)) if skip else set()
    return [ROWS[n] for n in chosen if n not in dropped]


def estimate_seconds(row: Row, repeats: int, with_original: bool) -> float:
    """Rough wall time of a row per round from the reference seconds: 2 untimed + ``repeats`` timed
    iterations and ~8 s start-up per process; the checkpointed unroll recomputes each step, so 1.5x."""
    per_process = (2 + repeats) * OTHER_MACHINE[row.setting].seconds
    ours = 8.0 + per_process * (1.5 if row.config.get("unroll") == "checkpointed" else 1.0)
    return ours + (8.0 + per_process if with_original else 0.0)


def run_worker(row: Row, side: str, args) -> dict[str, Any]:
    """Measure one side of ``row`` in a fresh Python process; returns its JSON (or an ``error`` entry)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", row.name, "--side", side,
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--seed", str(args.seed),
           "--precision", args.precision, "--original-malloc", args.original_malloc]
    repo = repo_for(row, args)
    if side == "original" and repo is not None:
        cmd += [f"--{row.repo_kind}-repo", repo]
    if args.smoke:
        cmd.append("--smoke")
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        res = {"row": row.name, "side": side, "error": lines[-1] if lines else f"exit code {out.returncode}"}
    else:
        res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall_seconds"] = time.perf_counter() - t0
    return res


def repo_for(row: Row, args) -> str | None:
    return args.mtt_repo if row.repo_kind == "mtt" else args.dc_repo


def schedule(rows: list[Row], args) -> list[tuple[int, str, Row]]:
    """(round, side, row) in run order: per original setting, the original's process and ours interleaved,
    the order flipped every round. An original setting shared by several rows (MTT full / checkpointed) runs once."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.setting, []).append(row)
    plan: list[tuple[int, str, Row]] = []
    for members in groups.values():
        with_original = repo_for(members[0], args) is not None
        for r in range(args.rounds):
            unit = ([("original", members[0])] if with_original else []) + [("ours", m) for m in members]
            plan += [(r, side, row) for side, row in (unit if r % 2 == 0 else unit[::-1])]
    return plan


def _fmt_s(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def _fmt_gflop(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else (f"{x:,.0f}" if x >= 100 else f"{x:.3g}")


def _fmt_ratio(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    colour = "green" if x <= 1.0 else "red"
    return f"[{colour}]{x:.2f}x[/{colour}]"


def _fmt_figure(name: str, s: dict[str, Any] | None) -> str:
    if s is None:
        return "failed"
    v = s.get(name)
    if name in ("s_per_iter", "cpu_s_per_iter"):
        text = _fmt_s(v)
        lo, hi = s.get(f"{name}_range", (v, v))
        return text if lo == hi else f"{text} ({_fmt_s(lo)}-{_fmt_s(hi)})"
    if name == "gflop":
        return _fmt_gflop(v)
    return f"{mib(v)} MiB"


def table(results: list[dict[str, Any]], shapes: Shapes, threads: int, rounds: int, precision: str = "fp32"):
    from rich.table import Table

    title = (f"Ours ({precision}) vs the original code (fp32), {threads} threads, median of {rounds} round(s) of "
             f"fresh processes, "
             f"{'reference setting' if shapes.is_reference_setting else 'SMOKE shapes: ratios not meaningful'}")
    t = Table(title=title, show_lines=False)
    for col, just in (("row", "left"), ("setting", "left"), ("figure", "left"), ("ours", "right"),
                      ("original", "right"), ("ours/orig", "right")):
        t.add_column(col, justify=just, no_wrap=col != "setting")
    names = {"s_per_iter": "s / iteration", "cpu_s_per_iter": "CPU s / iteration",
             "saved_for_backward": "saved for backward",
             "peak_rss_rise": "peak RSS rise", "gflop": "GFLOP / iteration"}
    for res in results:
        row = ROWS[res["row"]]
        ours, orig = res["ours_summary"], res["original_summary"]
        other = orig is not None and orig.get("source") == "other machine"
        head = [row.name, f"{row.method.upper()} IPC {row.ipc}: {row.label}"]
        for i, (name, _) in enumerate(FIGURES):
            ratio = res["ours_over_original"].get(name, math.nan)
            orig_text = _fmt_figure(name, orig) + (" (other machine)" if other and i == 0 else "")
            if other and name in ("s_per_iter", "cpu_s_per_iter"):
                ratio = math.nan  # seconds from another machine are not comparable
            t.add_row(*(head if i == 0 else ["", ""]), names[name], _fmt_figure(name, ours), orig_text,
                      _fmt_ratio(ratio), end_section=i == len(FIGURES) - 1)
    return t


def _malloc_sides(results: list[dict[str, Any]]) -> dict[str, str]:
    """{side: the C heap setting its processes ran with} ("mixed" if they differed; allocator.py)."""
    seen: dict[str, set[str]] = {"ours": set(), "original": set()}
    for r in results:
        for side in seen:
            seen[side].update(m.get("malloc", "system") for m in r.get(side, []) if "error" not in m)
    return {side: (next(iter(v)) if len(v) == 1 else "mixed" if v else "-") for side, v in seen.items()}


def markdown(data: dict[str, Any]) -> str:
    """The rows of a saved ``--json`` as a Markdown table (docs/benchmarks.md is rendered with this)."""
    def ratio(r: dict[str, Any], name: str) -> str:
        x = r["ours_over_original"].get(name, math.nan)
        return "-" if x is None or not math.isfinite(x) else f"**{x:.2f}x**" if name.endswith("s_per_iter") else \
            f"{x:.2f}x"

    def fig(s: dict[str, Any] | None, name: str) -> str:
        if s is None or name not in s:
            return "-"
        if name in ("s_per_iter", "cpu_s_per_iter"):
            lo, hi = s[f"{name}_range"] if f"{name}_range" in s else (s[name], s[name])
            return _fmt_s(s[name]) if lo == hi else f"{_fmt_s(s[name])} ({_fmt_s(lo)}-{_fmt_s(hi)})"
        return _fmt_gflop(s[name]) if name == "gflop" else f"{mib(s[name])} MiB"

    head = ("| row | wall s/iter ours | original | ours/orig | CPU s/iter ours | original | ours/orig "
            "| saved for backward ours / orig | peak RSS rise ours / orig | GFLOP ours/orig |")
    lines = [head, "|" + "---|" * 10]
    for r in data["rows"]:
        o, g = r["ours_summary"], r["original_summary"]
        lines.append(f"| {r['row']} ({r['label']}) | {fig(o, 's_per_iter')} | {fig(g, 's_per_iter')} | "
                     f"{ratio(r, 's_per_iter')} | {fig(o, 'cpu_s_per_iter')} | {fig(g, 'cpu_s_per_iter')} | "
                     f"{ratio(r, 'cpu_s_per_iter')} | {fig(o, 'saved_for_backward')} / {fig(g, 'saved_for_backward')}"
                     f" = {ratio(r, 'saved_for_backward')} | {fig(o, 'peak_rss_rise')} / {fig(g, 'peak_rss_rise')} = "
                     f"{ratio(r, 'peak_rss_rise')} | {ratio(r, 'gflop')} |")
    return "\n".join(lines)


def build_parser() -> Parser:
    p = Parser(prog="bench/baselines.py", description="Our DC/DM/MTT beside the original code, on this machine.")
    p.add_argument("--mtt-repo", default=None, help="a checkout of GeorgeCazenavette/mtt-distillation (MTT rows)")
    p.add_argument("--dc-repo", default=None, help="a checkout of VICO-UoE/DatasetCondensation (DC and DM rows)")
    p.add_argument("--rows", default=None, help=f"comma list of row names or globs (default all): {', '.join(ROWS)}")
    p.add_argument("--skip", default=None, help="comma list of row names or globs to leave out, e.g. dc10")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per process (median; after 2 untimed)")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per side and row, interleaved (median)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every process (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="our methods' precision setting (the original always runs float32); default fp32")
    p.add_argument("--original-malloc", default="system", choices=("system", "tuned"),
                   help="the C heap setting of the original's processes: system (as the original ships; default) "
                        "or tuned (ours, mim4dd_fast/allocator.py: separates our code's gain from the allocator's). "
                        "Our side runs as our CLI does: tuned unless MIM4DD_MALLOC=system")
    p.add_argument("--json", default=None, help="write every measurement and the summary as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (8x8 images, width 16): checks the script runs")
    p.add_argument("--list", action="store_true", help="list the selected rows with a time estimate and exit")
    p.add_argument("--render", default=None, help="print the Markdown table of a saved --json file and exit")
    p.add_argument("--worker", default=None, help="internal: measure one row in this process, print JSON")
    p.add_argument("--side", default="ours", choices=("ours", "original"), help="internal: which code --worker runs")
    return p


def parse(argv: list[str] | None):
    """Parsed and checked flags: FlagError (one sentence, exit 2) on anything bad, before any work starts."""
    args = build_parser().parse_args(argv)
    for flag in ("repeats", "rounds", "threads"):
        if getattr(args, flag) < 1:
            raise ArgError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.worker is not None and args.worker not in ROWS:
        raise ArgError(f"Unknown row {args.worker!r}; rows are: {', '.join(ROWS)}.")
    args.selected = select_rows(args.rows, args.skip)
    if not args.selected:
        raise ArgError("The selection is empty after --skip; choose at least one row.")
    for kind in ("mtt", "dc"):
        path = getattr(args, f"{kind}_repo")
        if path is not None:
            setattr(args, f"{kind}_repo", str(_originals.check_repo(path, kind).resolve()))
    if args.worker is not None and args.side == "original" and repo_for(ROWS[args.worker], args) is None:
        raise ArgError(f"--side original for {args.worker} needs --{ROWS[args.worker].repo_kind}-repo.")
    return args


def main(argv: list[str] | None = None) -> int:
    from mim4dd_fast.errors import run_command

    return run_command(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = parse(argv)
    if args.render is not None:
        from mim4dd_fast.errors import UserError

        try:
            print(markdown(json.loads(Path(args.render).read_text())))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"--render {args.render} is not a bench/baselines.py JSON file ({exc}).") from None
        return 0
    shapes = SMOKE if args.smoke else Shapes()
    if args.worker is not None:
        import torch

        from mim4dd_fast.allocator import tune

        # Our side runs as our CLI does; the original's as it ships unless --original-malloc tuned.
        malloc = "tuned" if (args.side == "ours" or args.original_malloc == "tuned") and tune() else "system"
        torch.set_num_threads(args.threads)
        warnings.filterwarnings("ignore", category=UserWarning)  # their align_corners / meshgrid notices
        row = ROWS[args.worker]
        print(json.dumps(measure_row(row, shapes, args.repeats, args.seed, args.side, repo_for(row, args),
                                     args.precision) | {"malloc": malloc}))
        return 0

    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped or in a log: do not squeeze the table into 80 columns
        console = Console(width=140)
    rows = args.selected
    if args.list:
        total = 0.0
        for row in rows:
            est = args.rounds * estimate_seconds(row, args.repeats, repo_for(row, args) is not None)
            total += est
            console.print(f"{row.name:16s} {row.method.upper()} IPC {row.ipc}, {row.label}: ~{est / 60:.1f} min")
        console.print(f"total ~{total / 60:.0f} min at the reference speed ({args.rounds} rounds x {args.repeats} "
                      f"repeats; originals only where a checkout is given)")
        return 0

    plan = schedule(rows, args)
    measured: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for k, (r, side, row) in enumerate(plan, 1):
        key = (row.setting, "original") if side == "original" else (row.name, "ours")
        # A plain line, not a spinner: on 2 cores any busy parent thread slows the measured child.
        console.print(f"[{k}/{len(plan)}] round {r + 1}: {row.setting if side == 'original' else row.name} "
                      f"({side}) ...")
        res = run_worker(row, side, args)
        measured.setdefault(key, []).append(res)
        status = f"[red]failed: {res['error']}[/red]" if "error" in res else f"{res['s_per_iter_median']:.3f} s/iter"
        console.print(f"    {status} ({res.get('wall_seconds', 0):.0f} s)")

    results = []
    for row in rows:
        ours = measured.get((row.name, "ours"), [])
        if repo_for(row, args) is not None:
            original_runs = measured.get((row.setting, "original"), [])
            orig = summarize(original_runs)
        else:
            original_runs, orig = [], reference_summary(OTHER_MACHINE[row.setting])
        ours_summary = summarize(ours)
        rat = ratios(ours_summary or {}, orig or {})
        if orig is not None and orig.get("source") == "other machine":
            rat["s_per_iter"] = rat["cpu_s_per_iter"] = math.nan
        results.append({"row": row.name, "setting": row.setting, "method": row.method, "ipc": row.ipc,
                        "label": row.label, "ours": ours, "original": original_runs, "ours_summary": ours_summary,
                        "original_summary": orig, "ours_over_original": rat})
    console.print(table(results, shapes, args.threads, args.rounds, args.precision))
    heap = _malloc_sides(results)
    console.print(f"C heap (mim4dd_fast/allocator.py): ours {heap['ours']}, original {heap['original']}.")
    if any(m.get("theta_store_bytes") for r in results for m in r["ours"]):
        console.print("The checkpointed unroll also keeps one flat parameter vector per student step (not saved "
                      "for backward, so not in that figure): (syn_steps + 1) x parameters x 4 bytes.")
    if any((r["original_summary"] or {}).get("source") == "other machine" for r in results):
        console.print("\"other machine\": no checkout given, so the original's figures are typed in from a "
                      "measurement on another machine; seconds are not compared. Give --mtt-repo / --dc-repo.")
    if args.json:
        from mim4dd_fast.io import atomic_write_json
        from mim4dd_fast.profiling import environment

        originals = {kind: {"repository": _originals.REPOSITORIES[kind], "path": path,
                            "commit": _originals.git_commit(Path(path))}
                     for kind, path in (("mtt", args.mtt_repo), ("dc", args.dc_repo)) if path is not None}
        atomic_write_json(args.json, {"environment": environment("cpu") | {"threads": args.threads},
                                      "command": ["python", "bench/baselines.py", *(argv or sys.argv[1:])],
                                      "originals": originals, "shapes": vars(shapes), "smoke": args.smoke,
                                      "repeats": args.repeats, "rounds": args.rounds, "precision": args.precision,
                                      "malloc": _malloc_sides(results), "rows": results})
    failed = any("error" in m for r in results for m in [*r["ours"], *r["original"]])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
