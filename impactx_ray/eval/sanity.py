"""Sanity checks of attribution maps (Adebayo et al., NeurIPS 2018; Quantus' guidelines): a map
must find the model's evidence better than a random ranking, and must change when the weights
that produce it are destroyed.

* **Random-ranking control** (:func:`beats_random`): the per-image AOPC of a map minus that of a
  random ranking of the same image under the same model and noise; the map passes when the 95%
  confidence interval of that paired difference lies above 0.
* **Cascading model randomization** (:class:`CascadingRandomization`): re-initialise the model's
  layers one at a time from the top (output side) down, each on top of the previous ones, and
  after each step compare the new maps with the trained model's maps by Spearman rank correlation
  per image. Maps that still rank pixels alike after the weights are gone (correlation near 1)
  show the input, not what the model learned. The map passes when the mean correlation after the
  last step is below ``threshold`` (0.5).

For IMPACTX the cascade runs through the LEP (top down), then M, then the decoder D (top down):
the rows after the LEP show how much of the map came from what the LEP learned about this image
(``after_lep_and_m``); M does not enter D(LEP(x)) at all, which the rows show as no change; what
stays correlated until D is randomized is D's learned prior of where evidence usually lies (the
same for every image). The verdict is on the last row: the whole map pathway random.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from impactx_ray.eval.morf import aopc_per_image, mean_ci, relevance

RANDOMIZATION_THRESHOLD = 0.5


def rank_correlation(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> np.ndarray:
    """Spearman rank correlation per image of two relevance arrays N×H×W (ties: average ranks).

    A constant map has no ranking: two identical maps correlate 1, otherwise 0.
    """
    from scipy.stats import rankdata

    a2 = np.asarray(a, dtype=np.float64).reshape(len(a), -1)  # N×H×W -> N×HW
    b2 = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    ra, rb = rankdata(a2, axis=1), rankdata(b2, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    same = (a2 == b2).all(axis=1)
    rho = np.where(denom > 0, (ra * rb).sum(1) / np.where(denom > 0, denom, 1.0), 0.0)
    return np.where(same, 1.0, rho)


def beats_random(curves: np.ndarray, random_curves: np.ndarray) -> dict[str, Any]:
    """Per-image AOPC of ``curves`` minus that of ``random_curves`` (same images, model, noise):
    mean with its 95% CI, and ``passed`` when the whole interval is above 0."""
    diff = mean_ci(aopc_per_image(curves) - aopc_per_image(random_curves))
    return {"aopc_minus_random": diff, "passed": bool(diff["ci_low"] > 0)}


def cascade_layers(model: nn.Module, roots: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """The layers to re-initialise, top first: modules owning parameters, in reverse order of
    registration (the forward order for sequential nets), under each of ``roots`` in turn
    (submodule names; empty: the whole model)."""
    layers = []
    for root in roots or ("",):
        base = model.get_submodule(root) if root else model
        own = [(f"{root}.{n}" if root and n else root or n, m) for n, m in base.named_modules()
               if any(True for _ in m.parameters(recurse=False))]
        layers += own[::-1]
    return layers


def reinitialise(layer: nn.Module) -> None:
    """A layer's own ``reset_parameters`` (Linear, Conv, BatchNorm: their initialisation);
    any other layer's parameters get N(0, 0.02²)."""
    if hasattr(layer, "reset_parameters"):
        layer.reset_parameters()
    else:
        for p in layer.parameters(recurse=False):
            nn.init.normal_(p, std=0.02)


def default_roots(model: nn.Module) -> tuple[str, ...]:
    """IMPACTX (a model with ``lep``, ``M`` and ``decoder``): the LEP, M, then D; any other
    model: all of it."""
    if all(hasattr(model, a) for a in ("lep", "M", "decoder")):
        return ("lep", "M", "decoder")
    return ()


class CascadingRandomization:
    """``CascadingRandomization(model)(x)``: rank correlation of ``explain(model, x)`` with the
    maps after each step of cascading randomization (see the module docstring).

    ``explain`` defaults to ``model.explain``; ``roots`` to :func:`default_roots`. The model itself
    is never changed (a deep copy is randomized) and torch's global RNG is left as it was.
    """

    def __init__(self, model: nn.Module, *, explain: Callable[[nn.Module, Tensor], Tensor] | None = None,
                 roots: Sequence[str] | None = None, seed: int = 0,
                 threshold: float = RANDOMIZATION_THRESHOLD, batch_size: int = 256) -> None:
        self.model, self.seed, self.threshold, self.batch_size = model, seed, threshold, batch_size
        self.explain = explain or (lambda m, x: m.explain(x))
        self.roots = tuple(default_roots(model) if roots is None else roots)

    def _relevance(self, model: nn.Module, x: Tensor) -> Tensor:
        maps = torch.cat([self.explain(model, x[i:i + self.batch_size])
                          for i in range(0, len(x), self.batch_size)])
        return relevance(maps.detach().cpu(), x.shape)  # any map layout -> N×H×W

    @torch.no_grad()
    def __call__(self, x: Tensor) -> dict[str, Any]:
        model = copy.deepcopy(self.model).eval()
        base = self._relevance(model, x)
        rows = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for name, layer in cascade_layers(model, self.roots):
                reinitialise(layer)
                rho = rank_correlation(base.numpy(), self._relevance(model, x).numpy())
                rows.append({"layer": name, "rank_correlation": mean_ci(rho)})
        if not rows:
            raise ValueError("cascading randomization found no layer with parameters")
        final = rows[-1]["rank_correlation"]["mean"]
        result = {"roots": list(self.roots), "layers": rows, "final_rank_correlation": final,
                  "threshold": self.threshold, "passed": bool(final < self.threshold)}
        before_d = [r for r in rows if not r["layer"].startswith("decoder")]
        if "decoder" in self.roots and before_d:
            result["after_lep_and_m"] = before_d[-1]["rank_correlation"]["mean"]
        return result
