"""The evaluation step: test accuracy of trained checkpoints, beside what they were trained with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from impactx_ray.data import ImageData
from impactx_ray.methods import Method, ModelSpec, load_model
from impactx_ray.train import accuracy


@dataclass
class Evaluated:
    """One checkpoint on the test set: the model (on the device), its meta, its test accuracy."""

    method: Method
    model: nn.Module
    meta: dict[str, Any]
    test_accuracy: float

    def row(self) -> dict[str, Any]:
        """Its entries in a result: ``<method>_val_accuracy`` and ``<method>_test_accuracy``."""
        name = self.method.name
        return {f"{name}_val_accuracy": self.meta["val_accuracy"],
                f"{name}_test_accuracy": self.test_accuracy}


def evaluate_checkpoints(checkpoints: dict[Method, Path], spec: ModelSpec, test: ImageData,
                         device: torch.device) -> list[Evaluated]:
    """Each checkpoint loaded as its method's model and scored on ``test``, in the given order."""
    done = []
    for method, path in checkpoints.items():
        model, meta = load_model(path, spec, method)
        model = model.to(device)
        done.append(Evaluated(method, model, meta, accuracy(model, test, device=device)))
    return done
