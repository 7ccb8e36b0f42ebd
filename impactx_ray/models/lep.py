"""Latent Explanation Predictor (LEP): the backbone with its last FC layers replaced by FC-512 + sigmoid.

Paper §4.3: "LEP is built starting from the architecture of the selected A, replacing the last
fully-connected layers by a fully-connected layer with a dimensionality of 512 and a sigmoid".
For LeNet-5 that is the conv trunk → FC-512 (FC120, FC84 and FC K all go); for the timm models,
whose only FC is the classifier, the classifier. LEPs of checkpoints written before this rule
(LeNet-5 keeping FC120 → FC84) are built with ``keep_fc=True`` to load them.
Its output z is the latent code from which the decoder D rebuilds the attribution map, and which
the classifier C reads next to M's scores.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from impactx_ray.models.registry import Backbone


class LEP(nn.Module):
    """z = sigmoid(FC(trunk.forward_features(x))), z in (0, 1)^latent_dim.

    Takes ownership of ``trunk``: its FC layers (``Backbone.remove_fc_layers``; only the K-way
    head with ``keep_fc``) are replaced by the identity, so their unused parameters neither sit
    in the optimiser nor in checkpoints. The trunk keeps its input adapter,
    so LEP takes the same [0, 1] native-resolution images as every backbone.
    """

    def __init__(self, trunk: Backbone, latent_dim: int = 512, keep_fc: bool = False) -> None:
        super().__init__()
        if keep_fc:
            trunk.remove_head()
        else:
            trunk.remove_fc_layers()
        self.trunk = trunk
        self.latent_dim = latent_dim
        self.fc = nn.Linear(trunk.num_features, latent_dim)

    def forward(self, x: Tensor) -> Tensor:
        f = self.trunk.forward_features(x)  # N×3×H×W -> N×num_features
        return self.fc(f).sigmoid()  # -> N×latent_dim in (0, 1)

    @classmethod
    def from_backbone(cls, backbone: Backbone, latent_dim: int = 512,
                      keep_fc: bool = False) -> "LEP":
        """An LEP whose trunk is an independent deep copy of ``backbone``.

        Choice (the paper only says LEP has A's architecture): the copy starts from the stage-1
        weights rather than from scratch or from ImageNet, because those features already separate
        the classes the SHAP maps explain and it needs no extra download. Gradients are re-enabled
        on the copy, so copying an already frozen M still gives a trainable LEP.
        """
        trunk = copy.deepcopy(backbone)
        trunk.requires_grad_(True)
        return cls(trunk, latent_dim, keep_fc)
