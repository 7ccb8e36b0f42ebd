"""Training: losses, the shared epoch loop, both stages, ABN/WAE and checkpoint I/O (no Ray, no
MLflow, nothing from ``explain``: maps arrive as arrays)."""

from impactx_ray.train.comparison import train_abn, train_wae
from impactx_ray.train.loop import StageResult, accuracy, resolve_device
from impactx_ray.train.losses import impactx_loss
from impactx_ray.train.stage1 import new_backbone, train_stage1
from impactx_ray.train.stage2 import train_stage2

__all__ = ["StageResult", "accuracy", "impactx_loss", "new_backbone", "resolve_device",
           "train_abn", "train_stage1", "train_stage2", "train_wae"]
