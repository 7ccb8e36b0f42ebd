"""IMPACTX (paper §3): M and C classify, LEP and D learn to reproduce the SHAP map of the true class.

    m = M(x) ∈ R^K (the stage-1 classifier's logits)     z = LEP(x) ∈ (0, 1)^512
    ŷ = C(concat(m, z))                                   r̂ = D(z) ∈ [-1, 1]^{C×H×W}

Trained with eq. (1), L = CE(y, C(m, z)) + λ·MSE(r, D(z)); in the two-stage scheme M is frozen.
``forward`` gives ŷ's logits, ``explain`` r̂, and ``outputs`` both from one pass (for the loss).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from impactx_ray.models.decoder import Decoder
from impactx_ray.models.lep import LEP
from impactx_ray.models.registry import Backbone


class ImpactX(nn.Module):
    def __init__(self, backbone: Backbone, lep: LEP, decoder: Decoder, hidden: int = 256) -> None:
        super().__init__()
        if decoder.latent_dim != lep.latent_dim:
            raise ValueError(f"decoder latent_dim {decoder.latent_dim} != LEP latent_dim {lep.latent_dim}")
        self.num_classes = k = backbone.num_classes
        self.M = backbone
        self.lep = lep
        self.decoder = decoder
        self.C = nn.Sequential(  # shallow FC net on concat(m, z)
            nn.Linear(k + lep.latent_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, k),
        )
        self.backbone_frozen = False

    def freeze_backbone(self) -> None:
        """Stage 2: M keeps its stage-1 weights and BatchNorm statistics (no grad, always eval mode)."""
        self.M.requires_grad_(False)
        self.M.eval()
        self.backbone_frozen = True

    def train(self, mode: bool = True) -> "ImpactX":
        super().train(mode)
        if self.backbone_frozen:
            self.M.eval()  # a frozen M must not update BatchNorm running stats or apply dropout
        return self

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: N×C×H×W in [0, 1] -> (logits N×K, predicted attribution map N×C×H×W in [-1, 1])."""
        self._check_size(x)
        m = self.M(x)  # N×K
        z = self.lep(x)  # N×latent
        logits = self.C(torch.cat([m, z], dim=1))  # N×(K+latent) -> N×K
        return logits, self.decoder(z)  # N×K, N×C×H×W

    def forward(self, x: Tensor) -> Tensor:
        """x: N×C×H×W in [0, 1] -> logits N×K of C(concat(M(x), LEP(x)))."""
        self._check_size(x)
        return self.C(torch.cat([self.M(x), self.lep(x)], dim=1))  # N×(K+latent) -> N×K

    def explain(self, x: Tensor) -> Tensor:
        """IMPACTX's own attribution map D(LEP(x)): N×C×H×W in [-1, 1] (M is not needed)."""
        self._check_size(x)
        return self.decoder(self.lep(x))

    def _check_size(self, x: Tensor) -> None:
        if tuple(x.shape[-2:]) != self.decoder.image_size:
            raise ValueError(
                f"ImpactX was built for {self.decoder.image_size} images, got {tuple(x.shape[-2:])}"
            )

    @classmethod
    def from_backbone(
        cls, backbone: Backbone, image_size: int | tuple[int, int], channels: int = 3, freeze: bool = True,
        lep_keeps_fc: bool = False,
    ) -> "ImpactX":
        """IMPACTX around a trained backbone: LEP copies it (see LEP.from_backbone), D fits image_size.

        ``freeze=True`` (the paper's two-stage training) freezes M; pass False for single-stage training.
        ``lep_keeps_fc`` builds the LEP of checkpoints from before the paper's LEP (see ``lep.py``).
        """
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        lep = LEP.from_backbone(backbone, keep_fc=lep_keeps_fc)
        model = cls(backbone, lep, Decoder(channels, image_size, latent_dim=lep.latent_dim))
        if freeze:
            model.freeze_backbone()
        return model
