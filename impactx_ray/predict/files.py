"""``impactx predict``: a run's trained model on image files, written as a CSV and, for the
methods that have one, each image's own map (``.npy``) and its overlay (``.png``).

    <to>/predictions.csv         file, class, probability, top5, map, overlay[, shap_map, shap_overlay]
    <to>/maps/<name>.npy         the method's map, float32 C×H×W (IMPACTX, WAE: C=3; ABN: C=1)
    <to>/overlays/<name>.png     the map over the image (predict/overlay.py)
    <to>/shap/<name>.npy         with --shap: SHAP of the same model's predicted class, float32 3×H×W

``<to>`` is ``<run>/predictions/<method>`` unless given. Images of another size are resized the
way imagefolder training images are (``data.read_image``). Unreadable files among good ones are
skipped and named; no readable image at all is a one-line UserError.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from impactx_ray.data import UNREADABLE, read_image
from impactx_ray.errors import UserError
from impactx_ray.io import write_bytes, write_npy
from impactx_ray.predict.overlay import save_overlay
from impactx_ray.predict.predictor import BATCH, Prediction, Predictor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageFile:
    path: Path
    name: str  # unique within one call, safe as a file name: its path under the input, '/' as '__'


def find_images(inputs: list[Path]) -> list[ImageFile]:
    """Every image named in ``inputs``: files as given, folders searched (recursively) for image
    suffixes. A missing path or a folder without images is a one-line UserError."""
    found: list[ImageFile] = []
    taken: set[str] = set()
    for given in inputs:
        if given.is_dir():
            files = sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UserError(f"folder {given} holds no images ({', '.join(IMAGE_SUFFIXES[:4])}, ...); "
                                "point at image files or a folder of them")
            named = [(p, str(p.relative_to(given).with_suffix(""))) for p in files]
        elif given.is_file():
            named = [(given, given.stem)]
        else:
            raise UserError(f"input {given} does not exist; give image files or folders of them")
        for path, stem in named:
            name = stem.replace(os.sep, "__")
            while name in taken:  # the same name from two inputs: keep both
                name += "_"
            taken.add(name)
            found.append(ImageFile(path, name))
    return found


def read_images(files: list[ImageFile], size: tuple[int, int], progress: bool,
                warn: Callable[[str], None]) -> tuple[list[ImageFile], torch.Tensor]:
    """(readable files, their images uint8 N×3×H×W); unreadable ones named in one warning."""
    good, images, bad = [], [], []
    for f in tqdm(files, unit="image", desc="reading", disable=not progress or len(files) < 2,
                  dynamic_ncols=True):
        try:
            images.append(read_image(f.path, size))
            good.append(f)
        except UNREADABLE as e:
            bad.append(f"{f.path}: {' '.join(str(e).split())[:160] or type(e).__name__}")
    if not good:
        raise UserError(f"none of the {len(files)} input files is a readable image "
                        f"({bad[0] if bad else 'no files'}); give image files (PNG, JPEG, ...)")
    if bad:
        warn(f"skipped {len(bad)} unreadable file{'s' * (len(bad) > 1)} of {len(files)}:\n  " + "\n  ".join(bad))
    return good, torch.stack(images)


def shap_maps(predictor: Predictor, images: torch.Tensor, labels: np.ndarray, explainer_kwargs: dict,
              progress: bool) -> np.ndarray:
    """SHAP maps of the predictor's own model for its predicted classes, float32 N×3×H×W."""
    from impactx_ray.explain import explain_true_class

    x = images.to(torch.float32).div(255.0)  # N×3×H×W in [0, 1]
    maps = explain_true_class(predictor.model.cpu(), x, labels, progress=progress, **explainer_kwargs)
    predictor.model.to(predictor.device)
    return np.ascontiguousarray(maps.transpose(0, 3, 1, 2))  # N×H×W×C -> N×C×H×W


def predict_files(predictor: Predictor, inputs: list[Path], to: Path, *, shap: dict | None = None,
                  progress: bool = True, warn: Callable[[str], None] | None = None) -> Prediction:
    """Predict every image in ``inputs`` and write ``to`` (layout above); ``shap``: the explainer
    keyword arguments to add SHAP maps with. Returns the prediction of the readable files."""
    warn = warn or (lambda m: print(f"impactx: warning: {m}", file=sys.stderr, flush=True))
    files, images = read_images(find_images(inputs), predictor.image_size, progress, warn)
    parts = [predictor.predict(images[i:i + BATCH].permute(0, 2, 3, 1))  # N×3×H×W -> N×H×W×3
             for i in tqdm(range(0, len(files), BATCH), unit="batch", desc=f"predicting {len(files)} images",
                           disable=not progress or len(files) <= BATCH, dynamic_ncols=True)]
    pred = Prediction(np.concatenate([p.labels for p in parts]), np.concatenate([p.probabilities for p in parts]),
                      np.concatenate([p.maps for p in parts]) if predictor.has_map else None, predictor.classes)
    extra = shap_maps(predictor, images, pred.labels, shap, progress) if shap is not None else None
    rows = []
    for i, f in enumerate(tqdm(files, unit="image", desc="writing", disable=not progress or len(files) < 2,
                               dynamic_ncols=True)):
        name, prob = pred.names()[i], float(pred.probabilities[i, pred.labels[i]])
        row = {"file": str(f.path), "class": name, "probability": f"{prob:.6f}",
               "top5": ";".join(f"{c}:{p:.6f}" for c, p in pred.top(i))}
        for kind, maps in (("", pred.maps), ("shap_", extra)):
            if maps is None:
                continue
            folder = "shap" if kind else "maps"
            write_npy(to / folder / f"{f.name}.npy", maps[i])
            png = to / "overlays" / f"{f.name}{'.shap' if kind else ''}.png"
            save_overlay(png, images[i].numpy(), maps[i], signed=bool(kind) or predictor.map_is_signed)
            row[f"{kind}map"], row[f"{kind}overlay"] = f"{folder}/{f.name}.npy", str(png.relative_to(to))
        rows.append(row)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(to / "predictions.csv", buf.getvalue().encode())
    return pred
