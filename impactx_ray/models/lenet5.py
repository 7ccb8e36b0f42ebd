"""Classic LeNet-5 (LeCun et al. 1998) on 3×32×32 colour images, the paper's small backbone.

conv6@5 → ReLU → maxpool2 → conv16@5 → ReLU → maxpool2 → FC120 → ReLU → FC84 → ReLU → FC K.
ReLU and max-pooling replace the original tanh/subsampling, as in most modern re-implementations.
The features (pre-logits) are the 84-d output; other input sizes are resized to 32×32 inside.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from impactx_ray.errors import UserError
from impactx_ray.models.registry import Backbone, InputAdapter, register_backbone

LENET_SIZE = 32


class LeNet5(Backbone):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.name = "lenet5"
        self.num_classes = num_classes
        self.num_features = 84
        self.input_size = (LENET_SIZE, LENET_SIZE)
        self.adapter = InputAdapter(self.input_size)  # resize only: trained from scratch on [0, 1]
        self.conv = nn.Sequential(
            nn.Conv2d(3, 6, kernel_size=5),  # N×3×32×32 -> N×6×28×28
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # -> N×6×14×14
            nn.Conv2d(6, 16, kernel_size=5),  # -> N×16×10×10
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # -> N×16×5×5
        )
        self.fc = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
        )
        self.head: nn.Module = nn.Linear(84, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.conv(self.adapter(x))  # N×3×H×W -> N×16×5×5
        return self.fc(x.flatten(1))  # N×400 -> N×84

    def forward_head(self, f: Tensor) -> Tensor:
        return self.head(f)  # N×84 -> N×K

    def remove_head(self) -> None:
        self.head = nn.Identity()
        self.num_classes = 0

    def remove_fc_layers(self) -> None:
        """The conv trunk only: forward_features gives the flattened 16×5×5 map (400-d)."""
        self.remove_head()
        self.fc = nn.Identity()
        self.num_features = 16 * 5 * 5


def _load_lenet_weights(model: LeNet5, path: Path) -> None:
    """Load a state dict saved from a lenet5 backbone (``torch.save(backbone.state_dict(), path)``).

    A head with a different class count is left at its initialisation (fine-tuning to a new K),
    the same rule timm applies to its classifiers; every other tensor must match.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip or unsafe-type errors: all mean "not a weights file"
        raise UserError(f"cannot read lenet5 weights from {str(path)!r} ({type(e).__name__}); "
                        "pass --weights with a saved lenet5 state dict, or --no-pretrained") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{str(path)!r} does not hold a state dict; pass --weights with a saved lenet5 state dict")
    own = model.state_dict()
    head_keys = {k for k in own if k.startswith("head.")}
    if any(k in state and state[k].shape != own[k].shape for k in head_keys):
        state = {k: v for k, v in state.items() if k not in head_keys}
    # adapter buffers are optional: a lenet5 state dict saved without them keeps the identity normalisation
    missing = sorted(k for k in set(own) - set(state) - head_keys if not k.startswith("adapter."))
    bad = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
    if missing or bad or set(state) - set(own):
        first = (missing or bad or sorted(set(state) - set(own)))[0]
        raise UserError(f"{str(path)!r} is not a lenet5 state dict (tensor {first!r} missing or mismatched); "
                        "pass --weights with a saved lenet5 state dict, or --no-pretrained")
    model.load_state_dict(state, strict=False)


@register_backbone("lenet5", default_pretrained=False)
def lenet5(num_classes: int, pretrained: bool, weights: Path | None, input_size: int | None) -> Backbone:
    if input_size not in (None, LENET_SIZE):
        raise UserError(f"lenet5 takes 32×32 inputs, got input_size={input_size}; leave input_size unset")
    model = LeNet5(num_classes)
    if weights is not None:
        _load_lenet_weights(model, weights)
    elif pretrained:
        raise UserError("lenet5 has no published pretrained weights; pass --weights PATH or --no-pretrained")
    return model
