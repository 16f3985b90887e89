"""A folder of images, one sub-folder per class (the torchvision ImageFolder layout), read with Pillow.

Choices (docs/method.md explains them):
- splits: ``PATH/train`` and ``PATH/test`` when both exist, else a seeded 20% per class is held out
  (at least one image when the class has two or more);
- images: every image is converted to RGB, resized so its shorter side is ``size`` and centre-cropped
  to ``size`` x ``size`` (as MTT does for its ImageNet subsets); if *every* image is grayscale the
  set is stored with one channel instead;
- an image Pillow cannot decode is skipped, counted and reported in one warning, not fatal;
- hidden entries (name starts with '.') are ignored, symlinks that resolve outside PATH are never
  followed, symlinked directories inside a class are not entered; class names are only labels.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import DataError

EXTENSIONS = {".png", ".jpg", ".jpeg"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
TEST_FRACTION = 0.2


def _inside(path: Path, root: Path) -> bool:
    """True when ``path`` (symlinks resolved) lies within ``root`` (already resolved)."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(root)
    except OSError:
        return False


def _class_dirs(split_dir: Path, root: Path) -> dict[str, Path]:
    """Visible sub-folders of ``split_dir`` that stay inside ``root``, by name."""
    out = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=True):
            continue
        if entry.is_symlink() and not _inside(Path(entry.path), root):
            warnings.warn(f"Ignoring class folder {entry.path}: it links outside {root}.", stacklevel=3)
            continue
        out[entry.name] = Path(entry.path)
    return out


def _image_files(class_dir: Path, root: Path) -> list[Path]:
    """Image files under ``class_dir`` (nested folders included), sorted for a deterministic order."""
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fname in filenames:
            p = Path(dirpath) / fname
            if fname.startswith(".") or p.suffix.lower() not in EXTENSIONS:
                continue
            if p.is_symlink() and not _inside(p, root):
                continue
            files.append(p)
    return sorted(files)


def _decode(path: Path, size: int) -> tuple[np.ndarray, bool] | None:
    """uint8 [3, size, size] and whether the source was grayscale; None if Pillow cannot decode it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            gray = img.mode in _GRAY_MODES
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                # Wide grayscale: scale to 8 bits by the file's own maximum instead of clipping.
                arr = np.asarray(img, dtype=np.float64)
                top = arr.max() if arr.size and arr.max() > 0 else 1.0
                img = Image.fromarray(np.round(arr * (255.0 / top)).astype(np.uint8), mode="L")
            rgb = img.convert("RGB")
            w, h = rgb.size
            scale = size / min(w, h)
            new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
            rgb = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR)
            left, top_ = (new_w - size) // 2, (new_h - size) // 2
            rgb = rgb.crop((left, top_, left + size, top_ + size))
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1), gray
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None


def _read_split(split_dir: Path, classes: list[str], dirs: dict[str, Path], root: Path, size: int,
                failed: list[Path]):
    """Decoded images of each class, in class order; DataError for an empty class folder."""
    per_class: list[list[tuple[np.ndarray, bool]]] = []
    for name in classes:
        if name not in dirs:
            per_class.append([])
            continue
        files = _image_files(dirs[name], root)
        if not files:
            raise DataError(f"Class folder {dirs[name]} has no PNG or JPEG images; remove it or add images.")
        decoded = []
        for p in files:
            item = _decode(p, size)
            if item is None:
                failed.append(p)
            else:
                decoded.append(item)
        if not decoded:
            raise DataError(f"Class folder {dirs[name]} has no image that can be decoded.")
        per_class.append(decoded)
    return per_class


def _require_classes(dirs: dict[str, Path], where: Path) -> list[str]:
    if not dirs:
        raise DataError(f"Image folder {where} has no class sub-folders (it needs one folder per class).")
    return list(dirs)


def _stack(per_class, indices=None):
    xs, ys = [], []
    for c, items in enumerate(per_class):
        chosen = items if indices is None else [items[i] for i in indices[c]]
        xs += [a for a, _ in chosen]
        ys += [c] * len(chosen)
    return xs, np.asarray(ys, dtype=np.int64)


def load_imagefolder(path: str | Path | None, size: int = 32, seed: int = 0):
    """((x_train, y_train, x_test, y_test), class_names, skipped); images uint8 [N, C, size, size]."""
    if path is None or str(path) == "":
        raise DataError("imagefolder needs a path: use --dataset imagefolder:PATH.")
    if size < 1:
        raise DataError(f"image size must be at least 1, got {size}.")
    base = Path(path).expanduser()
    if not base.is_dir():
        raise DataError(f"Image folder {base} does not exist or is not a directory.")
    root = Path(os.path.realpath(base))
    has_train, has_test = (base / "train").is_dir(), (base / "test").is_dir()
    if has_train != has_test:
        raise DataError(f"Image folder {base} has a '{'train' if has_train else 'test'}' folder but no "
                        f"'{'test' if has_train else 'train'}' folder; provide both splits or neither.")
    failed: list[Path] = []
    if has_train:
        for split in ("train", "test"):
            if not _inside(base / split, root):
                raise DataError(f"{base / split} is a symlink to outside {base}; it is not followed.")
        train_dirs = _class_dirs(base / "train", root)
        test_dirs = _class_dirs(base / "test", root)
        extra = sorted(set(test_dirs) - set(train_dirs))
        if extra:
            raise DataError(f"Test classes {extra} of {base} have no folder in {base / 'train'}.")
        classes = _require_classes(train_dirs, base / "train")
        train = _read_split(base / "train", classes, train_dirs, root, size, failed)
        test = _read_split(base / "test", classes, test_dirs, root, size, failed)
        x_train, y_train = _stack(train)
        x_test, y_test = _stack(test)
        gray = all(g for items in train + test for _, g in items)
    else:
        dirs = _class_dirs(base, root)
        classes = _require_classes(dirs, base)
        items = _read_split(base, classes, dirs, root, size, failed)
        rng = np.random.default_rng(seed)
        train_idx, test_idx = [], []
        for decoded in items:
            n = len(decoded)
            n_test = max(1, int(round(n * TEST_FRACTION))) if n >= 2 else 0
            order = rng.permutation(n)
            test_idx.append(sorted(order[:n_test].tolist()))
            train_idx.append(sorted(order[n_test:].tolist()))
        x_train, y_train = _stack(items, train_idx)
        x_test, y_test = _stack(items, test_idx)
        gray = all(g for decoded in items for _, g in decoded)
    if failed:
        shown = ", ".join(str(p) for p in failed[:3]) + (" ..." if len(failed) > 3 else "")
        warnings.warn(f"Skipped {len(failed)} image(s) that could not be decoded: {shown}", stacklevel=2)
    channels = slice(0, 1) if gray else slice(0, 3)
    empty = np.zeros((0, 3, size, size), dtype=np.uint8)
    x_train = (np.stack(x_train) if x_train else empty)[:, channels]
    x_test = (np.stack(x_test) if x_test else empty)[:, channels]
    return (x_train, y_train, x_test, y_test), classes, len(failed)
