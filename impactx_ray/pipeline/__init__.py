"""The experiment's steps, run by both ``impactx run`` (``runner.py``) and a sweep (``sweep/``):
the checks before writing, training one method, the stage-1 model's SHAP maps (here or on Ray
map workers), test accuracies and the MoRF/LeRF comparison of the models' maps. The callers
differ only in who chooses the hyperparameters and where they record; every check a step makes
runs on both paths.
"""

from impactx_ray.pipeline.evaluate import Evaluated, evaluate_checkpoints
from impactx_ray.pipeline.maps import MapsDone, check_before_writing, stage1_maps
from impactx_ray.pipeline.morf import compare_maps, impactx_to_compare
from impactx_ray.pipeline.result import as_row, result_row
from impactx_ray.pipeline.train import train_step

__all__ = ["Evaluated", "MapsDone", "as_row", "check_before_writing", "compare_maps",
           "evaluate_checkpoints", "impactx_to_compare", "result_row", "stage1_maps", "train_step"]
