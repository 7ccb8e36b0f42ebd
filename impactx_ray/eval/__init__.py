"""Evaluation: MoRF curves / AOPC and the paper's figures (plain PyTorch, NumPy, matplotlib)."""

from impactx_ray.eval.morf import (
                                   aopc,
                                   default_region,
                                   morf_curve,
                                   perturbed_images,
                                   random_maps,
                                   region_ranks,
                                   relevance,
)

__all__ = ["aopc", "default_region", "morf_curve", "perturbed_images", "random_maps", "region_ranks",
           "relevance"]
