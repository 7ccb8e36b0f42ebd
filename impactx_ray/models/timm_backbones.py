"""timm backbones: MobileNet V1/V2, EfficientNet-B2 (Noisy Student) and any other timm model name.

The paper fine-tunes MobileNet pre-trained on ImageNet and EfficientNet-B2 with Noisy Student
weights. timm's own split is kept: our ``forward_features`` is timm's
``forward_head(forward_features(x), pre_logits=True)`` (pooled, after timm's head dropout) and our
``forward_head`` is timm's classifier, so ``forward`` equals the timm model's forward exactly.

Pretrained weights come from timm's normal sources (Hugging Face hub, or its local cache when
HF_HUB_OFFLINE=1) or from a local file through ``pretrained_cfg_overlay=dict(file=PATH)``. When
they cannot be had we raise UserError: a sweep silently fine-tuning random weights would report
numbers that mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import load_state_dict
from torch import Tensor, nn

from impactx_ray.errors import UserError
from impactx_ray.models.registry import Backbone, InputAdapter, register_backbone

# Our short names -> timm names (paper: MobileNet [19] is V1; EfficientNet-B2 with Noisy Student).
TIMM_NAMES = {
    "mobilenet": "mobilenetv1_100",
    "mobilenet_v2": "mobilenetv2_100",
    "efficientnet_b2": "tf_efficientnet_b2.ns_jft_in1k",
}


class TimmBackbone(Backbone):
    """A timm classifier behind the Backbone interface, with its resize/normalise adapter in front.

    ``normalize`` applies the pretrained cfg's mean/std; models trained from scratch see [0, 1].
    """

    def __init__(self, model: nn.Module, name: str, input_size: int | None, normalize: bool) -> None:
        super().__init__()
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        self.name = name
        self.model = model
        self.num_classes = int(model.num_classes)
        # width of forward_head(..., pre_logits=True); differs from num_features when a head conv exists
        self.num_features = int(getattr(model, "head_hidden_size", None) or model.num_features)
        if input_size is not None:
            self.input_size = (input_size, input_size)
        else:
            self.input_size = tuple(int(s) for s in cfg.get("input_size", (3, 224, 224))[1:])  # type: ignore[assignment]
        mean = cfg.get("mean", IMAGENET_DEFAULT_MEAN) if normalize else None
        std = cfg.get("std", IMAGENET_DEFAULT_STD) if normalize else None
        self.adapter = InputAdapter(self.input_size, mean, std)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.model.forward_features(self.adapter(x))  # N×3×H×W -> N×C'×h×w (unpooled)
        return self.model.forward_head(x, pre_logits=True)  # -> N×num_features

    def forward_head(self, f: Tensor) -> Tensor:
        return self.model.get_classifier()(f)  # N×num_features -> N×K

    def remove_head(self) -> None:
        self.model.reset_classifier(0)  # classifier -> Identity; pooling kept
        self.num_classes = 0


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:limit]}"


def _check_file_loaded(model: nn.Module, path: Path, label: str) -> None:
    """Make sure every non-classifier tensor came from the file, and take its classifier when it fits.

    timm loads a file with ``strict=False`` whenever num_classes differs from the pretrained cfg's,
    so a file of the wrong architecture (different key names) would otherwise leave random weights
    with only a log line. A classifier of the right shape (a file saved from a K-class model) is
    loaded too, which timm skips because K differs from ImageNet's 1000.
    """
    state = load_state_dict(str(path))
    own = model.state_dict()
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    head_keys = {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    missing = [k for k in own if k not in head_keys and k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise UserError(
            f"{str(path)!r} does not hold {label} weights ({len(missing)} of {len(own)} tensors missing, "
            f"e.g. {missing[0]!r}); pass --weights with a timm state dict for this model, or --no-pretrained"
        )
    fitting = {k: state[k] for k in head_keys if k in own and k in state and state[k].shape == own[k].shape}
    if fitting:
        model.load_state_dict(fitting, strict=False)


def _create_timm_model(timm_name: str, label: str, num_classes: int, pretrained: bool,
                       weights: Path | None) -> nn.Module:
    if weights is None and not pretrained:
        return timm.create_model(timm_name, pretrained=False, num_classes=num_classes)
    overlay = {"pretrained_cfg_overlay": dict(file=str(weights))} if weights is not None else {}
    source = f"file {str(weights)!r}" if weights is not None else "timm's hub/cache"
    try:
        model = timm.create_model(timm_name, pretrained=True, num_classes=num_classes, **overlay)
    except UserError:
        raise
    except Exception as e:  # network, offline cache miss, unreadable or mismatched file: all one message
        raise UserError(
            f"cannot load pretrained weights for {label} ({timm_name}) from {source}: {_one_line(e)}; "
            "pass --weights PATH to a local weights file, or --no-pretrained"
        ) from e
    if weights is not None:
        _check_file_loaded(model, weights, label)
    return model


def create_timm_backbone(
    name: str,
    num_classes: int,
    pretrained: bool,
    weights: Path | None,
    input_size: int | None,
    timm_name: str | None = None,
) -> Backbone:
    """Wrap ``timm.create_model(timm_name or name)``; ``weights`` implies pretrained."""
    timm_name = timm_name or name
    loaded = pretrained or weights is not None
    model = _create_timm_model(timm_name, name, num_classes, pretrained, weights)
    return TimmBackbone(model, name, input_size, normalize=loaded)


def _register(short: str, timm_name: str) -> None:
    @register_backbone(short, default_pretrained=True)
    def factory(num_classes: int, pretrained: bool, weights: Path | None, input_size: int | None) -> Backbone:
        return create_timm_backbone(short, num_classes, pretrained, weights, input_size, timm_name=timm_name)

    factory.__name__ = short


for _short, _timm_name in TIMM_NAMES.items():
    _register(_short, _timm_name)

__all__ = ["TIMM_NAMES", "TimmBackbone", "create_timm_backbone"]
