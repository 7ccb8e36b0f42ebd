"""Weighted Average Explanations (WAE, Apicella et al. 2023, the paper's ref. [7]), its second comparison.

WAE feeds a classifier an explanation it can have at test time, when the true class -- and so
the true-class SHAP map IMPACTX learns to predict -- is unknown:

    class means   E_k = mean over training images of class k of scale(r_i)       K×C×H×W
    weights       p = softmax(m), m = M(x) the frozen stage-1 logits              N×K
    explanation   e = Σ_k p_k · E_k                                               N×C×H×W
    prediction    ŷ = C(concat(m, Enc(e)))                                        N×K

Interpretation choices (ref. [7] describes the idea; the details here are ours):

- The maps are the same stage-1 SHAP maps of the true class that IMPACTX trains on, each scaled to
  [-1, 1] by its max |value| (``scale_maps``) before averaging, so every image counts the same
  whatever its logit scale (``impactx_ray.data.class_mean_maps``). Only training images enter the
  means; a class with no training image gets an all-zero mean.
- The same weighted average is used in training and at test time (no true-label lookup during
  training), so the classifier never sees inputs at training time that it cannot get at test time.
- p is computed from M's logits with gradients stopped: M is frozen (as in IMPACTX stage 2), so the
  explanation is a soft lookup keyed on M's prediction, not a path for training M.
- Enc (a small conv net, 3 stride-2 conv blocks → 4×4 pooling → FC-512 + sigmoid) plays LEP's
  role and C is IMPACTX's C (FC-256 → ReLU → FC K on concat(m, z)), so WAE and IMPACTX differ only in
  where z comes from.
- The class means are a persistent buffer: a saved WAE carries the maps it was trained with.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from impactx_ray.models.registry import Backbone


class ExplanationEncoder(nn.Module):
    """e (N×C×H×W) -> z (N×latent_dim) in (0, 1); works for any H, W ≥ 8."""

    def __init__(self, channels: int, latent_dim: int = 512) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((channels, 16), (16, 32), (32, 64)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        self.conv = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4))  # N×C×H×W -> N×64×4×4
        self.fc = nn.Linear(64 * 4 * 4, latent_dim)
        self.latent_dim = latent_dim

    def forward(self, e: Tensor) -> Tensor:
        return self.fc(self.conv(e).flatten(1)).sigmoid()  # N×1024 -> N×latent_dim


class WAE(nn.Module):
    """M (frozen stage-1 backbone) + the weighted-average explanation, its encoder and classifier C."""

    def __init__(self, backbone: Backbone, class_means: Tensor, latent_dim: int = 512, hidden: int = 256) -> None:
        super().__init__()
        k = backbone.num_classes
        if class_means.dim() != 4 or class_means.shape[0] != k:
            raise ValueError(f"class_means must be {k}×C×H×W, got shape {tuple(class_means.shape)}")
        self.num_classes = k
        self.M = backbone
        self.register_buffer("class_means", class_means.detach().to(torch.float32).clone())  # K×C×H×W
        self.encoder = ExplanationEncoder(class_means.shape[1], latent_dim)
        self.C = nn.Sequential(nn.Linear(k + latent_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, k))
        self.backbone_frozen = False

    def freeze_backbone(self) -> None:
        """M keeps its stage-1 weights and BatchNorm statistics (no grad, always eval mode)."""
        self.M.requires_grad_(False)
        self.M.eval()
        self.backbone_frozen = True

    def train(self, mode: bool = True) -> "WAE":
        super().train(mode)
        if self.backbone_frozen:
            self.M.eval()
        return self

    def weighted_explanation(self, m: Tensor) -> Tensor:
        """softmax(m) (no grad) weighting the class means: N×K -> N×C×H×W."""
        p = torch.softmax(m.detach(), dim=1).to(self.class_means.dtype)  # N×K
        return torch.einsum("nk,kchw->nchw", p, self.class_means)

    def forward(self, x: Tensor) -> Tensor:
        """x: N×3×H×W in [0, 1] -> logits N×K."""
        m = self.M(x)  # N×K
        z = self.encoder(self.weighted_explanation(m))  # N×C×H×W -> N×latent
        return self.C(torch.cat([m, z], dim=1))  # N×(K+latent) -> N×K

    def explain(self, x: Tensor) -> Tensor:
        """The weighted explanation WAE classifies with: N×C×H×W in [-1, 1]."""
        return self.weighted_explanation(self.M(x))

    @classmethod
    def from_backbone(cls, backbone: Backbone, class_means: Tensor, freeze: bool = True) -> "WAE":
        """WAE around a trained backbone (used as M itself, not copied); frozen by default."""
        model = cls(backbone, class_means)
        if freeze:
            model.freeze_backbone()
        return model
