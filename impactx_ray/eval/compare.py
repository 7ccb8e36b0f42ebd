"""The paper's comparisons on one trained cell: MoRF curves of IMPACTX's own maps, SHAP maps of
IMPACTX, ABN attention maps and a random ranking (Figs. 3–5), plus the published Table 2 values.

Plain PyTorch/NumPy (matplotlib only when figures are written); no Ray, no MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from impactx_ray.data import ImageData
from impactx_ray.eval.morf import aopc, morf_curve, random_maps
from impactx_ray.explain import ExplainSettings, explain_true_class
from impactx_ray.io import write_json, write_npy

# Paper Table 2: test accuracy (%) per (dataset, model) for baseline A, IMPACTX, ABN and WAE.
PAPER_TABLE2: dict[tuple[str, str], dict[str, float]] = {
    ("cifar10", "lenet5"): {"baseline": 67.96, "impactx": 70.65, "abn": 68.49, "wae": 68.10},
    ("cifar10", "mobilenet"): {"baseline": 94.63, "impactx": 96.27, "abn": 95.41, "wae": 94.75},
    ("cifar10", "efficientnet_b2"): {"baseline": 98.06, "impactx": 98.38, "abn": 98.19,
                                     "wae": 98.08},
    ("cifar100", "lenet5"): {"baseline": 36.23, "impactx": 39.49, "abn": 37.62, "wae": 36.20},
    ("cifar100", "mobilenet"): {"baseline": 76.72, "impactx": 79.37, "abn": 78.24, "wae": 76.98},
    ("cifar100", "efficientnet_b2"): {"baseline": 87.88, "impactx": 89.06, "abn": 88.89,
                                      "wae": 88.27},
    ("stl10", "lenet5"): {"baseline": 52.59, "impactx": 55.86, "abn": 53.36, "wae": 52.99},
    ("stl10", "mobilenet"): {"baseline": 91.07, "impactx": 95.79, "abn": 92.71, "wae": 91.42},
    ("stl10", "efficientnet_b2"): {"baseline": 98.76, "impactx": 99.00, "abn": 98.59,
                                   "wae": 98.65},
}
def _batched(fn, x: Tensor, batch_size: int = 256) -> Tensor:
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def morf_comparison(impactx: nn.Module, test: ImageData, settings: ExplainSettings, *,
                    abn: nn.Module | None = None, n: int = 100, seed: int = 0,
                    device: torch.device = torch.device("cpu"), progress: bool = True
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Tensor, Tensor]:
    """MoRF curves per method on the first ``n`` test images (the same noise seed for all).

    Returns (curves by method, maps by method (N×H×W×C or N×1×H×W), images, labels). Each map
    is scored with the model it explains: IMPACTX's own maps and SHAP-of-IMPACTX (computed with
    ``settings``, as the training maps were) with IMPACTX, ABN's attention with ABN, the random
    ranking with IMPACTX.
    """
    idx = torch.arange(min(n, len(test)))
    x, y = test.float_images(idx), test.labels[idx]
    impactx = impactx.to(device).eval()
    maps: dict[str, np.ndarray] = {}
    maps["IMPACTX"] = _batched(lambda b: impactx.explain(b.to(device)).cpu(), x).numpy()
    maps["SHAP of IMPACTX"] = explain_true_class(impactx, x.to(device), y, progress=progress,
                                                 **settings.explainer_kwargs(test.image_size))
    if abn is not None:
        abn = abn.to(device).eval()
        maps["ABN"] = _batched(lambda b: abn.explain(b.to(device)).cpu(), x).numpy()
    h, w = x.shape[-2:]
    maps["random"] = random_maps((len(x), h, w), seed)
    scorer = {"ABN": abn}
    curves = {name: morf_curve(scorer.get(name) or impactx, x.to(device), y.to(device), m,
                               seed=seed)
              for name, m in maps.items()}
    return curves, maps, x, y


def write_morf(out: Path, curves: dict[str, np.ndarray], maps: dict[str, np.ndarray],
               images: Tensor, labels: Tensor, class_names: list[str],
               examples: int = 6) -> dict[str, Any]:
    """Curves as ``.npy``, AOPC per method as JSON, and the two figures; returns the summary."""
    from impactx_ray.eval.figures import plot_examples, plot_mean_morf

    out.mkdir(parents=True, exist_ok=True)
    for name, c in curves.items():
        write_npy(out / f"morf_{name.replace(' ', '_')}.npy", c)
    scores = {name: aopc(c) for name, c in curves.items()}
    k = min(examples, len(images))
    figures = [
        plot_examples(out / "examples.png", images[:k], {m: v[:k] for m, v in maps.items()
                                                          if m != "random"},
                      {m: c[:k] for m, c in curves.items()}, labels[:k], class_names),
        plot_mean_morf(out / "morf_mean.png", curves),
    ]
    summary = {"aopc": scores, "images": int(len(images)), "steps": int(next(iter(
        curves.values())).shape[1] - 1), "figures": [str(f) for f in figures]}
    write_json(out / "morf.json", summary, sort_keys=False)
    return summary
