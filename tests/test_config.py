import pytest

from impactx_ray.config import RunConfig
from impactx_ray.errors import UserError


def test_defaults_round_trip_through_flat_dict():
    cfg = RunConfig(lr=0.0011, lam=1.4, stage2_epochs=3)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.epochs2 == 3 and cfg.lr2 == 0.0011


@pytest.mark.parametrize("field, value, flag", [
    ("batch_size", 0, "--batch-size"),
    ("epochs", 0, "--epochs"),
    ("lr", 0.0, "--lr"),
    ("lr", float("nan"), "--lr"),
    ("val_fraction", 0.0, "--val-fraction"),
    ("val_fraction", 1.0, "--val-fraction"),
    ("lam", -0.2, "--lambda"),
    ("max_evals", 0, "--max-evals"),
    ("device", "tpu", "--device"),
    ("model", "no_such_net", "no_such_net"),
    ("dataset", "mnist", "mnist"),
])
def test_bad_values_name_the_flag_and_value(field, value, flag):
    with pytest.raises(UserError) as e:
        RunConfig(**{field: value})
    assert flag in str(e.value) and "\n" not in str(e.value)


def test_unknown_keys_are_rejected():
    with pytest.raises(UserError, match="bogus"):
        RunConfig.from_dict({"bogus": 1})
