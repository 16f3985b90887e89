"""bench/baselines.py and bench/_originals.py against a tiny stand-in of the original repositories.

The stand-in is written here under tmp_path: modules named like the originals' (networks.py, utils.py,
reparam_module.py) with the functions the bench calls, importing what the real ones import
(torchvision, kornia, tqdm, scipy.ndimage.interpolation) and sharing siamese DSA parameters with
``X[:] = X[0]`` like DatasetCondensation does. No network, small shapes.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_baselines", BENCH / "baselines.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_baselines"] = module
    spec.loader.exec_module(module)
    return module


bl = _load()
import _originals  # noqa: E402  (on the path once bench_baselines is loaded)

NETWORKS = '''
import torch
import torch.nn as nn


class ConvNet(nn.Module):
    def __init__(self, channel, num_classes, net_width, net_depth, net_act, net_norm, net_pooling, im_size=(32, 32)):
        super().__init__()
        layers, c, s = [], channel, im_size[0]
        for _ in range(net_depth):
            layers += [nn.Conv2d(c, net_width, 3, padding=1), nn.GroupNorm(net_width, net_width, affine=True),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
            c, s = net_width, s // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * s * s, num_classes)

    def embed(self, x):
        return self.features(x).view(x.shape[0], -1)

    def forward(self, x):
        return self.classifier(self.embed(x))
'''

UTILS = '''
import time
import numpy as np
import torch
import torch.nn.functional as F
import tqdm
import kornia as K
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from scipy.ndimage.interpolation import rotate as scipyrotate
from networks import ConvNet


def get_default_convnet_setting():
    return 128, 3, "relu", "instancenorm", "avgpooling"


def get_network(model, channel, num_classes, im_size=(32, 32), dist=True):
    torch.random.manual_seed(int(time.time() * 1000) % 100000)
    w, d, act, norm, pool = get_default_convnet_setting()
    return ConvNet(channel, num_classes, w, d, act, norm, pool, im_size)


def get_loops(ipc):
    return {1: (1, 1), 10: (10, 50)}[ipc]


class ParamDiffAug:
    def __init__(self):
        self.aug_mode = "S"
        self.prob_flip = 0.5


def rand_flip(x, param):
    if param.latestseed != -1:
        torch.random.manual_seed(param.latestseed)
    randf = torch.rand(x.size(0), 1, 1, 1)
    if param.Siamese:
        randf[:] = randf[0]
    return torch.where(randf < param.prob_flip, x.flip(3), x)


AUGMENT_FNS = {"flip": [rand_flip], "color": [rand_flip], "crop": [rand_flip], "cutout": [rand_flip],
               "scale": [rand_flip], "rotate": [rand_flip]}


def DiffAugment(x, strategy="", seed=-1, param=None):
    param.Siamese = seed != -1
    param.latestseed = seed
    p = strategy.split("_")[0]
    for f in AUGMENT_FNS[p]:
        x = f(x, param)
    return x.contiguous()


def match_loss(gw_syn, gw_real, args):
    return sum(((s - r) ** 2).sum() for s, r in zip(gw_syn, gw_real))


class TensorDataset(Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images.detach().float(), labels.detach()

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __len__(self):
        return self.images.shape[0]


def epoch(mode, dataloader, net, optimizer, criterion, args, aug):
    for img, lab in dataloader:
        if aug:
            img = DiffAugment(img, args.dsa_strategy, param=args.dsa_param)
        loss = criterion(net(img), lab)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return 0.0, 0.0
'''

REPARAM = '''
import torch
import torch.nn as nn
from torch.func import functional_call


class ReparamModule(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module
        self._names = [n for n, _ in module.named_parameters()]
        self._shapes = [p.shape for p in module.parameters()]
        self.flat_param = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in module.parameters()]))

    def forward(self, x, flat_param=None):
        parts = flat_param.split([s.numel() for s in self._shapes])
        return functional_call(self.module, {n: t.view(s) for n, t, s in zip(self._names, parts, self._shapes)}, (x,))
'''


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("originals")
    mtt, dc = root / "mtt-distillation", root / "DatasetCondensation"
    for repo, files in ((mtt, {"networks.py": NETWORKS, "utils.py": UTILS, "reparam_module.py": REPARAM}),
                        (dc, {"networks.py": NETWORKS, "utils.py": UTILS})):
        repo.mkdir()
        for name, text in files.items():
            (repo / name).write_text(text)
    return SimpleNamespace(mtt=mtt, dc=dc)


def test_load_serves_unused_imports_from_shims_and_leaves_sys_modules_as_it_was(repos):
    before = {name: sys.modules.get(name) for name in ("torchvision", "kornia", "tqdm", "utils", "networks")}
    orig = _originals.load(repos.dc, "dc")
    after = {name: sys.modules.get(name) for name in before}
    assert after == before  # shims and the checkout's own module names are gone again
    assert orig.kind == "dc" and orig.reparam_module is None and orig.commit is None  # not a git checkout
    assert orig.utils.ConvNet is orig.networks.ConvNet  # `from networks import ...` saw this checkout's module
    with pytest.raises(RuntimeError, match="torchvision.datasets.CIFAR10 is a bench stub"):
        orig.utils.datasets.CIFAR10("data")
    assert not list(repos.dc.glob("__pycache__"))  # the checkout is left as it was


def test_two_checkouts_with_the_same_module_names_load_side_by_side(repos):
    mtt, dc = _originals.load(repos.mtt, "mtt"), _originals.load(repos.dc, "dc")
    assert mtt.utils is not dc.utils and mtt.networks is not dc.networks
    assert mtt.reparam_module.ReparamModule.__module__ == "reparam_module"


def test_one_image_siamese_workaround_gives_the_unpatched_result_without_the_overlapping_copy(repos):
    orig = _originals.load(repos.dc, "dc")
    (wrapped,) = orig.utils.AUGMENT_FNS["flip"]
    raw = wrapped.__wrapped__
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    param = orig.utils.ParamDiffAug()
    param.Siamese, param.latestseed = True, 7
    with pytest.raises(RuntimeError, match="single memory location"):  # the failure being worked around
        raw(x, param)
    out = orig.utils.DiffAugment(x, "flip", seed=7, param=param)
    assert param.Siamese  # the flag is restored after the call
    param.Siamese = False  # for one image, sharing row 0 with the batch is a no-op: same draws, same result
    assert torch.equal(out, raw(x, param))
    out.sum().backward()
    assert x.grad.shape == x.shape
    # Batches of two or more keep the original behaviour (row 0's parameters shared by every image).
    two = torch.stack([torch.ones(3, 4, 4), torch.ones(3, 4, 4)]) * torch.arange(4.0)
    param.Siamese = True
    shared = wrapped(two, param)
    assert torch.equal(shared[0], shared[1])
    _originals.allow_one_image_siamese(orig.utils)  # idempotent
    assert orig.utils.AUGMENT_FNS["flip"] == [wrapped]


def test_original_dm_driver_does_the_same_forward_work_as_ours(repos):
    # Same architecture in the stand-in: the original's DM iteration (per-class synthetic forward) and ours
    # (one batched synthetic forward) must count the same FLOPs; an independent hand count pins both.
    row = bl.Row("t", "dm", 1, "test", "dm1", {"batch_real": 16, "dsa": False})
    ours = bl.measure_row(row, bl.SMOKE, repeats=1)
    theirs = bl.measure_row(row, bl.SMOKE, repeats=1, side="original", repo=str(repos.dc))
    conv = 2 * 16 * 3 * 9 * 8 * 8 + 2 * 16 * 16 * 9 * 4 * 4  # ConvNet-2 width 16 on 8x8, per image
    assert ours["gflop_per_iter"] * 1e9 == pytest.approx(conv * (160 + 10 + 10), rel=1e-9)
    assert theirs["gflop_per_iter"] == pytest.approx(ours["gflop_per_iter"], rel=1e-9)
    assert theirs["s_per_iter_median"] > 0 and theirs["config"]["batch_real"] == 16


def test_original_mtt_and_dc_drivers_run_their_iteration(repos):
    for name, kind in (("mtt1_s10_full", "mtt"), ("dc1", "dc")):
        res = bl.measure_row(bl.ROWS[name], bl.SMOKE, repeats=1, side="original", repo=str(getattr(repos, kind)))
        assert res["side"] == "original" and res["gflop_per_iter"] > 0 and res["saved_peak_bytes"] > 0


def test_side_by_side_run_writes_both_sides_and_their_ratio(repos, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bl.main(["--smoke", "--rows", "dm1", "--repeats", "1", "--rounds", "1", "--dc-repo", str(repos.dc),
                    "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    (ours,), (orig,) = row["ours"], row["original"]
    assert ours["side"] == "ours" and orig["side"] == "original" and orig["repo"] == str(repos.dc.resolve())
    assert row["ours_over_original"]["s_per_iter"] == pytest.approx(
        ours["s_per_iter_median"] / orig["s_per_iter_median"])
    assert data["originals"]["dc"]["commit"] is None and "mtt" not in data["originals"]
    assert "other machine" not in capsys.readouterr().out
    assert bl.main(["--render", str(out)]) == 0  # the Markdown table of docs/benchmarks.md
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| row |") and table[2].startswith("| dm1 (256 real/class) |")
    assert f"**{row['ours_over_original']['s_per_iter']:.2f}x**" in table[2]


def test_without_a_checkout_the_reference_is_labelled_other_machine_and_seconds_are_not_divided(
        tmp_path, capsys, monkeypatch):
    def in_process(row, side, args):  # the fresh-process path is covered above; measure here to stay fast
        assert side == "ours"
        return bl.measure_row(row, bl.SMOKE, args.repeats, args.seed, side)

    monkeypatch.setattr(bl, "run_worker", in_process)
    out = tmp_path / "b.json"
    assert bl.main(["--smoke", "--rows", "mtt1_s10_ckpt", "--repeats", "1", "--rounds", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["original"] == [] and row["original_summary"]["source"] == "other machine"
    assert math.isnan(row["ours_over_original"]["s_per_iter"])
    assert row["ours_over_original"]["gflop"] == pytest.approx(row["ours_summary"]["gflop"] / 89)
    (ours,) = row["ours"]
    assert ours["theta_store_bytes"] == 11 * ours["params"] * 4  # syn_steps + 1 flat vectors
    assert "(other machine)" in capsys.readouterr().out


def test_schedule_interleaves_sides_and_flips_the_order_every_round():
    args = SimpleNamespace(mtt_repo="m", dc_repo=None, rounds=2)
    plan = bl.schedule(bl.select_rows("mtt1_s10_*,dm1", None), args)
    names = [(r, side, row.name) for r, side, row in plan]
    assert names == [(0, "original", "mtt1_s10_full"), (0, "ours", "mtt1_s10_full"), (0, "ours", "mtt1_s10_ckpt"),
                     (1, "ours", "mtt1_s10_ckpt"), (1, "ours", "mtt1_s10_full"), (1, "original", "mtt1_s10_full"),
                     (0, "ours", "dm1"), (1, "ours", "dm1")]  # no --dc-repo: ours only for DM


def test_summary_is_the_median_over_rounds_and_failed_rounds_are_left_out():
    runs = [{"s_per_iter_median": s, "saved_peak_bytes": 10, "rss_rise_bytes": r, "gflop_per_iter": 2.0}
            for s, r in ((3.0, 5), (1.0, 9), (2.0, 7))] + [{"error": "boom"}]
    s = bl.summarize(runs)
    assert s == {"rounds": 3, "s_per_iter": 2.0, "s_per_iter_range": [1.0, 3.0], "saved_for_backward": 10,
                 "peak_rss_rise": 7, "gflop": 2.0}
    assert bl.summarize([{"error": "x"}]) is None
    assert bl.ratios({"s_per_iter": 1.0, "gflop": 4.0}, {"s_per_iter": 2.0, "gflop": 0.0})["s_per_iter"] == 0.5


def test_row_selection_by_name_glob_and_skip():
    assert [r.name for r in bl.select_rows("dm1,mtt1_*", "mtt1_s50_*")] == [
        "dm1", "mtt1_s10_full", "mtt1_s10_ckpt", "mtt1_s20_full", "mtt1_s20_ckpt"]
    assert len(bl.select_rows(None, "dc10")) == len(bl.ROWS) - 1
    assert {r.setting for r in bl.ROWS.values()} == set(bl.OTHER_MACHINE)  # every reference row is measured


def test_bad_flags_and_checkouts_exit_2_with_one_sentence(repos, tmp_path, capsys):
    assert bl.main(["--rows", "nosuch"]) == 2
    assert bl.main(["--rows", "dm1", "--skip", "dm*"]) == 2
    assert bl.main(["--repeats", "0"]) == 2
    assert bl.main(["--mtt-repo", str(tmp_path / "missing")]) == 2
    assert bl.main(["--mtt-repo", str(repos.dc)]) == 2  # DatasetCondensation has no reparam_module.py
    assert bl.main(["--render", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "No row matches 'nosuch'" in err and "--repeats must be at least 1" in err
    assert "is not a folder" in err and "has no reparam_module.py" in err
    assert "GeorgeCazenavette/mtt-distillation" in err and "Traceback" not in err
    assert "is not a bench/baselines.py JSON file" in err
