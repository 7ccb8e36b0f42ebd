"""CIFAR-10, CIFAR-100 and STL-10 through the real torchvision loaders, as uint8 N×C×H×W tensors.

We go through torchvision (not our own file readers) so that the on-disk formats, the label
conventions (STL-10's 1-based labels) and the download/verification logic are the ones everybody
else uses. We read the loaders' ``.data`` arrays directly instead of calling ``__getitem__`` per item:
50k CIFAR images convert in well under a second that way, versus minutes through PIL.

torchvision verifies the md5 of every file on construction. Tests cannot ship the real archives, so
they write tiny files in the exact formats and wrap loading in :func:`relaxed_checksums`, the single
place where verification is relaxed. Production code never calls it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from impactx_ray.errors import UserError

# Name -> (torchvision class name, archive file name the user would download).
_ARCHIVES: dict[str, tuple[str, str]] = {
    "cifar10": ("CIFAR10", "cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR100", "cifar-100-python.tar.gz"),
    "stl10": ("STL10", "stl10_binary.tar.gz"),
}

# Used only when an STL-10 folder lacks class_names.txt (the official archive has it; torchvision then
# leaves `.classes` unset). Order = label order of the official data set.
_STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]

Raw = tuple[torch.Tensor, torch.Tensor, list[str]]  # (uint8 images N×C×H×W, int64 labels N, classes)


def _dataset_class(name: str) -> type:
    import torchvision.datasets as tvd  # lazy: keeps `import impactx_ray.data` cheap for the CLI

    return getattr(tvd, _ARCHIVES[name][0])


@contextlib.contextmanager
def relaxed_checksums() -> Iterator[None]:
    """Within this block, torchvision's CIFAR/STL-10 loaders accept files by existence, not md5.

    FOR TESTS ONLY: the one documented place where verification is relaxed, so that tiny files written
    in the exact on-disk formats load through the real loaders. It swaps the module-level
    ``check_integrity`` that ``torchvision.datasets.cifar`` and ``torchvision.datasets.stl10`` call
    (from each class's ``_check_integrity`` and from CIFAR's ``_load_meta``) for a plain file-existence
    check, and restores the originals on exit. Not thread-safe; nests correctly.
    """
    import torchvision.datasets.cifar as cifar_mod
    import torchvision.datasets.stl10 as stl10_mod

    def exists_only(fpath: str | os.PathLike, md5: str | None = None) -> bool:
        return os.path.isfile(fpath)

    saved = [(mod, mod.check_integrity) for mod in (cifar_mod, stl10_mod)]
    try:
        for mod, _ in saved:
            mod.check_integrity = exists_only
        yield
    finally:
        for mod, original in saved:
            mod.check_integrity = original


def required_files(name: str) -> list[str]:
    """File names (relative to the data set's base folder) that torchvision needs to construct it."""
    cls = _dataset_class(name)
    files = [f for f, _md5 in cls.train_list + cls.test_list]
    if hasattr(cls, "meta"):  # CIFAR: batches.meta / meta, read by _load_meta
        files.append(cls.meta["filename"])
    return files


def base_dir(name: str, root: str | Path) -> Path:
    """Where torchvision expects the extracted archive: ``<root>/<base_folder>``."""
    return Path(os.path.expanduser(str(root))) / _dataset_class(name).base_folder


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def check_torchvision_present(name: str, root: str | Path) -> None:
    """Raise a one-line UserError naming the folder when files are missing and we may not download."""
    folder = base_dir(name, root)
    missing = [f for f in required_files(name) if not (folder / f).is_file()]
    if missing:
        archive = _ARCHIVES[name][1]
        raise UserError(
            f"{name} not found under {folder} (missing {', '.join(missing)}); "
            f"download it with --download or put the extracted {archive} there"
        )


def _construct(name: str, root: str | Path, train: bool, download: bool):
    """Build the torchvision data set, turning its RuntimeErrors into UserErrors that say what to do."""
    cls = _dataset_class(name)
    split_kw = {"split": "train" if train else "test"} if name == "stl10" else {"train": train}
    root_s = os.path.expanduser(str(root))
    try:
        return cls(root=root_s, download=download, **split_kw)
    except RuntimeError as exc:
        # Files exist (checked before) or were just downloaded, so this is a checksum failure.
        raise UserError(
            f"{name} files under {base_dir(name, root)} failed torchvision's checksum check "
            f"({_one_line(exc)}); delete that folder and download it again with --download"
        ) from exc
    except OSError as exc:  # URLError, disk full, permissions...
        what = "downloading" if download else "reading"
        raise UserError(
            f"{what} {name} into {root_s} failed ({_one_line(exc)}); check the network and disk, or put "
            f"the extracted {_ARCHIVES[name][1]} under {base_dir(name, root)}"
        ) from exc


def _to_raw(name: str, ds) -> Raw:
    if name == "stl10":
        # STL10.data is already N×C×H×W (torchvision transposes the column-major file into H, W
        # order), as a non-contiguous view; labels are uint8 and already 0-based.
        images = torch.from_numpy(np.ascontiguousarray(ds.data, dtype=np.uint8))
        labels = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))
        classes = list(getattr(ds, "classes", None) or _STL10_CLASSES)
    else:
        # CIFAR .data is N×H×W×C uint8; one permute + contiguous copy gives N×C×H×W.
        images = torch.from_numpy(np.asarray(ds.data, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))
        classes = list(ds.classes)
    return images, labels, classes


def load_torchvision(name: str, root: str | Path, download: bool) -> tuple[Raw, Raw]:
    """(train, test) of ``cifar10``/``cifar100``/``stl10`` as raw tensors; downloads only if asked."""
    if not download:
        check_torchvision_present(name, root)
    train = _to_raw(name, _construct(name, root, train=True, download=download))
    # The first construction downloaded everything needed; never fetch twice.
    test = _to_raw(name, _construct(name, root, train=False, download=False))
    return train, test
