"""The map store: round trip in order, resumable, corruption detected and repaired, no pickle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from impactx_ray.data import fingerprint
from impactx_ray.errors import UserError
from impactx_ray.explain import ExplainSettings, MapStore, compute_store, explain_true_class, fully_masked
from impactx_ray.io import file_sha256

from tolerances import assert_maps_close, logit_scale
from toys import TinyNet

N, C, H, W, K = 5, 3, 16, 16, 4
SETTINGS = ExplainSettings(max_evals=200, masker="blur(4,4)", batch_size=50)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.rand(N, C, H, W, generator=g), torch.tensor([0, 1, 2, 3, 1])


@pytest.fixture(scope="module")
def net() -> TinyNet:
    return TinyNet(C, K).eval()


@pytest.fixture(scope="module")
def reference(net, data) -> np.ndarray:
    return explain_true_class(net, *data, progress=False, **SETTINGS.explainer_kwargs((H, W)))


def _meta(data, checkpoint_hash: str = "sha256:ckpt-a") -> dict:
    return SETTINGS.store_meta(checkpoint_hash, fingerprint(*data), (H, W))


def _open(path: Path, data, **kw) -> MapStore:
    return MapStore.create_or_open(path, meta=_meta(data, **kw), num_maps=N, map_shape=(H, W, C), shard_size=2)


def _snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(path.iterdir())}


def test_write_load_round_trip_in_order(tmp_path: Path, data) -> None:
    store = _open(tmp_path / "s", data)
    assert (store.num_shards, store.shard_range(2), store.missing_shards()) == (3, (4, 5), [0, 1, 2])
    maps = np.arange(N * H * W * C, dtype=np.float32).reshape(N, H, W, C)
    for i in (2, 0, 1):  # any order, as concurrent workers would
        store.write_shard(i, maps[slice(*store.shard_range(i))])
    again = MapStore(tmp_path / "s")
    assert again.is_complete() and np.array_equal(again.load(), maps)
    for f in (tmp_path / "s").glob("shard-*.npy"):
        np.load(f, allow_pickle=False)  # plain arrays: no pickle needed
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["meta"]["engine"] == "batched" and manifest["meta"]["shap_version"]
    assert {"checkpoint_hash", "data_fingerprint", "masker", "max_evals", "batch_size"} <= set(manifest["meta"])
    sidecar = json.loads((tmp_path / "s" / "shard-00001.json").read_text())
    assert sidecar["sha256"] == file_sha256(tmp_path / "s" / "shard-00001.npy") and sidecar["start"] == 2
    assert not list((tmp_path / "s").glob(".*tmp*"))


def test_write_shard_checks_shape_and_dtype(tmp_path: Path, data) -> None:
    store = _open(tmp_path / "s", data)
    with pytest.raises(ValueError, match="float32"):
        store.write_shard(0, np.zeros((2, H, W, C), dtype=np.float64))
    with pytest.raises(ValueError, match="shape"):
        store.write_shard(2, np.zeros((2, H, W, C), dtype=np.float32))  # last shard holds 1 map


def test_compute_resume_and_repair(tmp_path: Path, net, data, reference) -> None:
    store = _open(tmp_path / "s", data)
    compute_store(store, net, *data, SETTINGS, progress=False)
    # the same maps as one explain call, in order (up to the model's float rounding, which may
    # differ between a batch of 2 images and one of 5)
    first = store.load()
    assert_maps_close(first, reference, logit_scale(net, data[0], fully_masked(data[0], "blur(4,4)")))

    net.calls = 0
    compute_store(_open(tmp_path / "s", data), net, *data, SETTINGS, progress=False)
    assert net.calls == 0  # a rerun reuses every shard

    npy0, npy2 = tmp_path / "s" / "shard-00000.npy", tmp_path / "s" / "shard-00002.npy"
    npy0.write_bytes(npy0.read_bytes()[:-7])  # truncated
    raw = bytearray(npy2.read_bytes())
    raw[-3] ^= 0xFF  # one corrupted byte, same size
    npy2.write_bytes(bytes(raw))
    assert store.missing_shards() == [0, 2] and store.missing_shards(verify=False) == [0]
    with pytest.raises(UserError, match="missing or corrupt|incomplete"):
        store.load()
    net.calls = 0
    compute_store(store, net, *data, SETTINGS, progress=False)
    assert net.calls > 0 and store.missing_shards() == []
    np.testing.assert_array_equal(store.load(), first)  # the repaired shards, bit for bit


def test_missing_sidecar_means_missing_shard(tmp_path: Path, data) -> None:
    store = _open(tmp_path / "s", data)
    store.write_shard(1, np.ones((2, H, W, C), dtype=np.float32))
    (tmp_path / "s" / "shard-00001.json").unlink()  # killed between the .npy and its sidecar
    assert store.missing_shards() == [0, 1, 2]


def test_load_incomplete_raises(tmp_path: Path, data) -> None:
    store = _open(tmp_path / "s", data)
    store.write_shard(0, np.zeros((2, H, W, C), dtype=np.float32))
    with pytest.raises(UserError, match="2 of 3 shards missing"):
        store.load()


def test_different_meta_refused_and_files_untouched(tmp_path: Path, data) -> None:
    store = _open(tmp_path / "s", data)
    store.write_shard(0, np.ones((2, H, W, C), dtype=np.float32))
    before = _snapshot(tmp_path / "s")
    with pytest.raises(UserError, match="checkpoint_hash='sha256:ckpt-a', not checkpoint_hash='sha256:ckpt-b'"):
        _open(tmp_path / "s", data, checkpoint_hash="sha256:ckpt-b")
    with pytest.raises(UserError, match="shard_size"):
        MapStore.create_or_open(tmp_path / "s", meta=_meta(data), num_maps=N, map_shape=(H, W, C), shard_size=3)
    assert _snapshot(tmp_path / "s") == before


def test_compute_refuses_other_settings(tmp_path: Path, net, data) -> None:
    store = _open(tmp_path / "s", data)
    with pytest.raises(UserError, match="max_evals=200, not max_evals=300"):
        compute_store(store, net, *data, ExplainSettings(max_evals=300, masker="blur(4,4)",
                                                          batch_size=50), progress=False)
    with pytest.raises(UserError, match="do not fit"):
        compute_store(store, net, data[0][:4], data[1][:4], SETTINGS, progress=False)


def test_shards_of_an_earlier_store_are_not_reused(tmp_path: Path, data) -> None:
    store = _open(tmp_path / "s", data)
    store.write_shard(0, np.ones((2, H, W, C), dtype=np.float32))
    (tmp_path / "s" / "manifest.json").unlink()
    assert _open(tmp_path / "s", data).missing_shards() == [0, 1, 2]


def test_open_errors(tmp_path: Path, data) -> None:
    with pytest.raises(UserError, match="no map store"):
        MapStore(tmp_path / "nothing")
    with pytest.raises(UserError, match="lacks checkpoint_hash"):
        MapStore.create_or_open(tmp_path / "s", meta={"masker": "blur(4,4)"}, num_maps=N, map_shape=(H, W, C))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        MapStore(tmp_path / "bad")


def test_data_fingerprint_sensitive(data) -> None:
    x, y = data
    assert fingerprint(x, y) == fingerprint(x.clone(), y.tolist())
    assert fingerprint(x, y) != fingerprint(x, y.flip(0))
    assert fingerprint(x, y) != fingerprint(x + 1e-6, y)


def test_concurrent_writers(tmp_path: Path, data) -> None:
    """Racing creators agree on one manifest; writers of different shards never clobber each other."""
    from concurrent.futures import ThreadPoolExecutor

    maps = np.random.default_rng(0).standard_normal((N, H, W, C)).astype(np.float32)

    def worker(i: int) -> str:
        store = _open(tmp_path / "s", data)
        store.write_shard(i, maps[slice(*store.shard_range(i))])
        return store.manifest["store_id"]

    with ThreadPoolExecutor(3) as pool:
        ids = set(pool.map(worker, [0, 1, 2]))
    assert len(ids) == 1
    np.testing.assert_array_equal(MapStore(tmp_path / "s").load(), maps)
