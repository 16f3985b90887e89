"""A folder of images, one sub-folder per class (the torchvision ImageFolder layout), read with Pillow.

Choices (docs/method.md explains them):
- splits: ``PATH/train`` and ``PATH/test`` when both exist (validation is then carved from train),
  else all images are returned and ``splits`` draws fixed train / validation / test splits;
- at least two classes, and a test folder that holds images: otherwise there is nothing to classify;
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
    if len(dirs) == 1:
        raise DataError(f"Image folder {where} has only one class sub-folder ({next(iter(dirs))}); "
                        "classification needs at least two classes.")
    return list(dirs)


def _stack(per_class, size: int):
    """uint8 [N, 3, size, size] (all classes in order) and int64 labels."""
    xs = [a for items in per_class for a, _ in items]
    ys = [c for c, items in enumerate(per_class) for _ in items]
    x = np.stack(xs) if xs else np.zeros((0, 3, size, size), dtype=np.uint8)
    return x, np.asarray(ys, dtype=np.int64)


def load_imagefolder(path: str | Path | None, size: int = 32):
    """(arrays, class_names, skipped); images uint8 [N, C, size, size].

    ``arrays`` is ``(x_train, y_train, x_test, y_test)`` when PATH has train/test folders, else ``(x, y)``
    with every image (the caller splits it).
    """
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
        if not test_dirs:
            raise DataError(f"Test folder {base / 'test'} has no class sub-folders, so the test split "
                            "would be empty; add test images (one folder per class).")
        per_split = [_read_split(base / s, classes, d, root, size, failed)
                     for s, d in (("train", train_dirs), ("test", test_dirs))]
    else:
        dirs = _class_dirs(base, root)
        classes = _require_classes(dirs, base)
        per_split = [_read_split(base, classes, dirs, root, size, failed)]
    if failed:
        shown = ", ".join(str(p) for p in failed[:3]) + (" ..." if len(failed) > 3 else "")
        warnings.warn(f"Skipped {len(failed)} image(s) that could not be decoded: {shown}", stacklevel=2)
    gray = all(g for per_class in per_split for items in per_class for _, g in items)
    channels = slice(0, 1) if gray else slice(0, 3)
    arrays = []
    for per_class in per_split:
        x, y = _stack(per_class, size)
        arrays += [x[:, channels], y]
    return tuple(arrays), classes, len(failed)
