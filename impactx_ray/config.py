"""Run configuration: one frozen dataclass, validated on construction.

Everything a run needs to be reproduced lives here; it is written to ``<out>/config.json`` and
round-trips through the flat dicts Ray Tune uses (``to_dict`` / ``from_dict``). Validation raises
``UserError`` with one line naming the bad value, so the CLI can exit 2 before writing anything.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from impactx_ray.defaults import MAX_EVALS, MIN_MAX_EVALS, SHAP_BATCH_SIZE
from impactx_ray.errors import UserError, is_int

# The RunConfig fields each product of a run depends on (the method table in ``methods.py`` says
# which groups a method's checkpoint records; a finished step is reused only when they match).
# Stage 1 (and ABN, trained with the same settings):
STAGE1_SETTINGS = ("model", "dataset", "batch_size", "lr", "val_fraction", "epochs", "seed",
                   "pretrained", "weights", "image_size", "input_size")
# On top of the stage-1 checkpoint, the SHAP maps (``explain.ExplainSettings``):
EXPLAIN_SETTINGS = ("max_evals", "masker", "shap_batch_size", "engine", "precision")
# On top of the maps, the stage-2 training budget (IMPACTX, and WAE without λ):
STAGE2_BUDGET = ("stage2_epochs", "stage2_lr")
STAGE2_SETTINGS = ("lam", *STAGE2_BUDGET)
# Single-stage IMPACTX (stage-1 budget, maps recomputed from the current A every E epochs):
SINGLE_STAGE_SETTINGS = ("lam", "refresh_every")


@dataclass(frozen=True)
class RunConfig:
    """Hyperparameters and settings of one IMPACTX run (one model, dataset and grid point)."""

    model: str = "lenet5"
    dataset: str = "digits"
    batch_size: int = 32
    lr: float = 0.0006
    val_fraction: float = 0.1
    lam: float = 0.6                  # λ in L = CE + λ·MSE (paper eq. 1)
    epochs: int = 10                  # stage-1 epochs
    stage2_epochs: int | None = None  # None: same as `epochs`
    stage2_lr: float | None = None    # None: same as `lr`
    max_evals: int = MAX_EVALS        # shap Partition explainer budget per map (paper: 2000)
    masker: str | None = None         # shap.maskers.Image mask_value; None: blur(H//4,W//4)
    shap_batch_size: int = SHAP_BATCH_SIZE  # `batch_size` of shap's explainer call (maps depend on it)
    engine: str = "batched"           # map engine: batched (exact, fast) or shap (the reference)
    precision: str = "fp32"           # map forward precision: fp32 (shap-exact), bf16 or fp16
    compile: str = "auto"             # torch.compile the map engine's forward: auto, on or off
    seed: int = 0
    pretrained: bool | None = None    # None: the backbone's default (timm models: True)
    weights: str | None = None        # local pretrained weights file
    image_size: int = 32              # imagefolder: images are resized to this
    input_size: int | None = None     # model input size for timm backbones (None: timm's default)
    data_root: str = "./data"
    download: bool = False
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    refresh_every: int = 1            # single-stage training: each map recomputed every E epochs

    def __post_init__(self) -> None:
        check_int("--batch-size", self.batch_size, minimum=1)
        check_int("--epochs", self.epochs, minimum=1)
        if self.stage2_epochs is not None:
            check_int("--stage2-epochs", self.stage2_epochs, minimum=1)
        check_int("--max-evals", self.max_evals, minimum=MIN_MAX_EVALS)
        check_int("--shap-batch-size", self.shap_batch_size, minimum=1)
        check_int("--image-size", self.image_size, minimum=8)
        check_int("--refresh-every", self.refresh_every, minimum=1)
        if self.input_size is not None:
            check_int("--input-size", self.input_size, minimum=8)
        # numpy's RandomState (the split, shap's tie-breaks) takes seeds in [0, 2**32)
        if not is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise UserError(f"--seed must be an integer in [0, {2**32 - 1}], got {self.seed!r}")
        _check_types(self)
        _check_positive("--lr", self.lr)
        if self.stage2_lr is not None:
            _check_positive("--stage2-lr", self.stage2_lr)
        if not _is_number(self.val_fraction) or not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in (0, 1), got {self.val_fraction!r}")
        if not _is_number(self.lam) or not math.isfinite(self.lam) or self.lam < 0:
            raise UserError(f"--lambda must be a finite number >= 0, got {self.lam!r}")
        if self.engine not in ("batched", "shap"):
            raise UserError(f"--engine must be batched or shap, got {self.engine!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise UserError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.compile not in ("auto", "on", "off"):
            raise UserError(f"--compile must be auto, on or off, got {self.compile!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        # Names are checked against the registries lazily imported here to keep config import-light.
        from impactx_ray.data import check_dataset_name
        from impactx_ray.models import check_backbone_name

        check_backbone_name(self.model)
        check_dataset_name(self.dataset)

    # -- derived values ---------------------------------------------------------------------
    @property
    def epochs2(self) -> int:
        return self.stage2_epochs if self.stage2_epochs is not None else self.epochs

    @property
    def lr2(self) -> float:
        return self.stage2_lr if self.stage2_lr is not None else self.lr

    # -- flat dicts (config.json, Tune, MLflow params) ------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, d: Any, overrides: dict[str, Any] | None = None) -> RunConfig:
        """A ``config.json`` written by any version, with ``overrides`` applied.

        Configs saved before the batched engine existed have no ``engine``: their maps were made
        by shap itself, so they read as ``engine="shap"`` (and find their map store again).
        """
        if not isinstance(d, dict):
            raise UserError(f"a saved config must be a JSON object, got {type(d).__name__}")
        return cls.from_dict({"engine": "shap", **d, **(overrides or {})})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def subset(self, keys: tuple[str, ...]) -> dict[str, Any]:
        d = self.to_dict()
        return {k: d[k] for k in keys}


# The type of every text and flag field (numbers are checked by range above): a config.json
# edited by hand is refused on one line, not deep inside a later step.
_OPTIONAL_STR = ("masker", "weights")
_STR = ("model", "dataset", "engine", "data_root", "device")


def _check_types(cfg: RunConfig) -> None:
    for name in _STR + _OPTIONAL_STR:
        value = getattr(cfg, name)
        if not isinstance(value, str) and not (value is None and name in _OPTIONAL_STR):
            raise UserError(f"config value {name}={value!r} must be a string")
    for name, optional in (("pretrained", True), ("download", False)):
        value = getattr(cfg, name)
        if not isinstance(value, bool) and not (value is None and optional):
            raise UserError(f"config value {name}={value!r} must be true or false")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_int(flag: str, value: Any, *, minimum: int) -> None:
    """UserError ``<flag> must be an integer >= <minimum>, got <value>`` unless it is one (bools
    are not); shared by RunConfig and the sweep's search settings."""
    if not is_int(value, minimum):
        raise UserError(f"{flag} must be an integer >= {minimum}, got {value!r}")


def _check_positive(flag: str, value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{flag} must be a number > 0, got {value!r}")


def cell_name(model: str, dataset: str) -> str:
    """A (model, dataset) pair's name in directories, runs and registered models, e.g.
    lenet5-digits (dataset names may be imagefolder:PATH: kept clean)."""
    return f"{model}-{dataset.replace(':', '_').replace('/', '_')}"
