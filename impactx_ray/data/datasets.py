"""Image data sets as compact uint8 tensors: cifar10, cifar100, stl10, digits and imagefolder:PATH.

Everything is held as uint8 N×C×H×W at the data set's native resolution (32×32 CIFAR, 96×96 STL-10)
because SHAP maps are computed at that resolution (docs/method.md, "SHAP maps of the true class")
and uint8 keeps CIFAR at 150 MB instead of 600 MB; models convert batches with
:meth:`ImageData.float_images` and resize themselves.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from impactx_ray.data.torchvision_sets import check_torchvision_present, load_torchvision
from impactx_ray.errors import UserError, is_int

BUILTIN_DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "stl10")
IMAGEFOLDER_PREFIX = "imagefolder:"

# Known sizes, so sweeps can build models without loading anything.
_NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "stl10": 10}
_IMAGE_SIZE = {"digits": (32, 32), "cifar10": (32, 32), "cifar100": (32, 32), "stl10": (96, 96)}

# The digits test set is fixed (seed and fraction independent of the user's seed) so test accuracy
# is comparable across every run and sweep.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_SIZE = 32


def _as_index(idx: Any) -> Any:
    """Accept torch tensors, NumPy arrays, sequences or slices as an index along the first axis."""
    if isinstance(idx, (slice, torch.Tensor)):
        return idx
    arr = np.asarray(idx)
    if arr.dtype == bool:
        return torch.from_numpy(arr.copy())
    return torch.from_numpy(arr.astype(np.int64, copy=False).reshape(-1))


@dataclass
class ImageData:
    """A labelled image set. ``images`` uint8 N×3×H×W, ``labels`` int64 N, ``classes`` label names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        # Programming errors, not user input: fail loudly at the point of construction.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 N×3×H×W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 of length {self.images.shape[0]}, got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the stored images."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def float_images(self, idx: Any = None) -> torch.Tensor:
        """float32 images in [0, 1], N×C×H×W; only the rows in ``idx`` if given (converted on demand)."""
        x = self.images if idx is None else self.images[_as_index(idx)]
        return x.to(torch.float32).div_(255.0)

    def subset(self, idx: Any) -> ImageData:
        """The rows in ``idx`` (index tensor/array/sequence, boolean mask or slice), same classes."""
        i = _as_index(idx)
        return ImageData(self.images[i], self.labels[i], list(self.classes))


def _imagefolder_path(name: str) -> Path:
    return Path(os.path.expanduser(name[len(IMAGEFOLDER_PREFIX):]))


def check_dataset_name(name: str) -> None:
    """UserError unless ``name`` is one of :data:`BUILTIN_DATASETS` or ``imagefolder:PATH``."""
    if not isinstance(name, str):
        raise UserError(f"dataset {name!r} is not a name; use one of {', '.join(BUILTIN_DATASETS)} or imagefolder:PATH")
    if name.startswith(IMAGEFOLDER_PREFIX):
        if not name[len(IMAGEFOLDER_PREFIX):].strip():
            raise UserError(f"dataset {name!r} has no path; use imagefolder:PATH with PATH/train and PATH/test")
        return
    if name not in BUILTIN_DATASETS:
        raise UserError(f"unknown dataset {name!r}; use one of {', '.join(BUILTIN_DATASETS)} or imagefolder:PATH")


def _check_image_size(image_size: int) -> int:
    if not is_int(image_size, 1):
        raise UserError(f"image size {image_size!r} is not a positive integer; use e.g. 32")
    return int(image_size)


def _imagefolder_classes(path: Path, split: str) -> list[str]:
    """Class names the way torchvision's ImageFolder finds them: sorted sub-directories."""
    folder = path / split
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist; create {path}/train/<class>/* and "
                        f"{path}/test/<class>/* with the same class folders")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise UserError(f"image folder {folder} has no class sub-folders; put images in {folder}/<class>/")
    if len(classes) < 2:  # a one-class "classifier" would report accuracy 1.0 and mean nothing
        raise UserError(f"image folder {folder} has one class folder ({classes[0]!r}); a "
                        "classifier needs at least two")
    return classes


def dataset_num_classes(name: str) -> int:
    """Number of classes without loading images (imagefolder: the class folders in PATH/train)."""
    check_dataset_name(name)
    if name.startswith(IMAGEFOLDER_PREFIX):
        return len(_imagefolder_classes(_imagefolder_path(name), "train"))
    return _NUM_CLASSES[name]


def dataset_image_size(name: str, image_size: int = 32) -> tuple[int, int]:
    """(H, W) that :func:`load_dataset` will return. ``image_size`` applies to imagefolder only."""
    check_dataset_name(name)
    if name.startswith(IMAGEFOLDER_PREFIX):
        s = _check_image_size(image_size)
        return s, s
    return _IMAGE_SIZE[name]


def digits_split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices into sklearn's 1797 digits: fixed, stratified, 20% test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train_idx, test_idx = train_test_split(
        np.arange(len(target)), test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=target
    )
    return np.sort(train_idx), np.sort(test_idx)


def _load_digits() -> tuple[ImageData, ImageData]:
    """sklearn's 8×8 digits (bundled, offline) as 3×32×32 uint8 so 32×32 models such as LeNet-5 fit."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)  # N×1×8×8, 0..255
    x = torch.nn.functional.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    images = x.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    full = ImageData(images, labels, [str(c) for c in range(10)])
    train_idx, test_idx = digits_split_indices()
    return full.subset(train_idx), full.subset(test_idx)


# Why a file was unreadable, for these exceptions only: PIL's ways of saying "not an image I can
# decode" (truncated or foreign bytes, a decompression bomb). Anything else is a bug and raises.
_UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
               Image.DecompressionBombError, Image.DecompressionBombWarning)


UNREADABLE = _UNREADABLE  # for readers of single files (``impactx predict``, ``impactx serve``)


def _read_image(path: Any, tf: Any) -> torch.Tensor:
    """One image (a path, or a binary file object) as uint8 3×S×S. PIL's decompression-bomb
    limit is kept, and its warning (over ``Image.MAX_IMAGE_PIXELS``, before the hard error at
    twice that) counts as refusal."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            rgb = img.convert("RGB")  # decodes every byte: a truncated file fails here
    return tf(rgb)


def read_image(source: Any, size: tuple[int, int]) -> torch.Tensor:
    """One image file (a path or a binary file object) as uint8 3×H×W at ``size``, made the way
    imagefolder training images are: decoded to RGB, resized (PIL bilinear, antialiased; an
    image already at ``size`` is kept as is). Raises one of :data:`UNREADABLE` when PIL cannot
    decode it."""
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize(size), transforms.PILToTensor()])
    return _read_image(source, tf)


def _read_imagefolder(folder: Path, image_size: int, classes: list[str], *, strict: bool,
                      warn: Callable[[str], None]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every image of ``folder/<class>/``; unreadable files are skipped with one warning that
    counts and names them, or refused on one line with ``strict``."""
    from torchvision import transforms
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    tf = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.PILToTensor()])
    samples = make_dataset(str(folder), {c: i for i, c in enumerate(classes)},
                           extensions=IMG_EXTENSIONS, allow_empty=True)
    images, labels, bad = [], [], []
    for path, label in samples:
        try:
            images.append(_read_image(path, tf))
        except _UNREADABLE as e:
            reason = " ".join(str(e).split())[:160] or type(e).__name__
            if strict:
                raise UserError(f"image file {path} is unreadable ({reason}); fix or remove it, "
                                "or drop --strict to skip unreadable files") from None
            bad.append(f"{path}: {reason}")
            continue
        labels.append(label)
    if bad:
        warn(f"skipped {len(bad)} unreadable image file{'s' * (len(bad) > 1)} of {len(samples)} "
             f"in {folder} (--strict refuses them):\n  " + "\n  ".join(bad))
    empty = sorted(set(classes) - {classes[i] for i in labels})
    if empty:
        raise UserError(f"image folder {folder}: class folder{'s' * (len(empty) > 1)} "
                        f"{', '.join(empty)} hold{'s' * (len(empty) == 1)} no readable image; add "
                        "images or remove the class from train and test")
    stacked = torch.stack(images) if images else torch.empty((0, 3, image_size, image_size),
                                                            dtype=torch.uint8)
    return stacked, torch.tensor(labels, dtype=torch.int64), list(classes)


def _load_imagefolder(path: Path, image_size: int, *, strict: bool,
                      warn: Callable[[str], None]) -> tuple[ImageData, ImageData]:
    train_classes = _imagefolder_classes(path, "train")
    test_classes = _imagefolder_classes(path, "test")
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise UserError(f"image folder {path}: train and test class folders differ (only in train: {only_train}, "
                        f"only in test: {only_test}); use the same class folders in both")
    train = ImageData(*_read_imagefolder(path / "train", image_size, train_classes, strict=strict,
                                         warn=warn))
    test = ImageData(*_read_imagefolder(path / "test", image_size, test_classes, strict=strict,
                                        warn=warn))
    return train, test


def _warn_stderr(message: str) -> None:
    print(f"impactx: warning: {message}", file=sys.stderr, flush=True)


def _check_labels(name: str, data: ImageData) -> None:
    """Catch corrupt label files early, not as an index error deep inside training."""
    if len(data) and (int(data.labels.min()) < 0 or int(data.labels.max()) >= data.num_classes):
        raise UserError(f"{name} has labels outside 0..{data.num_classes - 1}; its label files are corrupt, "
                        "download it again")


def check_data_present(name: str, root: str | Path = "./data", image_size: int = 32) -> None:
    """UserError naming what is missing when ``load_dataset(name, root)`` could not find its files
    (without reading them: cheap enough for a dry run)."""
    check_dataset_name(name)
    if name.startswith(IMAGEFOLDER_PREFIX):
        path = _imagefolder_path(name)
        if _imagefolder_classes(path, "train") != _imagefolder_classes(path, "test"):
            raise UserError(f"image folder {path}: train and test class folders differ")
    elif name != "digits":
        check_torchvision_present(name, root)


def load_dataset(
    name: str, root: str | Path = "./data", *, download: bool = False, image_size: int = 32,
    strict: bool = False, warn: Callable[[str], None] | None = None,
) -> tuple[ImageData, ImageData]:
    """Load (train, test) of a data set.

    ``root`` holds the torchvision folders (cifar-10-batches-py, cifar-100-python, stl10_binary).
    ``download`` lets torchvision fetch missing files; otherwise missing files raise a UserError saying
    where to put them. ``image_size`` is the square side imagefolder images are resized to; the other
    data sets have a fixed native size (digits 32, CIFAR 32, STL-10 96). Unreadable imagefolder
    files are skipped with a warning through ``warn`` (default: a line on stderr) naming each, or
    refused with ``strict``.
    """
    check_dataset_name(name)
    if name.startswith(IMAGEFOLDER_PREFIX):
        train, test = _load_imagefolder(_imagefolder_path(name), _check_image_size(image_size),
                                        strict=strict, warn=warn or _warn_stderr)
    elif name == "digits":
        train, test = _load_digits()
    else:
        (tr, te) = load_torchvision(name, root, download)
        train, test = ImageData(*tr), ImageData(*te)
    for part in (train, test):
        _check_labels(name, part)
    return train, test


def fingerprint(images: torch.Tensor, labels: Any) -> str:
    """sha256 hex of the image bytes followed by the labels as int64: "same inputs" for a map store.

    Any image dtype (the datasets' uint8, or float tensors handed to the explainer directly).
    """
    h = hashlib.sha256()
    # Hash the tensors' own memory (no tobytes() copy of a 150 MB array).
    h.update(np.ascontiguousarray(images.detach().cpu().numpy()).data)
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    h.update(np.ascontiguousarray(y, dtype=np.int64).data)
    return h.hexdigest()


def dataset_fingerprint(data: ImageData) -> str:
    """The :func:`fingerprint` of a data set's images and labels."""
    return fingerprint(data.images, data.labels)
