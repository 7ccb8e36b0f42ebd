"""Models: the backbone registry (LeNet-5, timm), IMPACTX's LEP, decoder and assembly, and the
comparison methods of the paper's §5: ABN (Fukui et al. 2019) and WAE (Apicella et al. 2023).

One output contract for all of them: ``forward(x)`` returns the N×K logits; the models that
produce their own attribution map (ImpactX, ABN, WAE) add ``explain(x)``.
"""

from impactx_ray.models.abn import ABN, ATTACH_POINTS, abn_loss, create_abn
from impactx_ray.models.decoder import Decoder
from impactx_ray.models.factory import check_backbone_name, create_backbone, default_pretrained
from impactx_ray.models.impactx import ImpactX
from impactx_ray.models.lenet5 import LeNet5
from impactx_ray.models.lep import LEP
from impactx_ray.models.registry import BACKBONES, Backbone, InputAdapter, list_backbones, register_backbone
from impactx_ray.models.timm_backbones import TimmBackbone
from impactx_ray.models.wae import WAE

__all__ = [
    "ABN",
    "ATTACH_POINTS",
    "BACKBONES",
    "Backbone",
    "Decoder",
    "ImpactX",
    "InputAdapter",
    "LEP",
    "LeNet5",
    "TimmBackbone",
    "WAE",
    "abn_loss",
    "check_backbone_name",
    "create_abn",
    "create_backbone",
    "default_pretrained",
    "list_backbones",
    "register_backbone",
]
