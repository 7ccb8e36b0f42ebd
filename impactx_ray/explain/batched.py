"""shap's Partition explainer, run for many images in lockstep: same maps, far less overhead.

``shap.PartitionExplainer`` explains one image at a time and spends most of its time outside the
model: building each mask from a scipy sparse row, masking one image per Python call, and NumPy
scalar work per queue node (docs/map-engine.md, "Where the time goes"). This module replays shap's
``PartitionExplainer.owen`` (the method ``explain_row`` calls; ``fixed_context=None``) exactly:

* the partition tree is ``shap.maskers.Image(masker, shape=(H, W, C)).clustering``;
* every image keeps its own priority queue, keyed ``(priority, tie-breaker)`` like shap's, and pops
  up to ``batch_size`` masks per step under the same ``max_evals - 2`` budget, so it expands the
  same nodes in the same order with the same weights;
* shap's tie-breaker is ``np.random.randn()`` from the global generator, drawn four times per
  expanded node in a fixed order. The caller seeds it per image (``np.random.seed(seed)``), so each
  image here owns a ``RandomState(seed)`` and draws the same numbers in the same order;
* the values are accumulated in float64 with the same operations in the same order, and credit is
  lowered to the leaves as shap's ``lower_credit`` does (vectorised over images, level by level).

What changes is only *how* the work is done: every evaluated mask is its context mask OR the
node's own mask (every node of shap's image tree is an axis-aligned box of the H x W x C feature
grid). A CPU keeps each mask as its lineage (context row, node) and builds the masked images of a
chunk in one numba pass (``masking.py``); a GPU keeps each mask as a bool row of the image's mask
arena and builds masks and masked images in PyTorch passes; all masked images go through the
model in chunks of ``forward_batch``;
the per-node queue work is compiled by numba (``owen.py``, parallel over images), not Python over
NumPy scalars.

Only ``blur(kx,ky)`` maskers are supported: the blurred image is computed once per image with
``cv2.blur`` exactly as shap's masker does, so masked inputs are bit-identical to shap's. Maps then
equal shap's up to the model's own floating-point rounding across batch sizes (some CPU kernels
round a batch of 1 or 8 differently from a batch of 100, and shap evaluates f(x) and f(blurred x)
one image at a time): <= 4e-7 of the map's scale for LeNet-5 in float32, bit-identical in float64.

Plain NumPy/PyTorch (+ shap's tree, cv2's blur); no Ray, no MLflow.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import shap
import torch
from tqdm import tqdm

from impactx_ray.defaults import MASK_BYTES
from impactx_ray.explain import masking
from impactx_ray.explain.lockstep import LockstepGroup, Pending, run_groups

GPU_MASK_FRACTION = 0.25  # of a GPU's free memory: the rest is the forward's (4096 images per call)


def mask_budget(device: torch.device) -> int:
    """Bytes the images in lockstep may take on ``device`` (the worker's, where the engine runs):
    on a CPU MASK_BYTES; on a GPU a quarter of its free memory, and never less than MASK_BYTES
    (the driver checks --max-evals against that floor). On a GPU the mask arena is what takes it:
    an 80 GiB GPU with 78 GiB free holds 3,406 images at 32×32×3 with 2000 evaluations in
    lockstep; a CPU keeps lineages and queues (:meth:`BatchedPartition.bytes_per_image`), 1,483."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(MASK_BYTES, int(free * GPU_MASK_FRACTION))
    return MASK_BYTES


def auto_forward_batch(device: torch.device) -> int:
    """Masked images per model call when not given: 4096 on a GPU, 512 on a CPU (where a large
    call probes the model's fastest size instead: ``ModelForward.probe_chunk``).

    Measured on CPU (LeNet-5, 32x32, 1 thread): 27-30k images/s for calls of 64-512 images, 18-20k
    at 4096, whose activations no longer fit the caches.
    """
    return 4096 if device.type == "cuda" else 512


#: A forward function: masked images N x H x W x C (a tensor on the model's device) -> N x K logits.
Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PartitionTree:
    """shap's image partition tree as flat arrays over its 2M-1 node ids (leaves are 0..M-1).

    A leaf id is the flat (H, W, C) index of its feature, exactly as shap's masks index features.
    """

    hwc: tuple[int, int, int]
    m: int  # number of features, H*W*C
    left: np.ndarray  # (2M-1,) int64, -1 for leaves
    right: np.ndarray  # (2M-1,) int64, -1 for leaves
    expand: np.ndarray  # (2M-1,) bool: split when popped (shap: id >= M and distance >= 0)
    size: np.ndarray  # (2M-1,) int64: features under the node
    box: np.ndarray  # (2M-1, 6) int64: h0, h1, w0, w1, c0, c1 (half-open) of the node's features
    levels: tuple[np.ndarray, ...]  # internal node ids by depth from the root, for lower_credit

    @property
    def root(self) -> int:
        return 2 * self.m - 2


@functools.lru_cache(maxsize=8)
def partition_tree(hwc: tuple[int, int, int]) -> PartitionTree:
    """The tree shap's Image masker builds for images of shape ``hwc`` (the masker string does not
    change it), with each node's box; asserts that every node really is a full box."""
    h, w, c = hwc
    clustering = shap.maskers.Image("blur(1,1)", shape=hwc).clustering  # (M-1) x 4: left, right, dist, size
    m = h * w * c
    n = 2 * m - 1
    left = np.full(n, -1, dtype=np.int64)
    right = np.full(n, -1, dtype=np.int64)
    left[m:] = clustering[:, 0].astype(np.int64)
    right[m:] = clustering[:, 1].astype(np.int64)
    expand = np.zeros(n, dtype=bool)
    expand[m:] = clustering[:, 2] >= 0
    size = np.ones(n, dtype=np.int64)
    size[m:] = clustering[:, 3].astype(np.int64)

    levels, frontier = [], np.array([n - 1])  # the root is node 2M-2
    while len(frontier):
        frontier = frontier[frontier >= m]
        if len(frontier):
            levels.append(frontier)
        frontier = np.concatenate([left[frontier], right[frontier]])

    box = np.empty((n, 6), dtype=np.int64)
    hh, ww, cc = np.unravel_index(np.arange(m), (h, w, c))  # leaf j is flat feature j
    box[:m] = np.stack([hh, hh + 1, ww, ww + 1, cc, cc + 1], axis=1)
    for p in reversed(levels):  # bottom-up: a node's box bounds its children's
        lb, rb = box[left[p]], box[right[p]]  # (k, 6) each
        box[p, 0::2] = np.minimum(lb[:, 0::2], rb[:, 0::2])
        box[p, 1::2] = np.maximum(lb[:, 1::2], rb[:, 1::2])
    extent = box[:, 1::2] - box[:, 0::2]  # (2M-1, 3)
    if not np.array_equal(extent.prod(axis=1), size):
        raise AssertionError("shap's image partition tree has a node that is not a box; update batched.py")
    return PartitionTree((h, w, c), m, left, right, expand, size, box, tuple(levels))


def blur_kernel(masker: str) -> tuple[int, int]:
    """``(kx, ky)`` of a ``blur(kx,ky)`` masker string, parsed as shap parses it."""
    return tuple(map(int, masker[5:-1].split(",")))  # type: ignore[return-value]


def blurred(images_hwc: np.ndarray, masker: str) -> np.ndarray:
    """Each image's fully masked version, computed exactly as shap's Image masker computes it."""
    kernel = blur_kernel(masker)
    out = np.empty_like(images_hwc)
    for i, x in enumerate(images_hwc):
        out[i] = cv2.blur(np.ascontiguousarray(x), kernel).reshape(x.shape)  # cv2 drops a C=1 axis
    return out


def lower_credit(dvalues: np.ndarray, tree: PartitionTree) -> np.ndarray:
    """shap's ``lower_credit`` from the root for a batch of N x (2M-1) node values -> N x M.

    Each node passes its value times (child size / own size) to each child, top-down; the same
    float64 operations in the same order as shap's numba recursion, one tree level at a time.
    """
    v = dvalues.copy()
    for p in tree.levels:
        for child in (tree.left[p], tree.right[p]):
            v[:, child] += v[:, p] * tree.size[child] / tree.size[p]
    return v[:, : tree.m]


class NodeMasks:
    """Dense boolean masks (k x M) of tree nodes, on the device where masking happens.

    A lookup table of all 2M-1 masks when it fits ``max_table_bytes`` (32x32x3: 19 MB; one row
    gather per mask), else each mask is built from the node's box by broadcasting (96x96x3 would
    need a 1.5 GB table; the broadcast is slow on CPU, fine on a GPU).
    """

    def __init__(self, tree: PartitionTree, device: torch.device, max_table_bytes: int = 1 << 26) -> None:
        self.hwc, self.box = tree.hwc, torch.as_tensor(tree.box, device=device)  # (2M-1, 6)
        self.ar = [torch.arange(s, device=device) for s in tree.hwc]
        self.table = None
        n = len(tree.box)
        if n * tree.m <= max_table_bytes:
            nodes = torch.arange(n, device=device)
            self.table = torch.cat([self._build(nodes[a : a + 4096]) for a in range(0, n, 4096)])  # (2M-1) x M

    def _build(self, nodes: torch.Tensor) -> torch.Tensor:
        b, (ah, aw, ac) = self.box[nodes], self.ar  # (k, 6)
        in_h = (ah >= b[:, 0:1]) & (ah < b[:, 1:2])  # k x H
        in_w = (aw >= b[:, 2:3]) & (aw < b[:, 3:4])  # k x W
        in_c = (ac >= b[:, 4:5]) & (ac < b[:, 5:6])  # k x C
        box = in_h[:, :, None, None] & in_w[:, None, :, None] & in_c[:, None, None, :]  # k x H x W x C
        return box.reshape(len(nodes), -1)  # k x M

    def __call__(self, nodes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The masks of ``nodes`` (k x M), written into ``out`` when given."""
        if self.table is not None:
            return torch.index_select(self.table, 0, nodes, out=out)
        masks = self._build(nodes)
        return masks if out is None else out.copy_(masks)


class BatchedPartition:
    """shap's Partition explainer (blur masker, ``fixed_context=None``) for many images at once.

    ``forward`` maps masked images N x H x W x C (on ``device``) to N x K logits; the map explains
    logit ``label`` of each image. ``forward_seconds``/``forward_images`` accumulate the time spent
    in (and the images through) ``forward``, for benchmarks.
    """

    def __init__(
        self,
        forward: Forward,
        hwc: tuple[int, int, int],
        *,
        masker: str,
        max_evals: int,
        batch_size: int,
        seed: int = 0,
        forward_batch: int | None = None,
        device: torch.device | str = "cpu",
        max_mask_bytes: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        max_mask_bytes = mask_budget(self.device) if max_mask_bytes is None else max_mask_bytes
        self.forward_batch = auto_forward_batch(self.device) if forward_batch is None else int(forward_batch)
        if self.forward_batch < 1:
            raise ValueError(f"forward_batch must be >= 1, got {forward_batch}")
        self.forward, self.masker, self.tree = forward, masker, partition_tree(tuple(hwc))
        self.max_evals, self.batch_size, self.seed = int(max_evals), int(batch_size), int(seed)
        # Every evaluated mask may become a context later: one row per evaluation and image (a
        # lineage row on a CPU, an arena row on a GPU), row 0 the empty mask.
        self.rows = max(self.max_evals, 2) + 1
        self.forward_seconds, self.forward_images = 0.0, 0
        # A CPU builds the masked images from the masks' lineages in one numba pass (masking.py);
        # a GPU builds masks and masked images in PyTorch passes on the device, from node masks
        # made there on first use.
        self.host_masking = self.device.type == "cpu"
        self.images_in_flight = max(1, max_mask_bytes // self.bytes_per_image())
        self.node_masks: NodeMasks | None = None
        self._arena_cache: torch.Tensor | None = None
        self._lineage_cache: torch.Tensor | None = None
        self._masked_cache: torch.Tensor | None = None  # forward_batch x H x W x C
        self._mask_cache: torch.Tensor | None = None  # 2 x forward_batch x M, for _fill_on_device

    def explain(self, images_hwc: np.ndarray, labels: np.ndarray, progress: bool = False) -> np.ndarray:
        """Maps N x H x W x C (float32) of logit ``labels[i]`` of each image N x H x W x C."""
        n = len(images_hwc)
        out = np.empty((n, *self.tree.hwc), dtype=np.float32)
        with tqdm(total=n, unit="map", desc="SHAP maps", disable=not progress, dynamic_ncols=True) as bar:
            for a in range(0, n, self.images_in_flight):
                b = min(n, a + self.images_in_flight)
                out[a:b] = self._explain_group(images_hwc[a:b], np.asarray(labels[a:b]))
                bar.update(b - a)
        return out

    def _logits(self, x_nhwc: torch.Tensor, labels: torch.Tensor) -> list[float]:
        """``forward`` on one chunk; each row's logit ``labels[row]`` as Python floats (float64,
        as shap's MaskedModel converts the model's float32 outputs)."""
        start = time.perf_counter()
        picked = self._pick(x_nhwc, labels).cpu()  # syncs a GPU
        self.forward_seconds += time.perf_counter() - start
        return picked.tolist()

    def _pick(self, x_nhwc: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``forward`` on one chunk and each row's logit ``labels[row]``, left on the device (no sync)."""
        out = self.forward(x_nhwc)
        self.forward_images += len(x_nhwc)
        return out[torch.arange(len(out), device=out.device), labels]

    def _explain_group(self, images_hwc: np.ndarray, labels: np.ndarray) -> np.ndarray:
        tree, dev, n = self.tree, self.device, len(images_hwc)
        h, w, c = tree.hwc
        x = torch.as_tensor(np.ascontiguousarray(images_hwc), device=dev)  # n x H x W x C
        xb = torch.as_tensor(blurred(images_hwc, self.masker), device=dev)  # n x H x W x C
        y = torch.as_tensor(labels, dtype=torch.int64, device=dev)
        arena = self._lineage(n) if self.host_masking else self._arena(n)
        bounds = np.linspace(0, n, self.groups(n) + 1).astype(int)
        groups = [LockstepGroup(self, x[a:b], xb[a:b], y[a:b], arena[a:b]) for a, b in zip(bounds, bounds[1:])]
        run_groups(groups)
        dvalues = np.concatenate([g.dvalues for g in groups])  # n x (2M-1)
        return lower_credit(dvalues, tree).reshape(n, h, w, c).astype(np.float32)

    def bytes_per_image(self) -> int:
        """Memory one image in lockstep takes: on a GPU its bool mask arena (rows x M); on a CPU its
        lineage (2 int64 a row), shap's queue (8 numbers of 8 bytes a slot, 2 slots a row), its
        node values (float64) and the image and its blurred version."""
        m = self.tree.m
        if not self.host_masking:
            return self.rows * m
        return self.rows * 16 + self.rows * 2 * 64 + (2 * m - 1) * 8 + 2 * m * 4

    def groups(self, n: int) -> int:
        """Groups the ``n`` images in flight step in (:mod:`lockstep`): two on a GPU, when each
        group's step still fills a forward call (``batch_size`` masks per image and step), so one
        group's host work hides behind the other's forwards; one on a CPU, where host and forward
        share the cores."""
        fills_two_calls = n * self.batch_size >= 2 * self.forward_batch
        return 2 if self.device.type == "cuda" and fills_two_calls else 1

    def _arena(self, n: int) -> torch.Tensor:
        """n x rows x M context masks, reused across calls (fresh memory costs a page fault per
        4 KiB: ~2 ms per 32x32 map). Row 0 is the empty mask, row r > 0 the image's r-th
        evaluated mask; each row is written before any queued node can refer to it."""
        if self._arena_cache is None or len(self._arena_cache) < n:
            self._arena_cache = None  # free the old one first
            self._arena_cache = torch.empty((n, self.rows, self.tree.m), dtype=torch.bool, device=self.device)
        arena = self._arena_cache[:n]
        arena[:, 0] = False
        return arena

    def _lineage(self, n: int) -> torch.Tensor:
        """n x rows x 2 int64 (context row, added node) of every evaluated mask, reused across
        calls (:mod:`masking`). Row 0 of every image is the empty mask (node -1); each other row is
        written before any queued node can refer to it."""
        if self._lineage_cache is None or len(self._lineage_cache) < n:
            self._lineage_cache = torch.empty((n, self.rows, 2), dtype=torch.int64)
        lineage = self._lineage_cache[:n]
        lineage[:, 0] = -1
        return lineage

    def _masked_buffer(self, dtype: torch.dtype) -> torch.Tensor:
        """``forward_batch`` x H x W x C masked images, kept across chunks and steps: a fresh
        tensor per chunk cost page faults and malloc traffic that slowed the forward beside it."""
        cache = self._masked_cache
        if cache is None or cache.dtype != dtype or len(cache) != self.forward_batch:
            self._masked_cache = torch.empty((self.forward_batch, *self.tree.hwc), dtype=dtype, device=self.device)
        return self._masked_cache

    def _evaluate(self, x, xb, y, arena, img, ctx, node, row) -> Pending:
        """Build the masks ``mask(img, ctx) | node_mask(node)``, store them as row ``row`` of their
        image, and return the label logit of each blur-masked image, ``forward_batch`` images per
        call. ``arena`` is the images' masks: on a CPU their lineages (n x rows x 2), on a GPU
        their arena (n x rows x M bool).

        On a CPU one numba pass per chunk stores the lineages and builds the masked images
        (``masking.py``). On a GPU
        the step's indices go over in one copy, each chunk's masking is a few whole-chunk kernels
        (:meth:`_fill_on_device`) queued beside the forwards, and the step's logits come back in
        one copy that nobody waits for here (:class:`lockstep.Pending`): the host never syncs
        per chunk, and does other work while the GPU runs. ``forward_seconds`` then counts the
        time the host spends queueing the step and waiting for its logits.
        """
        fb, rows = self.forward_batch, arena.shape[1]
        src, dst = img * rows + ctx, img * rows + row  # context rows and new rows in the flat arena
        masked_buf = self._masked_buffer(x.dtype)  # fb x H x W x C
        if not self.host_masking:
            start = time.perf_counter()
            idx = self._to_device(np.stack([src, node, dst, img]))  # 4 x K
            y_img = y[idx[3]]  # each mask's label
            picked = []
            for a in range(0, len(img), fb):
                k = min(fb, len(img) - a)
                self._fill_on_device(arena, x, xb, *idx[:, a : a + k], masked_buf[:k])
                picked.append(self._pick(masked_buf[:k], y_img[a : a + k]))
            pending = Pending(torch.cat(picked))  # the step's K logits, copied back when ready
            self.forward_seconds += time.perf_counter() - start
            return pending
        flat, x_np, xb_np = arena.view(-1, 2).numpy(), x.numpy(), xb.numpy()  # (n * rows) x 2
        y_img = y[torch.from_numpy(img)]  # each mask's label
        picked = []
        for a in range(0, len(img), fb):
            k = min(fb, len(img) - a)
            part = slice(a, a + k)
            masking.fill_masked_rows(flat, self.tree.box, src[part], node[part], dst[part], img[part],
                                     x_np, xb_np, masked_buf[:k].numpy())
            start = time.perf_counter()
            picked.append(self._pick(masked_buf[:k], y_img[part]))
            self.forward_seconds += time.perf_counter() - start
        return Pending(torch.cat(picked))

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        """``a`` on the device, without waiting for it: on CUDA a copy from pageable memory waits
        for all the work queued on the stream (the other lockstep group's step, :mod:`lockstep`),
        one from pinned memory does not (torch's pinned-memory cache keeps the block until the copy
        has run)."""
        t = torch.from_numpy(a)
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _fill_on_device(self, arena, x, xb, src, node, dst, img, masked) -> None:
        """:func:`masking.fill_masked`'s work in whole-chunk PyTorch kernels on the device: no
        per-image loop, as a chunk on a GPU spans hundreds of images (a kernel launch each would
        outlast LeNet-5's forward). ``src``, ``node``, ``dst``, ``img`` are index tensors on the
        device, one entry per mask.
        """
        dev, (h, w, c), k = self.device, self.tree.hwc, len(img)
        if self.node_masks is None:
            self.node_masks = NodeMasks(self.tree, dev)
        if self._mask_cache is None or self._mask_cache.shape[1] != self.forward_batch:
            self._mask_cache = torch.empty((2, self.forward_batch, self.tree.m), dtype=torch.bool, device=dev)
        mask, node_mask = self._mask_cache[0, :k], self._mask_cache[1, :k]  # k x M each
        flat = arena.view(-1, self.tree.m)  # (n * rows) x M
        torch.index_select(flat, 0, src, out=mask)
        mask |= self.node_masks(node, out=node_mask)
        flat.index_copy_(0, dst, mask)  # the new arena rows
        # shap: out = x.copy(); out[~mask] = blurred[~mask], on the flattened H*W*C image
        torch.index_select(xb, 0, img, out=masked)  # k x H x W x C, each mask's blurred image
        torch.where(mask.view(k, h, w, c), x.index_select(0, img), masked, out=masked)
