"""The toy model the explainer, store and Ray tests share (one definition)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """A small CNN, C×H×W (H, W ≥ 4) -> K logits of order 1..10; counts its forward calls and
    records the torch thread count of the last one. Dropout makes eval mode matter."""

    def __init__(self, channels: int = 3, classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(64, classes)
        self.calls = 0
        self.threads_seen: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.threads_seen = torch.get_num_threads()
        return 10 * self.head(self.drop(self.features(x)))  # N×C×H×W -> N×K
