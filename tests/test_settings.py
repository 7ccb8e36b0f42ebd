"""ExplainSettings: one way to name, open and find a map store, old layouts included."""

import json

import pytest
import torch

from impactx_ray.config import RunConfig
from impactx_ray.data import ImageData, dataset_fingerprint
from impactx_ray.errors import UserError
from impactx_ray.explain import ExplainSettings, MapStore, find_run_store

CKPT = "a" * 64


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 16, 16), generator=g, dtype=torch.uint8)
    return ImageData(images, torch.tensor([0, 1, 0, 1, 0, 1]), ["a", "b"])


def test_from_config_and_defaults():
    s = ExplainSettings.from_config(RunConfig(max_evals=300, shap_batch_size=50, seed=4))
    assert (s.masker, s.max_evals, s.batch_size, s.seed, s.engine) == (None, 300, 50, 4, "batched")
    assert s.explainer_kwargs((32, 32))["masker"] == "blur(8,8)"  # the default, made explicit
    assert s.explainer_kwargs((96, 96))["masker"] == "blur(24,24)"


@pytest.mark.parametrize("kwargs,needle", [
    ({"masker": "inpaint_telea"}, "inpaint"), ({"max_evals": 3}, "max_evals=3"),
    ({"batch_size": 0}, "batch_size=0"), ({"engine": "fast"}, "engine='fast'"),
])
def test_bad_settings_are_one_line_errors(kwargs, needle):
    with pytest.raises(UserError, match=needle) as e:
        ExplainSettings(**kwargs)
    assert "\n" not in str(e.value)


def test_open_store_is_keyed_by_its_meta_and_found_again(tmp_path, data):
    s = ExplainSettings(max_evals=40)
    store = s.open_store(tmp_path, CKPT, data)
    assert store.path == s.store_path(tmp_path, CKPT, data)
    assert store.path.name == ExplainSettings.store_key(store.meta)
    assert store.meta["data_fingerprint"] == dataset_fingerprint(data)
    assert store.meta["masker"] == "blur(4,4)" and store.meta["max_evals"] == 40
    assert s.open_store(tmp_path, CKPT, data).manifest["store_id"] == store.manifest["store_id"]
    assert s.find_store(tmp_path, CKPT).path == store.path
    # other settings, another checkpoint or other data: another store
    other = ExplainSettings(max_evals=41).open_store(tmp_path, CKPT, data)
    assert other.path != store.path
    assert s.open_store(tmp_path, "b" * 64, data).path not in (store.path, other.path)
    with pytest.raises(UserError, match="no map store.*cccccccccccc"):
        s.find_store(tmp_path, "c" * 64)


def test_a_store_at_an_older_path_is_found_by_its_meta(tmp_path, data):
    """Sweeps before ExplainSettings named a store by its checkpoint hash: it is reused."""
    s = ExplainSettings(max_evals=40)
    meta = s.store_meta(CKPT, dataset_fingerprint(data), data.image_size)
    old = MapStore.create_or_open(tmp_path / CKPT[:16], meta=meta, num_maps=6, map_shape=(16, 16, 3))
    assert s.open_store(tmp_path, CKPT, data).path == old.path
    assert [p.name for p in tmp_path.iterdir()] == [CKPT[:16]]  # nothing new was created
    # a second match would be ambiguous: refused, naming both
    MapStore.create_or_open(tmp_path / "copy", meta=meta, num_maps=6, map_shape=(16, 16, 3))
    with pytest.raises(UserError, match="several map stores.*(copy|aaaa)"):
        s.find_store(tmp_path, CKPT)


def test_configs_saved_before_the_engine_existed_read_as_shap(tmp_path, data):
    old = RunConfig(max_evals=40).to_dict()
    del old["engine"]
    assert RunConfig.from_saved(old).engine == "shap"
    assert RunConfig.from_saved({**old, "engine": "batched"}).engine == "batched"
    assert RunConfig.from_saved(old, {"engine": "batched"}).engine == "batched"
    with pytest.raises(UserError, match="JSON object"):
        RunConfig.from_saved([])
    # and find_run_store then finds the store that shap made
    (tmp_path / "config.json").write_text(json.dumps(old))
    shap_store = ExplainSettings(max_evals=40, engine="shap").open_store(tmp_path / "maps", CKPT,
                                                                         data)
    assert find_run_store(tmp_path, CKPT).path == shap_store.path
