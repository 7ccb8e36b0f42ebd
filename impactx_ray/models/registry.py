"""The Backbone interface, its input adapter, and the name -> factory registry.

A backbone is the paper's classifier A = Q∘M: its forward gives the K class scores m = M(x)
(Q is just argmax∘softmax, applied by whoever needs a label). Every backbone takes images the way
the datasets give them -- float N×3×H×W in [0, 1] at the native resolution (32 for CIFAR, 96 for
STL-10) -- and adapts them itself (resize, normalise). Keeping that step inside the model means SHAP
maps, MoRF perturbations and decoder targets all live in the image space the user sees.

Factories register themselves timm-style with ``@register_backbone("name")``; ``factory.py`` builds
a backbone by name (any other timm model name is passed through to timm).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class InputAdapter(nn.Module):
    """Resize to the backbone's input size, then normalise with (x - mean) / std.

    mean/std are *persistent* buffers (identity, 0 and 1, for models trained from scratch), so a
    saved backbone state dict carries the normalisation its weights were trained with: restoring a
    stage-1 checkpoint into ``create_backbone(name, K, pretrained=False)`` gives the same function.
    """

    def __init__(
        self,
        size: tuple[int, int],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        mean_t = torch.tensor(mean if mean is not None else (0.0, 0.0, 0.0), dtype=torch.float32)
        std_t = torch.tensor(std if std is not None else (1.0, 1.0, 1.0), dtype=torch.float32)
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))  # 1×3×1×1
        self.register_buffer("std", std_t.view(1, -1, 1, 1))  # 1×3×1×1

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"backbone expects N×{self.mean.shape[1]}×H×W images in [0, 1], got shape {tuple(x.shape)}"
            )
        if tuple(x.shape[-2:]) != self.size:
            # N×3×H×W -> N×3×h×w (bilinear, no antialias: cheap and the same on every device)
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=False)
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"size={self.size}"


class Backbone(nn.Module):
    """The classifier A = Q∘M, split as timm splits it: features, then the K-way head.

    Subclasses set ``num_classes``, ``num_features``, ``input_size`` and ``adapter`` and implement
    ``forward_features`` (starting with ``self.adapter``) and ``forward_head``.
    """

    name: str
    num_classes: int
    num_features: int
    input_size: tuple[int, int]
    adapter: InputAdapter

    def forward_features(self, x: Tensor) -> Tensor:
        """N×3×H×W in [0, 1] -> N×num_features (pooled, pre-logits)."""
        raise NotImplementedError

    def forward_head(self, f: Tensor) -> Tensor:
        """N×num_features -> N×K logits."""
        raise NotImplementedError

    def remove_head(self) -> None:
        """Replace the final FC by the identity (used by LEP, which puts its own FC-512 there)."""
        raise NotImplementedError

    def remove_fc_layers(self) -> None:
        """Drop every fully-connected layer after the last spatial features (paper §4.3: the
        LEP replaces "the last fully-connected layers" by FC-512). Default: the classifier head,
        all the FC there is in the timm models; LeNet-5 also drops FC120 and FC84."""
        self.remove_head()

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class BackboneFactory(Protocol):
    def __call__(
        self, num_classes: int, pretrained: bool, weights: Path | None, input_size: int | None
    ) -> Backbone: ...


BACKBONES: dict[str, BackboneFactory] = {}
_DEFAULT_PRETRAINED: dict[str, bool] = {}


def register_backbone(name: str, *, default_pretrained: bool = True) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: ``@register_backbone("lenet5", default_pretrained=False)`` on a factory."""

    def decorate(factory: BackboneFactory) -> BackboneFactory:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is registered twice")
        BACKBONES[name] = factory
        _DEFAULT_PRETRAINED[name] = default_pretrained
        return factory

    return decorate


def list_backbones() -> list[str]:
    """The registered names (any timm model name is accepted too, see check_backbone_name)."""
    return sorted(BACKBONES)
