"""The experiment's shared steps, run by both ``impactx run`` (``runner.py``) and a sweep cell
(``sweep/pipeline.py``): the stage-1 model's SHAP maps (here or on Ray map workers) and the
MoRF/LeRF comparison of the winners' maps. The callers differ only in who chooses the
hyperparameters and where they record; every check a step makes runs on both paths.
"""

from impactx_ray.pipeline.maps import MapsDone, check_before_writing, stage1_maps
from impactx_ray.pipeline.morf import compare_maps, impactx_to_compare

__all__ = ["MapsDone", "check_before_writing", "compare_maps", "impactx_to_compare", "stage1_maps"]
