"""A trained method applied to images: the class, its probabilities and, for the methods that
have one, the method's own map, with no explainer in the loop (IMPACTX's point, paper §3).

    predictor = Predictor.from_checkpoint("runs/quickstart/stage2/model.pt")
    out = predictor.predict(images)   # uint8 N×H×W×3, or float N×3×H×W in [0, 1]
    out.labels, out.probabilities, out.maps   # N, N×K, N×C×H×W (None for the baseline)

The maps are each method's ``explain``: IMPACTX's decoder output D(LEP(x)) (N×3×H×W in
[-1, 1]), ABN's attention upsampled to the input (N×1×H×W in [0, 1]), WAE's weighted class-mean
explanation (N×3×H×W). The plain classifier A has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from impactx_ray.errors import UserError
from impactx_ray.methods import METHODS, ModelSpec, load_model

BATCH = 256  # images per forward call: memory, not results (the model runs in eval mode)


@dataclass
class Prediction:
    """What a :class:`Predictor` gives for N images."""

    labels: np.ndarray                # N int64, the predicted class index
    probabilities: np.ndarray         # N×K float32, softmax of the logits
    maps: np.ndarray | None           # N×C×H×W float32, the method's own map; None for A
    classes: list[str]                # the K class names, in index order

    def __len__(self) -> int:
        return len(self.labels)

    def names(self) -> list[str]:
        """The predicted class name of each image."""
        return [self.classes[int(i)] for i in self.labels]

    def top(self, i: int, k: int = 5) -> list[tuple[str, float]]:
        """Image ``i``'s ``k`` most probable classes with their probabilities, most probable first."""
        order = np.argsort(-self.probabilities[i], kind="stable")[:k]
        return [(self.classes[int(c)], float(self.probabilities[i, c])) for c in order]

    def answer(self, i: int) -> dict[str, Any]:
        """Image ``i`` as JSON-able lists (float32 values written as their exact float)."""
        out: dict[str, Any] = {"class": int(self.labels[i]), "class_name": self.classes[int(self.labels[i])],
                               "probabilities": self.probabilities[i].tolist()}
        if self.maps is not None:
            out["map"] = self.maps[i].tolist()
        return out


def as_model_input(images: Any, image_size: tuple[int, int]) -> torch.Tensor:
    """float32 N×3×H×W in [0, 1] from uint8 N×H×W×3 (images as decoded; the documented input) or
    float N×3×H×W in [0, 1] (as the models take them). Anything else is a one-line UserError
    naming the shape or dtype it got and the one it needs."""
    h, w = image_size
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.dim() != 4 or x.shape[0] == 0:
        raise UserError(f"images of shape {tuple(x.shape)}: need a non-empty batch, uint8 N×{h}×{w}×3 or "
                        f"float N×3×{h}×{w}")
    if x.dtype == torch.uint8:
        if tuple(x.shape[1:]) != (h, w, 3):
            raise UserError(f"uint8 images of shape {tuple(x.shape)}: need N×{h}×{w}×3 (height, width, RGB)")
        return x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)  # N×H×W×3 -> N×3×H×W
    if not x.is_floating_point():
        raise UserError(f"images of dtype {x.dtype}: need uint8 N×{h}×{w}×3 or float N×3×{h}×{w} in [0, 1]")
    if tuple(x.shape[1:]) != (3, h, w):
        raise UserError(f"float images of shape {tuple(x.shape)}: need N×3×{h}×{w} in [0, 1]")
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise UserError("float images must be finite and in [0, 1] (uint8 images: 0..255)")
    return x.to(torch.float32)


class Predictor:
    """A trained model of one method, in eval mode on ``device``; ``predict`` takes a batch."""

    def __init__(self, model: nn.Module, method: str, classes: list[str], image_size: tuple[int, int],
                 device: torch.device | str = "cpu") -> None:
        if len(classes) != getattr(model, "num_classes", len(classes)):
            raise ValueError(f"{len(classes)} class names for a model of {model.num_classes} classes")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.method, self.classes, self.image_size = method, list(classes), tuple(image_size)

    @property
    def has_map(self) -> bool:
        return hasattr(self.model, "explain")

    def to(self, device: torch.device | str) -> Predictor:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @property
    def map_is_signed(self) -> bool:
        """An attribution (for or against the class: IMPACTX, WAE), not an attention (ABN)."""
        return self.method != "abn"

    @classmethod
    def from_checkpoint(cls, path: str | Path, classes: list[str] | None = None,
                        device: torch.device | str = "cpu") -> Predictor:
        """The predictor of an impactx-ray checkpoint (any method). ``classes`` names the classes
        when the checkpoint does not (checkpoints from before 2026-12 record only their count)."""
        meta = _meta(path)
        config = meta.get("config") or {}
        spec = ModelSpec(meta["model"], meta["num_classes"], config.get("input_size"))
        model, meta = load_model(path, spec)
        names = meta.get("classes") or classes
        if names is None:
            raise UserError(f"checkpoint {path} does not name its classes; pass them (the run's dataset)")
        return cls(model, meta["kind"], list(names), tuple(meta["image_size"]), device)

    @torch.inference_mode()
    def predict(self, images: Any, batch_size: int = BATCH) -> Prediction:
        x = as_model_input(images, self.image_size)
        probabilities, labels, maps = [], [], []
        for chunk in x.split(batch_size):
            chunk = chunk.to(self.device)
            p = torch.softmax(self.model(chunk).float(), dim=1)  # N×K
            probabilities.append(p.cpu())
            labels.append(p.argmax(dim=1).cpu())
            if self.has_map:
                maps.append(self.model.explain(chunk).float().cpu())  # N×C×H×W
        return Prediction(torch.cat(labels).numpy().astype(np.int64), torch.cat(probabilities).numpy(),
                          torch.cat(maps).numpy() if maps else None, self.classes)

    def describe(self) -> str:
        return f"{METHODS[self.method].title} ({len(self.classes)} classes, {self.image_size[0]}×{self.image_size[1]})"


def _meta(path: str | Path) -> dict[str, Any]:
    from impactx_ray.train.checkpoint import load_checkpoint

    return load_checkpoint(path)[1]
