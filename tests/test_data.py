"""Data layer: real torchvision loaders on tiny files, digits, imagefolder, splits, fingerprints."""

from __future__ import annotations

import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from impactx_ray.data import (
    BUILTIN_DATASETS,
    ImageData,
    check_dataset_name,
    dataset_fingerprint,
    dataset_image_size,
    dataset_num_classes,
    digits_split_indices,
    load_dataset,
    relaxed_checksums,
    train_val_split,
)
from impactx_ray.errors import UserError

from fixtures_data import write_cifar10, write_cifar100, write_imagefolder, write_stl10

WRITERS = {"cifar10": write_cifar10, "cifar100": write_cifar100, "stl10": write_stl10}
FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "stl10": "stl10_binary"}


# --- torchvision formats ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_torchvision_round_trip_is_exact(tmp_path: Path, name: str) -> None:
    written = WRITERS[name](tmp_path, n_train=7, n_test=3)
    with relaxed_checksums():
        train, test = load_dataset(name, tmp_path)
    side = 96 if name == "stl10" else 32
    for part, x, y in ((train, written.train_images, written.train_labels),
                       (test, written.test_images, written.test_labels)):
        assert part.images.dtype == torch.uint8 and part.labels.dtype == torch.int64
        assert tuple(part.images.shape) == (len(y), 3, side, side)
        assert part.images.is_contiguous()
        np.testing.assert_array_equal(part.images.numpy(), x)  # every pixel [i, c, h, w]
        np.testing.assert_array_equal(part.labels.numpy(), y)  # STL-10: 1-based on disk, 0-based here
        assert part.classes == written.classes
        assert part.image_size == (side, side) == dataset_image_size(name)
        assert part.num_classes == dataset_num_classes(name) == len(written.classes)


def test_stl10_layout_is_not_transposed(tmp_path: Path) -> None:
    # Pins the meaning of the axes independently of the fixture writer: an image whose pixel
    # [c, h, w] equals h (its row index), written column-major as the real files are.
    written = write_stl10(tmp_path, n_train=1, n_test=1)
    img = np.broadcast_to(np.arange(96, dtype=np.uint8)[None, :, None], (3, 96, 96))
    (tmp_path / "stl10_binary" / "train_X.bin").write_bytes(np.ascontiguousarray(img.transpose(0, 2, 1)).tobytes())
    with relaxed_checksums():
        train, _ = load_dataset("stl10", tmp_path)
    assert train.images[0, 1, 5, 70].item() == 5 and train.images[0, 2, 90, 3].item() == 90
    assert train.labels[0].item() == written.train_labels[0]


def test_stl10_without_class_names_file_uses_official_names(tmp_path: Path) -> None:
    write_stl10(tmp_path, class_names=False)
    with relaxed_checksums():
        train, _ = load_dataset("stl10", tmp_path)
    assert train.classes[:3] == ["airplane", "bird", "car"] and len(train.classes) == 10


def test_checksums_are_enforced_outside_the_relaxed_block(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    with pytest.raises(UserError, match="checksum") as err:
        load_dataset("cifar10", tmp_path)
    assert "\n" not in str(err.value)
    import torchvision.datasets.cifar as cifar_mod
    from torchvision.datasets.utils import check_integrity

    with relaxed_checksums():
        assert cifar_mod.check_integrity is not check_integrity
    assert cifar_mod.check_integrity is check_integrity  # restored


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_missing_files_without_download_name_the_path(tmp_path: Path, name: str) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(UserError) as err:
        load_dataset(name, root)
    msg = str(err.value)
    assert str(root / FOLDERS[name]) in msg and "--download" in msg and "\n" not in msg
    assert not root.exists()  # nothing was downloaded or created


def test_one_missing_file_is_named(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()
    with relaxed_checksums(), pytest.raises(UserError, match=r"missing batches\.meta"):
        load_dataset("cifar10", tmp_path)


def test_download_goes_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as cifar_mod

    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kw):  # stands in for the network
        calls.append((url, filename))
        write_cifar10(download_root, n_train=5, n_test=2)

    monkeypatch.setattr(cifar_mod, "download_and_extract_archive", fake_download)
    with relaxed_checksums():
        train, test = load_dataset("cifar10", tmp_path, download=True)
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz")]
    assert len(train) == 5 and len(test) == 2


def test_failed_download_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as cifar_mod

    def offline(*a, **kw):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(cifar_mod, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match="downloading cifar100 .*no route to host"):
        load_dataset("cifar100", tmp_path, download=True)


# --- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["mnist", "CIFAR10", "", "imagefolder:", "imagefolder:  "])
def test_unknown_dataset_names_are_user_errors(bad: str) -> None:
    with pytest.raises(UserError) as err:
        check_dataset_name(bad)
    assert repr(bad) in str(err.value)
    with pytest.raises(UserError):
        load_dataset(bad)
    with pytest.raises(UserError):
        dataset_num_classes(bad)


def test_known_names_and_cheap_metadata() -> None:
    assert BUILTIN_DATASETS == ("digits", "cifar10", "cifar100", "stl10")
    for name in BUILTIN_DATASETS + ("imagefolder:/some/path",):
        check_dataset_name(name)  # no error
    assert [dataset_num_classes(n) for n in BUILTIN_DATASETS] == [10, 10, 100, 10]
    assert [dataset_image_size(n) for n in BUILTIN_DATASETS] == [(32, 32)] * 3 + [(96, 96)]
    assert dataset_image_size("imagefolder:/x", image_size=64) == (64, 64)
    with pytest.raises(UserError, match="0"):
        dataset_image_size("imagefolder:/x", image_size=0)


# --- digits -----------------------------------------------------------------------------------------


def test_digits_are_the_real_sklearn_digits() -> None:
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits")
    bunch = load_digits()
    train_idx, test_idx = digits_split_indices()
    assert len(train) == 1437 and len(test) == 360 and len(train_idx) + len(test_idx) == 1797
    assert not set(train_idx) & set(test_idx)
    assert np.all(np.diff(train_idx) > 0) and np.all(np.diff(test_idx) > 0)  # sorted: sklearn's order
    assert train.classes == [str(i) for i in range(10)] and test.num_classes == 10
    assert tuple(test.images.shape) == (360, 3, 32, 32) and test.images.dtype == torch.uint8
    assert torch.equal(test.images[:, 0], test.images[:, 2])  # grey replicated to 3 channels
    np.testing.assert_array_equal(train.labels.numpy(), bunch.target[train_idx])
    np.testing.assert_array_equal(test.labels.numpy(), bunch.target[test_idx])
    # Stratified: every class is in the test set in about its share (~36 each).
    counts = np.bincount(test.labels.numpy(), minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    # Average-pool back to 8×8: each image matches its sklearn original almost perfectly.
    small = torch.nn.functional.avg_pool2d(test.float_images()[:, :1], 4).reshape(360, 64).numpy()
    orig = bunch.images[test_idx].reshape(360, 64) / 16.0
    corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(small, orig) if b.std() > 0]
    assert min(corr) > 0.9
    assert test.images.max().item() >= 250 and test.images.min().item() == 0  # full 0..255 range


def test_digits_are_deterministic() -> None:
    a_train, a_test = load_dataset("digits")
    b_train, b_test = load_dataset("digits", image_size=64)  # image_size does not touch digits
    assert dataset_fingerprint(a_train) == dataset_fingerprint(b_train)
    assert dataset_fingerprint(a_test) == dataset_fingerprint(b_test)
    assert dataset_fingerprint(a_train) != dataset_fingerprint(a_test)


# --- imagefolder ------------------------------------------------------------------------------------


def test_imagefolder_round_trip_at_native_size(tmp_path: Path) -> None:
    written = write_imagefolder(tmp_path, size=(24, 24))
    train, test = load_dataset(f"imagefolder:{tmp_path}", image_size=24)
    np.testing.assert_array_equal(train.images.numpy(), written.train_images)
    np.testing.assert_array_equal(test.labels.numpy(), written.test_labels)
    assert train.classes == ["cat", "dog", "emu"] == test.classes
    assert dataset_num_classes(f"imagefolder:{tmp_path}") == 3


def test_imagefolder_resizes(tmp_path: Path) -> None:
    written = write_imagefolder(tmp_path, size=(20, 30), uniform=True)
    train, test = load_dataset(f"imagefolder:{tmp_path}")  # default 32
    assert tuple(train.images.shape) == (6, 3, 32, 32) and train.images.dtype == torch.uint8
    colours = written.train_images[:, :, 0, 0]
    np.testing.assert_array_equal(train.images.numpy(), np.broadcast_to(colours[:, :, None, None], (6, 3, 32, 32)))
    _, small = load_dataset(f"imagefolder:{tmp_path}", image_size=8)
    assert small.image_size == (8, 8)
    np.testing.assert_array_equal(small.images[:, :, 3, 5].numpy(), written.test_images[:, :, 0, 0])


def test_imagefolder_converts_grayscale_to_rgb(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, size=(8, 8))
    Image.fromarray(np.full((8, 8), 77, dtype=np.uint8)).save(tmp_path / "train" / "cat" / "img_000.png")
    train, _ = load_dataset(f"imagefolder:{tmp_path}", image_size=8)
    assert (train.images[0] == 77).all()


def test_imagefolder_class_mismatch_and_missing_dirs(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "a", classes=("cat", "dog"), test_classes=("cat", "eel"))
    with pytest.raises(UserError, match=r"only in train: \['dog'\], only in test: \['eel'\]"):
        load_dataset(f"imagefolder:{tmp_path / 'a'}")
    with pytest.raises(UserError) as err:
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    assert str(tmp_path / "missing" / "train") in str(err.value)
    with pytest.raises(UserError, match="missing"):
        dataset_num_classes(f"imagefolder:{tmp_path / 'missing'}")
    write_imagefolder(tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "test")
    with pytest.raises(UserError, match=r"b[/\\]test"):
        load_dataset(f"imagefolder:{tmp_path / 'b'}")
    write_imagefolder(tmp_path / "c")
    for f in (tmp_path / "c" / "test" / "dog").iterdir():
        f.unlink()  # an empty class folder
    with pytest.raises(UserError, match="dog"):
        load_dataset(f"imagefolder:{tmp_path / 'c'}")


# --- ImageData and fingerprint ----------------------------------------------------------------------


def _tiny() -> ImageData:
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(5, 3, 2, 2)
    return ImageData(images, torch.tensor([0, 1, 0, 1, 1]), ["a", "b"])


def test_image_data_views() -> None:
    data = _tiny()
    assert len(data) == 5 and data.num_classes == 2 and data.image_size == (2, 2)
    x = data.float_images(np.array([4, 0]))
    assert x.dtype == torch.float32 and tuple(x.shape) == (2, 3, 2, 2)
    assert torch.allclose(x[1], data.images[0].float() / 255) and torch.allclose(x[0], data.images[4].float() / 255)
    assert 0.0 <= data.float_images().min() and data.float_images().max() <= 1.0
    sub = data.subset(torch.tensor([1, 3]))
    assert torch.equal(sub.labels, torch.tensor([1, 1])) and torch.equal(sub.images, data.images[[1, 3]])
    assert len(data.subset(np.array([True, False, False, False, True]))) == 2
    assert data.images.dtype == torch.uint8  # float_images did not convert in place
    with pytest.raises(ValueError):
        ImageData(data.images.float(), data.labels, data.classes)


def test_fingerprint_sees_every_change() -> None:
    data = _tiny()
    fp = dataset_fingerprint(data)
    assert len(fp) == 64 and fp == dataset_fingerprint(_tiny())
    changed = _tiny()
    changed.images[4, 2, 1, 1] += 1
    assert dataset_fingerprint(changed) != fp
    relabelled = _tiny()
    relabelled.labels[0] = 1
    assert dataset_fingerprint(relabelled) != fp


# --- train/val split --------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "fraction", "n_val"), [(100, 0.05, 5), (100, 0.1, 10), (1000, 0.2, 200),
                                                      (10, 0.01, 1), (3, 0.5, 2), (2, 0.5, 1)])
def test_split_sizes_disjoint_and_covering(n: int, fraction: float, n_val: int) -> None:
    train, val = train_val_split(n, fraction, seed=7)
    assert len(val) == n_val and len(train) == n - n_val
    assert train.dtype == np.int64 and val.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # sorted, no repeats
    assert not set(train) & set(val)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(n))


def test_split_is_seeded() -> None:
    a = train_val_split(1000, 0.1, seed=3)
    b = train_val_split(1000, 0.1, seed=3)
    c = train_val_split(1000, 0.1, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    assert not np.array_equal(a[1], np.arange(100))  # actually shuffled, not the first rows


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, 0.0, 1.0, float("nan")])
def test_bad_fractions_raise(fraction: float) -> None:
    with pytest.raises(UserError, match="between 0 and 1"):
        train_val_split(100, fraction)


def test_split_that_leaves_no_training_sample_raises() -> None:
    with pytest.raises(UserError, match="no training sample"):
        train_val_split(1, 0.5)
    with pytest.raises(UserError, match="no training sample"):
        train_val_split(2, 0.9)
