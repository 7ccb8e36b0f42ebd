"""Using a trained model: :class:`Predictor` (class, probabilities and the method's own map of a
batch), ``impactx predict`` on image files (``files.py``) and the overlays it draws
(``overlay.py``). Plain PyTorch; MLflow's registry and Ray Serve use this from ``serve/``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from impactx_ray.errors import UserError
from impactx_ray.methods import get_method
from impactx_ray.predict.predictor import Prediction, Predictor, as_model_input

__all__ = ["Prediction", "Predictor", "as_model_input", "run_checkpoint", "run_predictor"]


def run_checkpoint(out: Path, method: str) -> Path:
    """The checkpoint of ``method`` in the run directory ``out``; a one-line UserError saying how
    to make it when the run has none."""
    from impactx_ray.rundir import RunDir

    run, m = RunDir(Path(out)), get_method(method)
    if not run.config.exists():
        raise UserError(f"{out} is not a run directory (no config.json); train one with "
                        f"`impactx run --out {out}`")
    path = run.checkpoint(m)
    if not path.exists():
        how = "" if m.name in ("baseline", "impactx") else f" --method {m.name}"
        raise UserError(f"run {out} has no {m.title} model ({path}); train it with "
                        f"`impactx run --out {out}{how}`")
    return path


def run_predictor(out: Path, method: str, device: torch.device | str = "cpu") -> Predictor:
    """The predictor of ``method``'s model in the run directory ``out``. The class names come from
    the checkpoint, or (checkpoints from before 2026-12) from the run's dataset."""
    from impactx_ray.data import load_dataset
    from impactx_ray.rundir import RunDir
    from impactx_ray.train.checkpoint import load_checkpoint

    path = run_checkpoint(out, method)
    classes = None
    if "classes" not in load_checkpoint(path)[1]:
        cfg = RunDir(Path(out)).load_config({})
        classes = load_dataset(cfg.dataset, cfg.data_root, image_size=cfg.image_size)[1].classes
    return Predictor.from_checkpoint(path, classes, device)
