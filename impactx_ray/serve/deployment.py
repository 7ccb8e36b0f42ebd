"""A trained model on Ray Serve: requests batched into one forward call (``@serve.batch``).

    POST /   body: an image file's bytes (PNG, JPEG, ...; any size: resized as training did),
             or JSON {"image": H×W×3 integers 0..255}, or an .npy array (application/x-npy) H×W×3 uint8
             -> 200 {"class", "class_name", "probabilities", "map"?}
             -> 400 {"error": one line} when the body is empty, not an image or the wrong shape
    GET  /   -> 200 {"method", "classes", "image_size"}

Arrays are taken at the model's image size only (resizing an array would guess its layout);
files are decoded and resized the way ``impactx predict`` does (``data.read_image``).
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from impactx_ray.data import UNREADABLE, read_image
from impactx_ray.errors import UserError
from impactx_ray.predict import Predictor


class BadRequest(ValueError):
    """A request the model cannot take: answered 400 with this one-line message."""


def decode(body: bytes, content_type: str, size: tuple[int, int]) -> np.ndarray:
    """One request body -> uint8 H×W×3 at ``size``; BadRequest saying what is wrong."""
    h, w = size
    kind = content_type.split(";")[0].strip().lower()
    if not body:
        raise BadRequest("empty body: POST an image file's bytes, JSON {\"image\": H×W×3 array} or an .npy array")
    if kind == "application/json":
        try:
            value = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"body is not JSON: {e}") from None
        if not isinstance(value, dict) or "image" not in value:
            raise BadRequest("JSON body needs an \"image\" key holding an H×W×3 array of 0..255")
        return _checked_array(value["image"], size)
    if kind == "application/x-npy":
        try:
            array = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise BadRequest(f"body is not an .npy array: {' '.join(str(e).split())[:160]}") from None
        return _checked_array(array, size)
    try:
        image = read_image(io.BytesIO(body), size)  # 3×H×W uint8
    except UNREADABLE as e:
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise BadRequest(f"body is not an image ({reason}); POST a PNG/JPEG file, or JSON/.npy arrays "
                         f"of {h}×{w}×3") from None
    return image.permute(1, 2, 0).numpy()  # 3×H×W -> H×W×3


def _checked_array(value: Any, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    try:
        array = np.asarray(value)
    except ValueError as e:  # ragged nested lists
        raise BadRequest(f"image is not a rectangular array: {' '.join(str(e).split())[:120]}") from None
    if array.shape != (h, w, 3):
        raise BadRequest(f"image of shape {array.shape}: this model takes {h}×{w}×3 (height, width, RGB)")
    if array.dtype.kind not in "iu" and not (array.dtype.kind == "f" and np.array_equal(array, np.round(array))):
        raise BadRequest(f"image of dtype {array.dtype}: need integers 0..255")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise BadRequest(f"image values {array.min()}..{array.max()}: need 0..255")
    return array.astype(np.uint8)


def load_predictor(source: dict[str, str], device: str) -> Predictor:
    """The predictor of ``{"checkpoint": path}`` or ``{"model_uri": "models:/name/version"}``."""
    from impactx_ray.devices import resolve_device

    if "checkpoint" in source:
        return Predictor.from_checkpoint(source["checkpoint"], device=resolve_device(device))
    import mlflow

    model = mlflow.pyfunc.load_model(source["model_uri"]).unwrap_python_model()
    return model.predictor.to(resolve_device(device))


@serve.deployment(name="impactx", graceful_shutdown_timeout_s=5)  # a prediction takes milliseconds
class ImpactxDeployment:
    def __init__(self, source: dict[str, str], device: str = "auto", max_batch_size: int = 32,
                 batch_wait_s: float = 0.01) -> None:
        self.predictor = load_predictor(source, device)
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def predict_batch(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        pred = self.predictor.predict(np.stack(images))  # N×H×W×3
        return [pred.answer(i) for i in range(len(images))]

    async def __call__(self, request: Request) -> JSONResponse:
        p = self.predictor
        if request.method == "GET":
            return JSONResponse({"method": p.method, "classes": p.classes, "image_size": list(p.image_size)})
        try:
            image = decode(await request.body(), request.headers.get("content-type", ""), p.image_size)
        except (BadRequest, UserError) as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse(await self.predict_batch(image))
