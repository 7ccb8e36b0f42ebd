"""R: SHAP Partition attribution maps for the *true* class of each image.

Why it looks the way it does (facts measured with shap 0.51, docs/map-engine.md):

* ``outputs=`` applies one output index to every row of an explainer call, so the true class is
  explained with one call per image (``outputs=[y_i]``); ``argsort.flip[:1]`` would explain the
  predicted class instead.
* The blur masker caches the blurred image keyed on ``id()`` of a temporary array, which can be
  reused by the next image; ``last_xid`` is reset before every image.
* shap breaks ties in its priority queue with ``np.random.randn()``, so a map depends on the
  global NumPy random state. Each image is explained under ``np.random.seed(seed)`` (the caller's
  global state is saved and restored), so a map depends only on (model, image, label, settings),
  never on its position in a batch, shard or worker.
* ``inpaint_*`` maskers cast every masked image to uint8, which silently destroys float inputs
  (normalised images); they are rejected. ``blur(kx,ky)`` works on floats and is ~25x cheaper.

Two engines compute the same maps. ``"batched"`` (the default, :mod:`impactx_ray.explain.batched`)
replays shap's Partition recursion for many images in lockstep under the same per-image seeding
and sends all their masked images through the model in large batches: shap's maps to
floating-point precision, 2.5-2.8x faster for LeNet-5 on one CPU thread (the model forward is then
~80% of the time; benchmarks/shap_engine.py). ``"shap"`` calls ``shap.PartitionExplainer`` one
image at a time and stays the reference. With the batched engine a map can depend on its batch
only through the model's float rounding (some kernels round a batch of 8 differently from one of
512); a given batch (a store shard) always gives the same bits.

This module is plain PyTorch/NumPy + shap: no Ray, no MLflow.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import shap
import torch
from tqdm import tqdm

from impactx_ray.defaults import MAX_EVALS, MIN_MAX_EVALS, SHAP_BATCH_SIZE
from impactx_ray.errors import UserError, is_int
from impactx_ray.explain.batched import BatchedPartition, auto_forward_batch
from impactx_ray.explain.forward import AUTO_COMPILE_MIN_IMAGES, DEFAULT_COMPILE, DEFAULT_PRECISION, ModelForward

#: ``"batched"``: shap's recursion for many images at once (the default); ``"shap"``: shap itself.
ENGINES = ("batched", "shap")
DEFAULT_ENGINE = "batched"
_BLUR_RE = re.compile(r"^blur\(\s*(\d+)\s*,\s*(\d+)\s*\)$")


def default_masker(height: int, width: int) -> str:
    """The default masker: a box blur a quarter of the image wide (``blur(8,8)`` at 32x32).

    shap passes the kernel to ``cv2.blur``, whose ``ksize`` is (width, height).
    """
    return f"blur({max(1, width // 4)},{max(1, height // 4)})"


def validate_masker(masker: str) -> str:
    """Return ``masker`` if it is a ``blur(kx,ky)`` string shap accepts, else raise UserError."""
    if not isinstance(masker, str):
        raise UserError(f"masker {masker!r} is not a string; use a blur like 'blur(8,8)'")
    if masker.startswith("inpaint"):
        raise UserError(
            f"masker {masker!r} is not supported: shap's inpainting casts images to uint8 and "
            "would destroy float model inputs; use a blur like 'blur(8,8)'"
        )
    m = _BLUR_RE.match(masker)
    if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise UserError(f"unknown masker {masker!r}; use 'blur(kx,ky)' with positive integers, e.g. 'blur(8,8)'")
    return masker


def _image_masker(masker: str, hwc: tuple[int, int, int]) -> shap.maskers.Image:
    return shap.maskers.Image(masker, shape=hwc)


def fully_masked(images: torch.Tensor, masker: str | None = None) -> torch.Tensor:
    """Each image with every feature hidden, computed by shap's own masker (all-False mask).

    For blur this is the blurred image: the baseline f00 of the Owen recursion, so that
    ``map.sum() == f(x)[y] - f(fully_masked(x))[y]`` (the efficiency property).
    """
    check_images(images)
    n, c, h, w = images.shape
    masker = validate_masker(masker or default_masker(h, w))
    m = _image_masker(masker, (h, w, c))
    hwc = to_hwc(images)
    out = np.empty_like(hwc)
    for i in range(n):
        m.last_xid = None
        out[i] = m(np.zeros(h * w * c, dtype=bool), hwc[i])[0][0]
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(dtype=images.dtype, device=images.device)


@contextmanager
def _seeded_numpy(seed: int) -> Iterator[None]:
    """Seed NumPy's global generator (shap's tie-breaker) and restore the caller's state after."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


@contextmanager
def torch_threads_ctx(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None: leave as is), then restore the count.

    Measured here (LeNet-5, 32x32, 2000 evals, 2 cores shared with other jobs): 1 thread gave
    4.2-5.2 maps/s whatever the load; torch's default 2 threads 5.4 maps/s while a core was idle
    but 0.4-0.5 maps/s when the cores were oversubscribed. shap's loop is sequential Python and a
    small net's forward pass is a fraction of it, so intra-op threads buy little and collapse
    under contention; parallelise over images (Ray actors) instead. The count is process-wide:
    other threads using torch meanwhile see it too.
    """
    before = torch.get_num_threads()
    if n is not None:
        if not is_int(n, 1):
            raise UserError(f"torch_threads={n!r} is invalid; use an int >= 1, or None to keep torch's setting")
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(before)


@contextmanager
def in_eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode for the block, then restore every submodule's own training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        what = f"dtype {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise UserError(f"images must be a float torch tensor N x C x H x W, got {what}")
    if images.dim() != 4:
        raise UserError(f"images must be 4-D (N x C x H x W), got shape {tuple(images.shape)}")


def to_hwc(images: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(images.detach().cpu().permute(0, 2, 3, 1).numpy())


def labels_array(labels: torch.Tensor | np.ndarray | Sequence[int], n: int) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1 or len(arr) != n:
        raise UserError(f"labels must be a 1-D sequence of {n} ints (one per image), got shape {arr.shape}")
    if n and not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def check_max_evals(max_evals: object) -> None:
    """UserError unless ``max_evals`` is an int >= MIN_MAX_EVALS (defaults.py says why)."""
    if not is_int(max_evals, MIN_MAX_EVALS):
        raise UserError(f"max_evals={max_evals!r} is invalid; use an int >= {MIN_MAX_EVALS} "
                        f"(the paper uses {MAX_EVALS})")


def _check_positive_int(name: str, value: object, hint: str) -> None:
    if not is_int(value, 1):
        raise UserError(f"{name}={value!r} is invalid; use an int >= 1 ({hint})")


def check_engine(engine: str) -> str:
    """Return ``engine`` if it is one of :data:`ENGINES`, else raise UserError."""
    if engine not in ENGINES:
        raise UserError(f"engine={engine!r} is unknown; use one of {', '.join(map(repr, ENGINES))}")
    return engine


class TrueClassExplainer:
    """Partition maps of the true class, bound to one model, image shape and setting.

    Building it costs the partition tree once; ``explain(x_hwc, y)`` gives one map and
    ``explain_many(x_hwc, labels)`` a batch (the batched engine runs the whole batch in lockstep).
    Used by :func:`explain_true_class`, :func:`explain_batch` and the map store. ``engine``
    defaults to ``"batched"``, as everywhere; what records the engine in a store's meta passes it
    explicitly (``ExplainSettings.explainer_kwargs``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        image_shape: tuple[int, int, int],
        *,
        max_evals: int = MAX_EVALS,
        masker: str | None = None,
        batch_size: int = SHAP_BATCH_SIZE,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        engine: str = DEFAULT_ENGINE,
        forward_batch: int | None = None,
        precision: str = DEFAULT_PRECISION,
        compile: str = DEFAULT_COMPILE,
        channels_last: bool | None = None,
    ) -> None:
        c, h, w = image_shape
        self.masker = validate_masker(masker or default_masker(h, w))
        check_max_evals(max_evals)
        _check_positive_int("batch_size", batch_size, f"default {SHAP_BATCH_SIZE}")
        if forward_batch is not None:
            _check_positive_int("forward_batch", forward_batch, "or None: 512 on CPU, 4096 on CUDA")
        self.engine = check_engine(engine)
        self.model, self.max_evals, self.batch_size, self.seed = model, int(max_evals), int(batch_size), seed
        self.device, self.dtype = _model_device(model), dtype
        # No forward_batch given: on a CPU a large call (a store shard) probes the fastest chunk
        # (ModelForward.probe_chunk); smaller calls, and CUDA's static graphs, use the default.
        self.probe_forward_batch = forward_batch is None and self.device.type == "cpu"
        self.forward_rates: dict[int, float] = {}  # what the probe measured, images/s per chunk size
        if forward_batch is None:
            forward_batch = auto_forward_batch(self.device)
        # Both engines call the model through it (precision, layout); only the batched one compiles.
        self.model_forward = ModelForward(model, self.device, dtype=dtype, precision=precision, compile=compile,
                                          chunk=forward_batch, channels_last=channels_last)
        if self.engine == "shap":
            self.image_masker = _image_masker(self.masker, (h, w, c))
            self.explainer = shap.PartitionExplainer(self.predict, self.image_masker)
        else:
            self.batched = BatchedPartition(
                self.forward, (h, w, c), masker=self.masker, max_evals=self.max_evals,
                batch_size=self.batch_size, seed=seed, forward_batch=forward_batch, device=self.device,
            )

    def forward(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        """The batched engine's model call: N x H x W x C tensor on the model's device -> N x K.

        The same channels-last view of the same values as :meth:`predict` hands the model.
        """
        with torch.no_grad():
            return self.model_forward(x_nhwc)

    def predict(self, x_hwc: np.ndarray) -> np.ndarray:
        """The wrapped function shap calls: N x H x W x C numpy -> N x K numpy logits."""
        x = torch.from_numpy(np.ascontiguousarray(x_hwc)).to(device=self.device)
        with torch.no_grad():
            return self.model_forward.eager(x).detach().cpu().numpy()

    def check_labels(self, x_hwc: np.ndarray, labels: np.ndarray) -> None:
        """Raise UserError unless the model returns N x K logits and every label is in 0..K-1."""
        if len(labels) == 0:
            return
        out = self.predict(x_hwc[:1])
        if out.ndim != 2 or out.shape[0] != 1:
            raise UserError(f"the model must return N x K logits, got shape {out.shape} for one image")
        k = int(out.shape[1])
        bad = labels[(labels < 0) | (labels >= k)]
        if len(bad):
            raise UserError(
                f"label {int(bad[0])} is out of range for a model with {k} classes; use labels in 0..{k - 1}"
            )

    def explain(self, x_hwc: np.ndarray, label: int) -> np.ndarray:
        """The H x W x C map of the logit ``label`` for one H x W x C image."""
        if self.engine == "batched":
            return self.explain_many(x_hwc[None], np.array([label]))[0]
        self.image_masker.last_xid = None  # the blur cache is keyed on id() of a temporary
        with _seeded_numpy(self.seed):
            expl = self.explainer(
                x_hwc[None],
                max_evals=self.max_evals,
                batch_size=self.batch_size,
                outputs=[int(label)],
                silent=True,
            )
        return np.asarray(expl.values[0, ..., 0], dtype=np.float32)

    def explain_many(self, x_hwc: np.ndarray, labels: np.ndarray, progress: bool = False) -> np.ndarray:
        """N x H x W x C float32 maps of logit ``labels[i]`` for N x H x W x C images.

        Each map depends only on its own image and label (never on the batch): the same as
        ``explain(x_hwc[i], labels[i])``.
        """
        labels = np.asarray(labels, dtype=np.int64)
        if self.engine == "batched":
            images = len(x_hwc) * self.max_evals
            self.model_forward.select(images)  # compile where it pays
            if self.probe_forward_batch and images >= AUTO_COMPILE_MIN_IMAGES:
                self.probe_forward_batch = False  # once per explainer: a map worker keeps it for every shard
                self.forward_rates = self.model_forward.probe_chunk(self.batched.tree.hwc)
                self.batched.forward_batch = self.model_forward.chunk
            with torch.no_grad():
                return self.batched.explain(x_hwc, labels, progress=progress)
        maps = np.zeros(x_hwc.shape, dtype=np.float32)
        for i in tqdm(range(len(x_hwc)), unit="map", desc="SHAP maps", disable=not progress, dynamic_ncols=True):
            maps[i] = self.explain(x_hwc[i], int(labels[i]))
        return maps


def explain_true_class(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    *,
    max_evals: int = MAX_EVALS,
    masker: str | None = None,
    batch_size: int = SHAP_BATCH_SIZE,
    progress: bool = True,
    seed: int = 0,
    torch_threads: int | None = None,
    engine: str = DEFAULT_ENGINE,
    forward_batch: int | None = None,
    precision: str = DEFAULT_PRECISION,
    compile: str = DEFAULT_COMPILE,
) -> np.ndarray:
    """SHAP Partition maps of each image's true-class logit, float32 N x H x W x C.

    ``images`` is N x C x H x W exactly as ``model`` takes it; the maps are in shap's own layout
    (``.values[..., 0]``). The model runs in eval mode under ``torch.no_grad()``; its training
    flag is restored afterwards. ``seed`` seeds shap's random tie-breaking per image.
    ``torch_threads`` torch threads are used during the call (see :func:`torch_threads_ctx`); None
    keeps torch's setting (all cores): the batched engine is bound by the model forward, which
    uses them. Pass 1 for the shap engine on a busy machine, or one Ray worker per core.
    ``engine`` is ``"batched"`` (default: all images in lockstep, ``forward_batch`` masked images
    per model call) or ``"shap"`` (shap's explainer image by image, the reference); both give the
    same maps. ``forward_batch=None`` lets
    the engine choose (512 on CPU, 4096 on CUDA; see :func:`~impactx_ray.explain.batched.auto_forward_batch`).
    ``precision`` (fp32, bf16, fp16) and ``compile`` (auto, on, off): see :mod:`impactx_ray.explain.forward`.
    """
    check_images(images)
    n, c, h, w = images.shape
    y = labels_array(labels, n)
    ex = TrueClassExplainer(
        model, (c, h, w), max_evals=max_evals, masker=masker, batch_size=batch_size, dtype=images.dtype, seed=seed,
        engine=engine, forward_batch=forward_batch, precision=precision, compile=compile,
    )
    if n == 0:
        return np.zeros((n, h, w, c), dtype=np.float32)
    hwc = to_hwc(images)
    with in_eval_mode(model), torch_threads_ctx(torch_threads):
        ex.check_labels(hwc, y)
        return ex.explain_many(hwc, y, progress=progress)


def explain_batch(
    model: torch.nn.Module,
    images_hwc: np.ndarray,
    labels: np.ndarray | Sequence[int],
    *,
    max_evals: int = MAX_EVALS,
    masker: str | None = None,
    batch_size: int = SHAP_BATCH_SIZE,
    seed: int = 0,
    forward_batch: int | None = None,
    engine: str = DEFAULT_ENGINE,
    progress: bool = False,
    precision: str = DEFAULT_PRECISION,
    compile: str = DEFAULT_COMPILE,
) -> np.ndarray:
    """Maps N x H x W x C float32 of the true class for a whole shard of N x H x W x C images.

    For the map store and the Ray workers, whose images are already channels-last NumPy. The
    model runs in eval mode under ``torch.no_grad()`` (its training flag is restored) with the
    caller's torch threads; labels are checked against the model's class count.
    """
    x = np.ascontiguousarray(images_hwc)
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"images_hwc must be a float N x H x W x C array, got {x.dtype} {x.shape}")
    n, h, w, c = x.shape
    y = labels_array(labels, n)
    ex = TrueClassExplainer(
        model, (c, h, w), max_evals=max_evals, masker=masker, batch_size=batch_size,
        dtype=torch.from_numpy(x[:0]).dtype, seed=seed, engine=engine, forward_batch=forward_batch,
        precision=precision, compile=compile,
    )
    if n == 0:
        return np.zeros(x.shape, dtype=np.float32)
    with in_eval_mode(model):
        ex.check_labels(x, y)
        return ex.explain_many(x, y, progress=progress)
