"""The toy models the explainer, store and Ray tests share (one definition each)."""

from __future__ import annotations

import functools

import torch
from torch import nn


class TinyNet(nn.Module):
    """A small CNN, C×H×W (H, W ≥ 4) -> K logits of order 1..10; counts its forward calls and
    records the torch thread count of the last one. Dropout makes eval mode matter. ``gain``
    scales the first convolution's weights: on dim inputs (digits) a gain of 20 makes the logits
    follow the image rather than the biases, so its maps stand above the logits' rounding."""

    def __init__(self, channels: int = 3, classes: int = 4, seed: int = 0, gain: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        with torch.no_grad():
            self.features[0].weight.mul_(gain)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(64, classes)
        self.calls = 0
        self.threads_seen: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.threads_seen = torch.get_num_threads()
        return 10 * self.head(self.drop(self.features(x)))  # N×C×H×W -> N×K


@functools.cache
def trained_lenet5_state() -> dict[str, torch.Tensor]:
    """LeNet-5 after one epoch on digits. An untrained LeNet-5's logits barely move under masking
    (its maps are ~1e-5 of its logits), so its maps would sit at the float32 rounding floor that
    the bound allows; a trained one responds, its maps ~1e-2 of its logits."""
    from impactx_ray.data import load_dataset
    from impactx_ray.models import create_backbone

    train, _ = load_dataset("digits")
    torch.manual_seed(0)
    model = create_backbone("lenet5", 10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = train.float_images(), train.labels
    for idx in torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).split(64):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.state_dict()


def engine_model(name: str = "lenet5", size: int = 32) -> nn.Module:
    """The map-engine tests' model, in eval mode: LeNet-5 trained one epoch on digits (its maps
    stand well above its logits' rounding), or a timm model at input ``size``, seeded."""
    from impactx_ray.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone(name, 10, **({} if name == "lenet5" else {"input_size": size}))
    if name == "lenet5":
        model.load_state_dict(trained_lenet5_state())
    return model.eval()


def digits_at(digits: tuple[torch.Tensor, torch.Tensor], size: int, n: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` of (N×3×32×32 images, labels) ``digits``, resized to ``size``×``size``."""
    x, y = digits
    if size != x.shape[-1]:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x[:n].contiguous(), y[:n]
