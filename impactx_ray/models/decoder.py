"""Decoder D: latent z -> attribution map at the input resolution (paper Fig. 2).

z(512) → FC → ReLU → reshape to width×h0×w0 → [Conv3×3+ReLU, Conv3×3+ReLU, Upsample×2] × k
→ Conv3×3 to C channels → tanh. The paper uses k=3 blocks for 32×32 CIFAR (4×4 start) and one more
for 96×96 STL-10 (6×6 start). General rule here: the largest k with H % 2**k == 0 and H / 2**k >= 4,
the same for W, and k = the smaller of the two. tanh because targets are maps scaled per image to
[-1, 1] by their max |value|.
"""

from __future__ import annotations

from torch import Tensor, nn

from impactx_ray.errors import UserError

MIN_START = 4  # smallest side of the first feature map


def _blocks_for(side: int) -> int:
    k = 0
    while side % 2 ** (k + 1) == 0 and side // 2 ** (k + 1) >= MIN_START:
        k += 1
    return k


def num_upsampling_blocks(image_size: tuple[int, int]) -> int:
    """k for an H×W output: 3 for 32×32, 4 for 96×96; UserError when no k >= 1 fits."""
    k = min(_blocks_for(image_size[0]), _blocks_for(image_size[1]))
    if k < 1:
        raise UserError(
            f"decoder cannot produce {image_size[0]}×{image_size[1]} maps: each side must be even and at "
            f"least {2 * MIN_START} pixels (e.g. 32 or 96); resize the dataset's images"
        )
    return k


class Decoder(nn.Module):
    def __init__(
        self,
        out_channels: int = 3,
        image_size: tuple[int, int] | int = (32, 32),
        latent_dim: int = 512,
        width: int = 64,
    ) -> None:
        super().__init__()
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.out_channels = out_channels
        self.latent_dim = latent_dim
        self.width = width
        self.num_blocks = k = num_upsampling_blocks(self.image_size)
        self.h0, self.w0 = self.image_size[0] // 2**k, self.image_size[1] // 2**k
        self.fc = nn.Sequential(nn.Linear(latent_dim, width * self.h0 * self.w0), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        for _ in range(k):  # each block: width×h×w -> width×2h×2w
            blocks += [
                nn.Conv2d(width, width, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Upsample(scale_factor=2, mode="nearest"),
            ]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        n = z.shape[0]
        x = self.fc(z)  # N×latent_dim -> N×(width·h0·w0)
        x = x.view(n, self.width, self.h0, self.w0)  # -> N×width×h0×w0 (4×4 for 32, 6×6 for 96)
        x = self.blocks(x)  # -> N×width×H×W (H = h0·2**k)
        return self.out(x).tanh()  # -> N×C×H×W in [-1, 1]
