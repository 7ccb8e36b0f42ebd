"""Training: losses, plain loops, the two stages and checkpoint I/O (no Ray, no MLflow)."""

from impactx_ray.train.losses import impactx_loss, scale_maps
from impactx_ray.train.stage1 import StageResult, build_backbone, train_stage1
from impactx_ray.train.stage2 import map_targets, train_stage2

__all__ = ["StageResult", "build_backbone", "impactx_loss", "map_targets", "scale_maps",
           "train_stage1", "train_stage2"]
