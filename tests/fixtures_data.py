"""Writers of tiny data sets in the exact on-disk formats torchvision reads (no download in tests).

Each writer returns a :class:`Written` record with the images (uint8 N×3×H×W, the layout
``load_dataset`` returns) and labels (0-based) it wrote, so tests can assert exact round trips.
Load CIFAR/STL-10 files written here inside ``impactx_ray.data.relaxed_checksums()``: their md5
sums differ from the real archives'.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Written:
    train_images: np.ndarray  # uint8 N×3×H×W
    train_labels: np.ndarray  # int64 N, 0-based
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


def _random_split(rng: np.random.Generator, n: int, num_classes: int, size: tuple[int, int]):
    images = rng.integers(0, 256, size=(n, 3, *size), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n).astype(np.int64)
    return images, labels


def _pickle(path: Path, obj: dict) -> None:
    # The real files are Python 2 pickles whose str keys torchvision decodes with encoding="latin1";
    # Python 3 str keys load identically.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: str | Path, n_train: int = 10, n_test: int = 4, seed: int = 0) -> Written:
    """``root/cifar-10-batches-py``: data_batch_1..5 (train split over them), test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    classes = [f"c10_{i}" for i in range(10)]
    tr_x, tr_y = _random_split(rng, n_train, 10, (32, 32))
    te_x, te_y = _random_split(rng, n_test, 10, (32, 32))
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    # Row layout of the real files: 1024 red, 1024 green, 1024 blue values, each plane row-major.
    for b, idx in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        _pickle(folder / f"data_batch_{b}", {
            "batch_label": f"training batch {b} of 5",
            "labels": [int(v) for v in tr_y[idx]],
            "data": tr_x[idx].reshape(len(idx), 3072),
            "filenames": [f"train_{i}.png" for i in idx],
        })
    _pickle(folder / "test_batch", {
        "batch_label": "testing batch 1 of 1",
        "labels": [int(v) for v in te_y],
        "data": te_x.reshape(n_test, 3072),
        "filenames": [f"test_{i}.png" for i in range(n_test)],
    })
    _pickle(folder / "batches.meta", {"num_cases_per_batch": 10000, "label_names": classes, "num_vis": 3072})
    return Written(tr_x, tr_y, te_x, te_y, classes)


def write_cifar100(root: str | Path, n_train: int = 10, n_test: int = 4, seed: int = 1) -> Written:
    """``root/cifar-100-python``: train, test (fine and coarse labels), meta."""
    rng = np.random.default_rng(seed)
    classes = [f"c100_{i}" for i in range(100)]
    tr_x, tr_y = _random_split(rng, n_train, 100, (32, 32))
    te_x, te_y = _random_split(rng, n_test, 100, (32, 32))
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, x, y in (("train", tr_x, tr_y), ("test", te_x, te_y)):
        _pickle(folder / split, {
            "filenames": [f"{split}_{i}.png" for i in range(len(y))],
            "batch_label": f"{split} batch",
            "fine_labels": [int(v) for v in y],
            "coarse_labels": [int(v) // 5 for v in y],
            "data": x.reshape(len(y), 3072),
        })
    _pickle(folder / "meta", {"fine_label_names": classes, "coarse_label_names": [f"super_{i}" for i in range(20)]})
    return Written(tr_x, tr_y, te_x, te_y, classes)


def write_stl10(
    root: str | Path, n_train: int = 3, n_test: int = 2, seed: int = 2, class_names: bool = True
) -> Written:
    """``root/stl10_binary``: train_X/y.bin, test_X/y.bin, an empty unlabeled_X.bin, class_names.txt.

    Images are stored as the real files store them: each 3×96×96 image column-major within each
    channel (i.e. the C×W×H array in C order); labels are 1-based uint8. torchvision refuses to
    construct STL10 unless unlabeled_X.bin exists, hence the (empty) file.
    """
    rng = np.random.default_rng(seed)
    classes = [f"stl_{i}" for i in range(10)]
    tr_x, tr_y = _random_split(rng, n_train, 10, (96, 96))
    te_x, te_y = _random_split(rng, n_test, 10, (96, 96))
    folder = Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    for split, x, y in (("train", tr_x, tr_y), ("test", te_x, te_y)):
        (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes())
        (folder / f"{split}_y.bin").write_bytes((y + 1).astype(np.uint8).tobytes())
    (folder / "unlabeled_X.bin").write_bytes(b"")
    if class_names:
        (folder / "class_names.txt").write_text("\n".join(classes) + "\n")
    return Written(tr_x, tr_y, te_x, te_y, classes)


def write_imagefolder(
    root: str | Path,
    classes: tuple[str, ...] = ("cat", "dog", "emu"),
    n_per_class: int = 2,
    size: tuple[int, int] = (20, 24),
    test_classes: tuple[str, ...] | None = None,
    uniform: bool = False,
    seed: int = 3,
) -> Written:
    """``root/train/<class>/img_XXX.png`` and ``root/test/<class>/img_XXX.png`` (lossless PNG, RGB).

    ``size`` is (H, W). ``uniform=True`` paints each image one random colour, so its pixel values
    survive any resize exactly. ``test_classes`` (default: ``classes``) lets tests create a mismatch.
    Returned arrays are in ImageFolder's order (class folder, then file name).
    """
    rng = np.random.default_rng(seed)
    out = []
    for split, names in (("train", classes), ("test", test_classes or classes)):
        images, labels = [], []
        for label, cls in enumerate(sorted(names)):
            d = Path(root) / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for j in range(n_per_class):
                if uniform:
                    colour = rng.integers(0, 256, size=(3, 1, 1), dtype=np.uint8)
                    img = np.broadcast_to(colour, (3, *size)).copy()
                else:
                    img = rng.integers(0, 256, size=(3, *size), dtype=np.uint8)
                Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(d / f"img_{j:03d}.png")
                images.append(img)
                labels.append(label)
        out.append((np.stack(images), np.asarray(labels, dtype=np.int64)))
    (tr_x, tr_y), (te_x, te_y) = out
    return Written(tr_x, tr_y, te_x, te_y, sorted(classes))
