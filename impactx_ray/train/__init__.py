"""Training: losses, the one epoch loop, a plan per method for it, and checkpoint I/O (no Ray,
no MLflow, nothing from ``explain``: maps arrive as arrays, the single-stage explainer as a
function)."""

from impactx_ray.devices import resolve_device
from impactx_ray.train.comparison import abn_plan, wae_plan
from impactx_ray.train.loop import FitHooks, Split, StageResult, TrainPlan, accuracy, fit, train
from impactx_ray.train.losses import impactx_loss
from impactx_ray.train.stage1 import new_backbone, stage1_plan
from impactx_ray.train.stage2 import stage2_plan

__all__ = ["FitHooks", "Split", "StageResult", "TrainPlan", "abn_plan", "accuracy", "fit",
           "impactx_loss", "new_backbone", "resolve_device", "stage1_plan", "stage2_plan", "train",
           "wae_plan"]
