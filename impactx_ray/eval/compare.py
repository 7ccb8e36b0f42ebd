"""The paper's comparisons on one trained cell (Figs. 3–5), and beyond: MoRF and LeRF curves of
each model's own maps (IMPACTX, ABN), SHAP maps of that same model and a random ranking, with
noise, blur or ROAD imputation; AOPC, SRG and 95% CIs; sanity checks; the published Table 2.

Plain PyTorch/NumPy (matplotlib only when figures are written); no Ray, no MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from impactx_ray.data import ImageData
from impactx_ray.defaults import DEFAULT_REPLACEMENTS, MORF_IMAGES
from impactx_ray.eval.morf import (
    ORDERS,
    aopc_per_image,
    auc_per_image,
    default_region,
    mean_ci,
    morf_curve,
    random_maps,
    srg_per_image,
)
from impactx_ray.eval.road import check_replacement
from impactx_ray.explain import ExplainSettings, explain_true_class
from impactx_ray.io import write_json, write_npy

CPU = torch.device("cpu")


def _batched(fn, x: Tensor, batch_size: int = 256) -> Tensor:
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


EXAMPLE_RULE = ("test images among the MoRF images that IMPACTX (and ABN, when compared) "
                "classify correctly, drawn with numpy's default_rng(seed) without replacement, "
                "shown in test-set order")


class MorfCurves(dict):
    """{method: MoRF curves with the first replacement} (what callers before LeRF read), plus
    ``by`` {replacement: {order: {method: N×(S+1)}}}, ``scorer`` {method: model name},
    ``predictions`` {model name: (predicted class N, its softmax score N)}, ``sanity``."""

    def __init__(self, by: dict[str, dict[str, dict[str, np.ndarray]]], scorer: dict[str, str],
                 predictions: dict[str, tuple[np.ndarray, np.ndarray]], sanity: dict[str, Any],
                 seed: int, region: int) -> None:
        super().__init__(next(iter(by.values()))["morf"])
        self.by, self.scorer, self.predictions, self.sanity = by, scorer, predictions, sanity
        self.seed, self.region = seed, region


def _predict(model: nn.Module, x: Tensor, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    p = _batched(lambda b: torch.softmax(model(b.to(device)).float(), dim=1).cpu(), x)  # N×K
    score, cls = p.max(dim=1)
    return cls.numpy(), score.numpy()


@torch.no_grad()
def morf_comparison(impactx: nn.Module, test: ImageData, settings: ExplainSettings, *,
                    abn: nn.Module | None = None, n: int = MORF_IMAGES, seed: int = 0,
                    device: torch.device = CPU, progress: bool = True,
                    replacements: tuple[str, ...] = DEFAULT_REPLACEMENTS, sanity: bool = True
                    ) -> tuple[MorfCurves, dict[str, np.ndarray], Tensor, Tensor]:
    """MoRF and LeRF curves per method and replacement on the first ``n`` test images (the same
    noise seed for all).

    Returns (curves (:class:`MorfCurves`), maps by method (N×H×W×C or N×C×H×W), images, labels).
    Each map is scored with the model it explains: IMPACTX's own maps, SHAP of IMPACTX (computed
    with ``settings``, as the training maps were) and ``random`` with IMPACTX; ABN's attention,
    SHAP of ABN and ``random (ABN)`` with ABN. With ``sanity``, the random-ranking control and
    cascading randomization of each model's own maps (``eval/sanity.py``) go into ``.sanity``.
    """
    from impactx_ray.eval.sanity import CascadingRandomization, beats_random

    for r in replacements:
        check_replacement(r)
    idx = torch.arange(min(n, len(test)))
    x, y = test.float_images(idx), test.labels[idx]
    models = {"IMPACTX": impactx.to(device).eval()}
    if abn is not None:
        models["ABN"] = abn.to(device).eval()
    h, w = x.shape[-2:]
    maps: dict[str, np.ndarray] = {}
    scorer: dict[str, str] = {}
    for name, model in models.items():
        suffix = "" if name == "IMPACTX" else " (ABN)"
        maps[name] = _batched(lambda b, m=model: m.explain(b.to(device)).cpu(), x).numpy()
        maps[f"SHAP of {name}"] = explain_true_class(model, x.to(device), y, progress=progress,
                                                     **settings.explainer_kwargs(test.image_size))
        maps[f"random{suffix}"] = random_maps((len(x), h, w), seed)
        scorer.update({name: name, f"SHAP of {name}": name, f"random{suffix}": name})
    by = {r: {order: {m: morf_curve(models[scorer[m]], x.to(device), y.to(device), maps[m],
                                    seed=seed, order=order, replacement=r)
                      for m in maps}
              for order in ORDERS}
          for r in replacements}
    checks: dict[str, Any] = {}
    if sanity:
        for name, model in models.items():
            rnd = "random" if name == "IMPACTX" else "random (ABN)"
            checks[name] = {
                "random_ranking": {r: beats_random(by[r]["morf"][name], by[r]["morf"][rnd])
                                   for r in replacements},
                "cascading_randomization": CascadingRandomization(model, seed=seed)(x.to(device)),
            }
    predictions = {name: _predict(model, x, device) for name, model in models.items()}
    curves = MorfCurves(by, scorer, predictions, checks, seed, default_region((h, w)))
    return curves, maps, x, y


def metrics_of(by: dict[str, dict[str, dict[str, np.ndarray]]]) -> dict[str, Any]:
    """{replacement: {method: {aopc, aopc_lerf, auc_morf, auc_lerf, srg: mean_ci}}} of the curves.
    ``aopc_lerf`` is the AOPC of the LeRF curve (small: the least relevant regions hardly count)."""
    return {r: {m: {"aopc": mean_ci(aopc_per_image(orders["morf"][m])),
                    "aopc_lerf": mean_ci(aopc_per_image(orders["lerf"][m])),
                    "auc_morf": mean_ci(auc_per_image(orders["morf"][m])),
                    "auc_lerf": mean_ci(auc_per_image(orders["lerf"][m])),
                    "srg": mean_ci(srg_per_image(orders["morf"][m], orders["lerf"][m]))}
                for m in orders["morf"]}
            for r, orders in by.items()}


def flat_metrics(metrics: dict[str, Any], sanity: dict[str, Any] | None = None) -> dict[str, float]:
    """Every number of ``metrics`` (and the sanity verdicts) as flat MLflow-ready names,
    ``morf.<replacement>.<method>.<metric>[_ci_low|_ci_high]`` (spaces as underscores)."""
    flat: dict[str, float] = {}
    for r, methods in metrics.items():
        for m, ms in methods.items():
            for k, v in ms.items():
                key = f"morf.{r}.{m.replace(' ', '_').replace('(', '').replace(')', '')}.{k}"
                flat[key] = v["mean"]
                flat[f"{key}_ci_low"], flat[f"{key}_ci_high"] = v["ci_low"], v["ci_high"]
    for model, checks in (sanity or {}).items():
        for r, verdict in checks["random_ranking"].items():
            flat[f"sanity.{model}.{r}.aopc_minus_random"] = verdict["aopc_minus_random"]["mean"]
        flat[f"sanity.{model}.randomization_rank_correlation"] = \
            checks["cascading_randomization"]["final_rank_correlation"]
    return flat


def choose_examples(curves: MorfCurves, labels: Tensor, k: int) -> np.ndarray:
    """Indices of the example rows: see ``EXAMPLE_RULE``."""
    ok = np.ones(len(labels), dtype=bool)
    for cls, _ in curves.predictions.values():
        ok &= cls == labels.numpy()
    candidates = np.flatnonzero(ok)
    pick = np.random.default_rng(curves.seed).choice(candidates, size=min(k, len(candidates)),
                                                     replace=False)
    return np.sort(pick)


def write_morf(out: Path, curves: dict[str, np.ndarray], maps: dict[str, np.ndarray],
               images: Tensor, labels: Tensor, class_names: list[str],
               examples: int = 6, about: dict[str, Any] | None = None) -> dict[str, Any]:
    """Curves as ``.npy``, ``morf.json`` (AOPC of the paper's MoRF; per replacement AOPC,
    AUC(MoRF), AUC(LeRF) and SRG with 95% CIs; the sanity checks), the figures; returns the
    summary. ``curves`` as :func:`morf_comparison` returns them; ``about`` (e.g. which model was
    compared) leads the summary."""
    from impactx_ray.eval.figures import plot_mean_morf, plot_paper_examples

    if not isinstance(curves, MorfCurves):
        raise TypeError("write_morf takes the curves of morf_comparison")
    out.mkdir(parents=True, exist_ok=True)
    for r, orders in curves.by.items():
        for order, per_method in orders.items():
            for name, c in per_method.items():
                stem = f"{order}_{r}_" if (order, r) != ("morf", "noise") else "morf_"
                write_npy(out / f"{stem}{name.replace(' ', '_')}.npy", c)
    metrics = metrics_of(curves.by)
    chosen = choose_examples(curves, labels, examples)
    sides = []
    for model, (cls, score) in curves.predictions.items():
        shap_name = f"SHAP of {model}"
        sides.append({"model": model,
                      "titles": [f"{model}: {class_names[int(cls[i])]} ({score[i]:.2f})"
                                 for i in chosen],
                      "maps": {shap_name: maps[shap_name][chosen], model: maps[model][chosen]},
                      "curves": {shap_name: curves[shap_name][chosen],
                                 model: curves[model][chosen]}})
    figures = [plot_paper_examples(out / "examples.png", images[chosen], sides)] if len(chosen) else []
    for r, orders in curves.by.items():
        name = "morf_mean.png" if r == next(iter(curves.by)) else f"morf_mean_{r}.png"
        figures.append(plot_mean_morf(out / name, orders["morf"], lerf=orders["lerf"], title=r))
    first = next(iter(curves.by))
    summary = {**(about or {}), "aopc": {m: metrics[first][m]["aopc"]["mean"] for m in curves},
               "images": int(len(images)),
               "steps": int(next(iter(curves.values())).shape[1] - 1),
               "region": curves.region, "seed": curves.seed,
               "replacements": list(curves.by), "metrics": metrics,
               "sanity": curves.sanity, "flat_metrics": flat_metrics(metrics, curves.sanity),
               "examples": {"indices": [int(i) for i in chosen], "rule": EXAMPLE_RULE},
               "figures": [str(f) for f in figures]}
    write_json(out / "morf.json", summary, sort_keys=False)
    return summary
