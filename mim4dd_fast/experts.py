"""Expert trajectories for MTT: train ConvNets on real data and keep their parameters after each epoch.

An expert is a network trained on the full real training set exactly as MTT's ``buffer.py``: plain
SGD (lr 0.01, momentum 0, weight decay 0, no learning-rate decay — ``--decay`` is off by default),
batch 256, DSA on every batch (per-image parameters, not siamese), cross-entropy. Its trajectory is
the flat parameter vector (``models.flatten_params``) at epoch 0 and after every epoch: a float32
tensor [E + 1, P].

On disk, an expert directory holds ``expert_<k>.safetensors`` (one trajectory each, written
atomically) and ``manifest.json`` (settings, settings key, per-file sha256), rewritten atomically
after every expert. Expert k is trained from seed ``seed + k`` (initialisation, shuffling and
augmentation), so an interrupted run resumes at the first missing expert and produces the same
files as an uninterrupted one. Checksums are verified on load; a bad file is named in a DataError.

Under torchrun (``dist``) the ranks split the experts still missing round-robin (on a fresh run rank
r trains experts r, r + N, ...). A rank never touches the manifest: after each expert it writes the
file and then ``pending/expert_<k>.json`` (file name, sha256, settings key), both atomically. Rank 0
alone writes ``manifest.json``: at the start it adopts the valid pending records a crashed run left
(a single-process run does the same), and at the end, after a barrier that waits for the slowest
rank, it verifies every expert's checksum, writes the manifest and removes the adopted records; a
second collective then lets every rank load all experts. Every rank must call ``train_experts`` /
``ensure_experts`` (they are collective), and every rank gets all experts back.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .augment import dsa as dsa_augment
from .bounds import check_seed
from .data import Dataset
from .distributed import SINGLE, Dist
from .errors import ConfigError, DataError, NonFiniteError
from .evaluation import sgd
from .io import atomic_write_json, check_writable_dir, load_tensors, save_tensors, sha256_file
from .models import NotStackable, StackedNets, build_model, flatten_params

MANIFEST = "manifest.json"
FORMAT_VERSION = 1

# Experts trained together in one grouped net (``models.StackedNets``); see docs/method.md for the choice.
EXPERTS_PER_PASS = 4

# progress(expert_index, epochs_done, epochs_total); when epochs_done == epochs_total the expert is on disk.
Progress = Callable[[int, int, int], None]


def epochs_needed(cfg: Any) -> int:
    """Epochs of expert training MTT can use: start epochs t < max_start_epoch, targets t + expert_epochs.

    The largest target is ``max_start_epoch - 1 + expert_epochs``, so a trajectory of that many epochs
    (``+ 1`` recorded snapshots, epoch 0 included) is enough; training longer is wasted work.
    """
    return int(cfg.max_start_epoch) - 1 + int(cfg.expert_epochs)


def expert_file(k: int) -> str:
    return f"expert_{k:04d}.safetensors"


def dataset_signature(dataset: Dataset) -> dict[str, Any]:
    """What identifies the training data an expert saw (name, sizes, whitening)."""
    return {
        "name": dataset.name,
        "train_size": int(dataset.x_train.shape[0]),
        "channels": dataset.channels,
        "image_size": dataset.image_size,
        "num_classes": dataset.num_classes,
        "zca": dataset.zca is not None,
    }


def expert_settings(dataset: Dataset, *, epochs: int, seed: int, lr: float, batch_size: int, dsa: bool,
                    model_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Every setting that changes the expert files; its hash is the settings key."""
    return {
        "dataset": dataset_signature(dataset),
        "model_kwargs": dict(sorted((model_kwargs or {}).items())),
        "epochs": int(epochs),
        "seed": int(seed),
        "lr": float(lr),
        "batch_size": int(batch_size),
        "dsa": bool(dsa),
        "optimizer": "sgd(momentum=0, weight_decay=0)",
    }


def settings_key(settings: dict[str, Any]) -> str:
    """Short stable hash of the settings (cache sub-directory name)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"Expert manifest {path} is unreadable; delete the directory {out_dir} and rebuild.") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("experts"), dict) \
            or "settings_key" not in manifest:
        raise DataError(f"Expert manifest {path} is malformed; delete the directory {out_dir} and rebuild.")
    return manifest


def _verify(out_dir: Path, name: str, sha: str) -> Path:
    path = out_dir / name
    if not path.is_file():
        raise DataError(f"Expert file {path} listed in {out_dir / MANIFEST} is missing; rerun `mim4dd-fast experts` "
                        "(or the run) with the same settings and folder to train it again.")
    if sha256_file(path) != sha:
        raise DataError(f"Expert file {path} is corrupted (its checksum does not match {MANIFEST}); delete it and "
                        "rerun with the same settings and folder to train it again.")
    return path


def _read_trajectory(out_dir: Path, name: str, sha: str) -> Tensor:
    """One expert's [epochs + 1, P] trajectory: checksum, shape and finite values verified."""
    path = _verify(out_dir, name, sha)
    traj = load_tensors(path, expected_sha256=sha).get("trajectory")
    if traj is None or traj.dim() != 2 or not traj.dtype.is_floating_point:
        raise DataError(f"Expert file {path} holds no [epochs + 1, P] float trajectory.")
    if not bool(torch.isfinite(traj).all()):
        raise DataError(f"Expert file {path} holds NaN/Inf parameters (its training diverged); delete it and rerun "
                        "with a lower expert learning rate.")
    return traj


def _fresh_expert(dataset: Dataset, k: int, seed: int, model_kwargs: dict[str, Any]) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + k)  # module initialisation uses the global RNG
        return build_model(dataset.channels, dataset.num_classes, dataset.image_size, **model_kwargs)


def _check_diverged(params: Tensor, ks: list[int], epoch: int, lr: float) -> None:
    """Never save a diverged trajectory: NonFiniteError naming the first expert whose parameters ([n, P],
    one row per expert ``ks``) became NaN/Inf after ``epoch``."""
    finite = torch.isfinite(params).all(dim=1)
    if bool(finite.all()):
        return
    k = ks[int((~finite).nonzero()[0])]
    raise NonFiniteError(f"Expert {k} diverged in epoch {epoch + 1} (its parameters became NaN/Inf) with learning "
                         f"rate {lr:g}; lower it (--lr; 0.01 is MTT's) and rerun: finished experts are kept.")


def _train_one(dataset: Dataset, k: int, *, epochs: int, seed: int, lr: float, batch_size: int, dsa: bool,
               model_kwargs: dict[str, Any], device: torch.device,
               progress: Progress | None) -> Tensor:
    """Train expert ``k`` alone, deterministically from seed ``seed + k``; returns its [epochs + 1, P] trajectory."""
    gen = torch.Generator().manual_seed(seed + k)
    model = _fresh_expert(dataset, k, seed, model_kwargs).to(device).train()
    opt = sgd(model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    x_all, y_all = dataset.x_train, dataset.y_train
    n = x_all.shape[0]
    snapshots = [flatten_params(model).cpu()]
    for e in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            if dsa:
                x = dsa_augment(x, generator=gen)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        snapshots.append(flatten_params(model).cpu())
        _check_diverged(snapshots[-1][None], [k], e, lr)
        if progress is not None and e + 1 < epochs:
            progress(k, e + 1, epochs)
    return torch.stack(snapshots)


def _train_pass(dataset: Dataset, ks: list[int], *, slots: int, epochs: int, seed: int, lr: float, batch_size: int,
                dsa: bool, model_kwargs: dict[str, Any], device: torch.device,
                progress: Progress | None) -> list[Tensor]:
    """Experts ``ks`` trained together in one grouped net of exactly ``slots`` nets; their trajectories in order.

    Each expert draws from its own generator exactly as ``_train_one`` (randperm each epoch, one DSA
    call per minibatch) and its gradient is its own (the loss is the sum of the experts' mean losses).
    A pass with fewer experts than slots repeats the last one (the copies are dropped): every pass
    has the same width, so the kernels, and the bits of expert k, do not depend on which experts
    share its pass (resumed runs, torchrun's ranks). NotStackable if the model cannot be grouped.
    """
    padded = ks + [ks[-1]] * (slots - len(ks))
    stacked = StackedNets([_fresh_expert(dataset, k, seed, model_kwargs) for k in padded]).to(device).train()
    gens = [torch.Generator().manual_seed(seed + k) for k in padded]
    opt = sgd(stacked.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    x_all, y_all = dataset.x_train, dataset.y_train
    n = x_all.shape[0]
    snapshots = [stacked.flat_params().cpu()]
    for e in range(epochs):
        perms = [torch.randperm(n, generator=g) for g in gens]
        for start in range(0, n, batch_size):
            idx = [perm[start : start + batch_size] for perm in perms]
            x = [x_all[i].to(device) for i in idx]
            if dsa:
                x = [dsa_augment(b, generator=g) for b, g in zip(x, gens, strict=True)]
            y = torch.stack([y_all[i] for i in idx]).to(device)
            loss = F.cross_entropy(stacked(torch.stack(x)).flatten(0, 1), y.flatten(), reduction="none")
            opt.zero_grad(set_to_none=True)
            loss.view(slots, -1).mean(1).sum().backward()
            opt.step()
        snapshots.append(stacked.flat_params().cpu())
        _check_diverged(snapshots[-1].view(slots, -1), padded, e, lr)
        if progress is not None and e + 1 < epochs:
            for k in ks:
                progress(k, e + 1, epochs)
    trajectories = torch.stack(snapshots)  # [epochs + 1, slots, P]
    return [trajectories[:, i].clone() for i in range(len(ks))]


PENDING = "pending"


def _pending_record(out_dir: Path, name: str) -> Path:
    return out_dir / PENDING / (Path(name).stem + ".json")


def _adopt_pending(out_dir: Path, manifest: dict[str, Any], key: str) -> list[Path]:
    """Move valid pending records (expert written, checksum recorded) into ``manifest``; returns them.

    A record whose file is missing or no longer matches its checksum is dropped (the expert is
    trained again); a record of other settings means the directory is someone else's: DataError.
    """
    pending = out_dir / PENDING
    if not pending.is_dir():
        return []
    records = []
    for rec_path in sorted(pending.glob("expert_*.json")):
        try:
            rec = json.loads(rec_path.read_text())
            name, sha, rec_key = str(rec["file"]), str(rec["sha256"]), str(rec["settings_key"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            records.append(rec_path)  # cannot come from our atomic writes; not trusted, dropped
            continue
        if rec_key != key:
            raise DataError(f"Directory {out_dir} holds experts trained with other settings (in {rec_path}); "
                            "use another directory.")
        records.append(rec_path)
        if name in manifest["experts"] or name != rec_path.stem + ".safetensors":
            continue
        path = out_dir / name
        if path.exists() and sha256_file(path) == sha:
            manifest["experts"][name] = sha
    return records


def _remove_records(records: list[Path]) -> None:
    for rec in records:
        try:
            rec.unlink()
        except FileNotFoundError:
            pass
    if records:
        try:
            records[0].parent.rmdir()
        except OSError:  # not empty (records of an unfinished expert) or already gone
            pass


def _agree(dist: Dist, what: str, step: Callable[[], Any]) -> Any:
    """Run ``step`` on every rank; a DataError on any rank is raised on all of them; returns rank 0's result."""
    if not dist.enabled:
        return step()
    try:
        result, err = step(), None
    except DataError as exc:
        result, err = None, str(exc)
    gathered = dist.all_gather_objects((err, result), what)
    for r, (e, _) in enumerate(gathered):
        if e is not None:
            raise DataError(e if r == dist.rank else f"rank {r} reported: {e}")
    return gathered[0][1]


def _trajectories(dataset: Dataset, ks: list[int], *, slots: int, **train_kw: Any) -> list[Tensor]:
    """The experts ``ks``: one grouped pass of ``slots`` nets, or one by one (slots 1, or a model that cannot group)."""
    if slots > 1:
        try:
            return _train_pass(dataset, ks, slots=slots, **train_kw)
        except NotStackable:
            pass
    return [_train_one(dataset, k, **train_kw) for k in ks]


def _train_experts(dataset: Dataset, out_dir: str | Path, *, num_experts: int, epochs: int, seed: int, lr: float,
                   batch_size: int, dsa: bool, model_kwargs: dict[str, Any] | None, device: str | torch.device,
                   progress: Progress | None, dist: Dist,
                   experts_per_pass: int) -> tuple[list[Path], dict[str, Any]]:
    if num_experts < 1 or epochs < 1:
        raise ConfigError(f"num_experts and epochs must be at least 1, got {num_experts} and {epochs}.")
    if batch_size < 1 or not lr > 0 or not math.isfinite(lr):
        raise ConfigError(f"Expert batch size must be >= 1 and lr a positive finite number, got {batch_size} and {lr}.")
    if isinstance(experts_per_pass, bool) or not isinstance(experts_per_pass, int) or experts_per_pass < 1:
        raise ConfigError(f"experts_per_pass must be an integer of at least 1, got {experts_per_pass!r}.")
    for key in ("width", "depth"):
        value = (model_kwargs or {}).get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"Expert network {key} must be an integer of at least 1, got {value!r}.")
    check_seed(seed)
    out_dir = Path(out_dir)
    model_kwargs = dict(model_kwargs or {})
    settings = expert_settings(dataset, epochs=epochs, seed=seed, lr=lr, batch_size=batch_size, dsa=dsa,
                               model_kwargs=model_kwargs)
    key = settings_key(settings)
    names = [expert_file(k) for k in range(num_experts)]

    def start() -> dict[str, Any] | None:
        check_writable_dir(out_dir)  # on every rank: each one writes its own experts
        if not dist.is_main:
            return None
        manifest = _read_manifest(out_dir)
        if manifest is None:
            manifest = {"format": FORMAT_VERSION, **settings, "settings_key": key, "experts": {}}
        elif manifest["settings_key"] != key:
            raise DataError(f"Directory {out_dir} holds experts trained with other settings; use another directory.")
        before = dict(manifest["experts"])
        adopted = _adopt_pending(out_dir, manifest, key)
        for name in names:
            if name in manifest["experts"]:
                if not (out_dir / name).exists():  # deleted (e.g. after "delete it and rerun"): train it again
                    del manifest["experts"][name]
                    continue
                _verify(out_dir, name, manifest["experts"][name])
        if manifest["experts"] != before:
            manifest["num_experts"] = len(manifest["experts"])
            atomic_write_json(out_dir / MANIFEST, manifest)
        _remove_records(adopted)
        return manifest

    manifest = _agree(dist, "checking the expert directory", start)
    todo = [k for k, name in enumerate(names) if name not in manifest["experts"]]
    train_kw = {"epochs": epochs, "seed": seed, "lr": lr, "batch_size": batch_size, "dsa": dsa,
                "model_kwargs": model_kwargs, "device": torch.device(device), "progress": progress}
    mine = dist.owned(todo)  # the missing experts, round-robin: balanced on resume too
    for first in range(0, len(mine), experts_per_pass):
        ks = mine[first : first + experts_per_pass]
        for k, traj in zip(ks, _trajectories(dataset, ks, slots=experts_per_pass, **train_kw), strict=True):
            # no safetensors metadata: its key order is not stable, and identical experts must be identical files
            sha = save_tensors(out_dir / names[k], {"trajectory": traj})
            if dist.enabled:  # rank 0 adopts it into the manifest after the barrier (or a resumed run does)
                atomic_write_json(_pending_record(out_dir, names[k]),
                                  {"file": names[k], "sha256": sha, "settings_key": key})
            else:
                manifest["experts"][names[k]] = sha
                manifest["num_experts"] = len(manifest["experts"])
                atomic_write_json(out_dir / MANIFEST, manifest)
            if progress is not None:
                progress(k, epochs, epochs)

    if dist.enabled:
        dist.barrier("waiting for the other ranks to finish their experts")

        def finish() -> dict[str, Any] | None:
            if not dist.is_main:
                return None
            adopted = _adopt_pending(out_dir, manifest, key)  # checks each new file against its record
            missing = [name for name in names if name not in manifest["experts"]]
            if missing:
                raise DataError(f"Experts {', '.join(missing)} are missing or corrupted in {out_dir} after every "
                                "rank finished; the directory must be one that all nodes share.")
            manifest["num_experts"] = len(manifest["experts"])
            atomic_write_json(out_dir / MANIFEST, manifest)
            _remove_records(adopted)
            return manifest

        manifest = _agree(dist, "writing the expert manifest", finish)
    return [out_dir / name for name in names], manifest


def train_experts(
    dataset: Dataset,
    out_dir: str | Path,
    *,
    num_experts: int,
    epochs: int,
    seed: int = 0,
    lr: float = 0.01,
    batch_size: int = 256,
    dsa: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    dist: Dist = SINGLE,
    experts_per_pass: int = EXPERTS_PER_PASS,
) -> list[Path]:
    """Train (or finish training) ``num_experts`` experts into ``out_dir``; returns their files in order.

    Experts already listed in the manifest (or in valid pending records) are verified, not retrained.
    A directory holding experts of other settings is refused rather than mixed. Collective under
    torchrun: every rank calls it, trains its share, and gets all the files back.
    ``progress`` is called for this rank's experts only.
    """
    paths, _ = _train_experts(dataset, out_dir, num_experts=num_experts, epochs=epochs, seed=seed, lr=lr,
                              batch_size=batch_size, dsa=dsa, model_kwargs=model_kwargs, device=device,
                              progress=progress, dist=dist, experts_per_pass=experts_per_pass)
    return paths


def load_experts(out_dir: str | Path, expected_settings: str | dict[str, Any] | None = None) -> list[Tensor]:
    """All trajectories listed in the manifest, checksums verified, in expert order.

    ``expected_settings`` is a settings key, or a mapping of manifest fields (e.g. ``{"epochs": 20}``)
    that must match; a mismatch is a DataError naming the field.
    """
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    if manifest is None:
        raise DataError(f"No expert manifest in {out_dir}; train experts there first (mim4dd-fast experts).")
    if isinstance(expected_settings, str):
        if manifest["settings_key"] != expected_settings:
            raise DataError(f"Experts in {out_dir} were trained with other settings (key {manifest['settings_key']}).")
    elif expected_settings:
        for field, want in expected_settings.items():
            if manifest.get(field) != want:
                raise DataError(f"Experts in {out_dir} have {field} = {manifest.get(field)!r}, expected {want!r}.")
    if not manifest["experts"]:
        raise DataError(f"The expert manifest in {out_dir} lists no experts.")
    return [_read_trajectory(out_dir, name, manifest["experts"][name]) for name in sorted(manifest["experts"])]


def ensure_experts(
    dataset: Dataset,
    cache_root: str | Path,
    *,
    num_experts: int,
    epochs: int,
    seed: int = 0,
    lr: float = 0.01,
    batch_size: int = 256,
    dsa: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    dist: Dist = SINGLE,
    experts_per_pass: int = EXPERTS_PER_PASS,
) -> list[Tensor]:
    """Build (or finish, or just load) experts in ``cache_root/<dataset>-<settings key>`` and return them.

    The key hashes dataset name and sizes, model kwargs, epochs, seed, lr, batch size and DSA, so any
    caller asking for the same settings reuses the same files; asking for more experts extends them.
    Collective under torchrun (see ``train_experts``); every rank returns all trajectories.
    """
    settings = expert_settings(dataset, epochs=epochs, seed=seed, lr=lr, batch_size=batch_size, dsa=dsa,
                               model_kwargs=model_kwargs)
    out_dir = Path(cache_root) / f"{dataset.name}-{settings_key(settings)}"
    paths, manifest = _train_experts(dataset, out_dir, num_experts=num_experts, epochs=epochs, seed=seed, lr=lr,
                                     batch_size=batch_size, dsa=dsa, model_kwargs=model_kwargs, device=device,
                                     progress=progress, dist=dist, experts_per_pass=experts_per_pass)
    return [_read_trajectory(out_dir, p.name, manifest["experts"][p.name]) for p in paths]
