"""Attention Branch Network (ABN, Fukui et al. 2019), the paper's first comparison method.

ABN splits a CNN at an intermediate feature map f (N×C×h×w):

    attention branch   a = ReLU(BN(Conv1×1_K(BN(block(f)))))        K class maps, N×K×h×w
                       attention logits = GAP(Conv1×1_K→K(a))        N×K
                       attention map    M = sigmoid(BN(Conv1×1_K→1(a)))   N×1×h×w
    perception branch  the backbone's remaining layers on (1 + M)·f  → perception logits N×K

and is trained on CE(y, attention logits) + CE(y, perception logits). ``block`` is one
Conv3×3-BN-ReLU at stride 1, standing in for ABN's ``att_layer4`` (a stride-1 copy of the next
residual stage, which would double the backbone's deepest stage); the map's conv is 1×1 as in the
ABN paper (their code uses a 3×3). The prediction is the perception branch's; the explanation is M,
upsampled to the input.

Where the branch attaches (``ATTACH_POINTS``):

- ``lenet5``: after the second conv block (``conv``: conv16@5 → ReLU → pool), 16×5×5 at 32×32 --
  the last spatial map; the perception branch is FC120 → FC84 → FC K, as in ABN where the
  perception branch is the rest of the network.
- timm models: the end of the last stage with stride 16, read from timm's ``feature_info`` (the
  module names ``features_only`` uses). This matches ABN on ResNet (branch after ``layer3``, the
  stride-32 stage left to perception). Inputs are resized to the model's input size first, so the
  map is 14×14 at 224 (MobileNets), 17×17 at 260 (EfficientNet-B2), 2×2 with ``--input-size 32``.

The split is done by *wrapping* that module in place (``AttendedBlock``): the backbone's own
forward -- adapter, timm's forward_features/forward_head -- runs unchanged and the perception branch
is, by construction, exactly the backbone's remaining layers. Pretrained weights load before the
wrap, so ABN fine-tunes the same weights as the stage-1 baseline.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from impactx_ray.errors import UserError
from impactx_ray.models.factory import create_backbone
from impactx_ray.models.registry import Backbone

# name -> (module inside the Backbone whose output the branch reads, its channels).
# The timm rows equal what ``timm_attach_point`` derives from feature_info (tested); other timm
# names use that rule directly.
ATTACH_POINTS: dict[str, tuple[str, int]] = {
    "lenet5": ("conv", 16),                       # 16×5×5: after conv block 2, before the FCs
    "mobilenet": ("model.blocks.3", 512),         # stride 16 (14×14 at 224); blocks.4 is stride 32
    "mobilenet_v2": ("model.blocks.4", 96),       # stride 16 (14×14 at 224); blocks.5-6 remain
    "efficientnet_b2": ("model.blocks.4", 120),   # stride 16 (17×17 at 260); blocks.5-6 remain
}
ATTACH_STRIDE = 16


def timm_attach_point(model: nn.Module, stride: int = ATTACH_STRIDE) -> tuple[str, int]:
    """(module path relative to the timm model, channels) of the last feature stage at ``stride``."""
    info = list(getattr(getattr(model, "feature_info", None), "info", None) or
                getattr(model, "feature_info", None) or [])
    at = [d for d in info if d.get("reduction") == stride]
    if not at:
        raise UserError(f"ABN: timm model {type(model).__name__} lists no feature stage at stride {stride}; "
                        "use a convolutional backbone such as mobilenet_v2")
    return str(at[-1]["module"]), int(at[-1]["num_chs"])


def attach_point(backbone: Backbone) -> tuple[str, int]:
    """Where the attention branch attaches in ``backbone`` (see ATTACH_POINTS)."""
    if backbone.name in ATTACH_POINTS:
        return ATTACH_POINTS[backbone.name]
    model = getattr(backbone, "model", None)
    if model is None:
        raise UserError(f"ABN has no attach point for backbone {backbone.name!r}")
    module, channels = timm_attach_point(model)
    return f"model.{module}", channels


class AttentionBranch(nn.Module):
    """f (N×C×h×w) -> (attention logits N×K, attention map N×1×h×w in (0, 1))."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.to_classes = nn.Sequential(  # K class maps (CAM-like)
            nn.Conv2d(channels, num_classes, 1, bias=False),
            nn.BatchNorm2d(num_classes),
            nn.ReLU(inplace=True),
        )
        self.logit_conv = nn.Conv2d(num_classes, num_classes, 1, bias=False)
        self.map_conv = nn.Sequential(nn.Conv2d(num_classes, 1, 1, bias=False), nn.BatchNorm2d(1))

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        a = self.to_classes(self.block(f))  # N×C×h×w -> N×K×h×w
        logits = self.logit_conv(a).mean(dim=(2, 3))  # GAP: N×K×h×w -> N×K
        return logits, torch.sigmoid(self.map_conv(a))  # N×K, N×1×h×w


class AttendedBlock(nn.Module):
    """Runs the wrapped module, then the attention branch; returns (1 + M)·f to the layers after it.

    The branch outputs are kept in ``last`` for the enclosing ABN to collect after the backbone's
    forward (a module in the middle of a timm forward cannot return extra values).
    """

    def __init__(self, inner: nn.Module, branch: AttentionBranch) -> None:
        super().__init__()
        self.inner = inner
        self.branch = branch
        self.last: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        f = self.inner(x)
        if f.dim() != 4:
            raise UserError(f"ABN needs an N×C×h×w feature map at its attach point, got shape {tuple(f.shape)}")
        logits, att = self.branch(f)
        self.last = (logits, att)
        return f * (1.0 + att)  # N×C×h×w · N×1×h×w (broadcast over channels)


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)


class ABN(nn.Module):
    """A backbone with an attention branch. ``forward`` gives the perception logits, ``outputs``
    all three branch outputs (for the loss), ``explain`` the attention map at the input size."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        path, channels = attach_point(backbone)
        self.attach = path
        self.num_classes = backbone.num_classes
        _replace(backbone, path, AttendedBlock(backbone.get_submodule(path),
                                               AttentionBranch(channels, backbone.num_classes)))
        self.backbone = backbone

    @property
    def attended(self) -> AttendedBlock:
        """The wrapped attach module (looked up, not registered twice: one copy of each weight in state_dict)."""
        return self.backbone.get_submodule(self.attach)  # type: ignore[return-value]

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: N×3×H×W in [0, 1] -> (perception logits N×K, attention logits N×K, map N×1×h×w)."""
        logits = self.backbone(x)
        if self.attended.last is None:
            raise RuntimeError(f"the attention branch at {self.attach!r} did not run in the forward pass")
        att_logits, att = self.attended.last
        self.attended.last = None  # don't keep the graph alive between calls
        return logits, att_logits, att

    def forward(self, x: Tensor) -> Tensor:
        """x: N×3×H×W in [0, 1] -> perception logits N×K (the prediction)."""
        return self.outputs(x)[0]

    def explain(self, x: Tensor) -> Tensor:
        """The attention map upsampled (bilinear) to the input: N×1×H×W in [0, 1]."""
        att = self.outputs(x)[2]  # N×1×h×w
        return F.interpolate(att, size=x.shape[-2:], mode="bilinear", align_corners=False)  # -> N×1×H×W


def abn_loss(logits: Tensor, att_logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ABN's training loss: (CE(att) + CE(perception), CE(att), CE(perception))."""
    ce_att = F.cross_entropy(att_logits, labels)
    ce_per = F.cross_entropy(logits, labels)
    return ce_att + ce_per, ce_att, ce_per


def create_abn(name: str, num_classes: int, pretrained: bool = False, weights: str | Path | None = None,
               input_size: int | None = None) -> ABN:
    """ABN around ``create_backbone(...)`` (same arguments; weights load before the branch is added)."""
    return ABN(create_backbone(name, num_classes, pretrained=pretrained, weights=weights, input_size=input_size))
