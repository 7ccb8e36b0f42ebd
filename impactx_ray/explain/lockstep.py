"""Images explained in lockstep by :class:`~impactx_ray.explain.batched.BatchedPartition`: shap's
per-image queues, stepped together, one group of images at a time or two alternating.

A step of a group is host work (numba's ``select``, the step's masks, four tie-breakers per popped
node, numba's ``update``) around device work (the masks, the masked images and their forwards).
On a CPU both are the same cores, so one group runs step after step. On a GPU the device work is
queued without waiting for it (:class:`Pending`), so two groups alternate: while the GPU computes
group B's forwards, the host finishes group A's last step and queues A's next one behind B's.
The GPU then waits for Python only when the host work of a step outlasts the other group's
forwards. Each image keeps its own queue, random tie-breakers and mask rows, so which group an
image is in, and how the groups interleave, cannot change its map (docs/map-engine.md).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np
import torch

from impactx_ray.explain import owen


class Engine(Protocol):
    """What a group needs of its engine (``batched.BatchedPartition``): the tree and shap's
    settings, and the two device calls."""

    tree: Any  # batched.PartitionTree
    max_evals: int
    batch_size: int
    seed: int
    forward_seconds: float

    def _logits(self, x_nhwc: torch.Tensor, labels: torch.Tensor) -> list[float]: ...

    def _evaluate(self, x, xb, y, arena, img, ctx, node, row) -> Pending: ...


class Pending:
    """A step's label logits (one per mask, float64 as shap uses them), perhaps still being
    computed: on CUDA a pinned host copy queued behind the step's forwards, and its event."""

    def __init__(self, values: torch.Tensor) -> None:
        self.event = None
        if values.device.type == "cuda":
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = values

    def result(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy().astype(np.float64)


class LockstepGroup:
    """``n`` images (x, xb, y: n x H x W x C, n x H x W x C, n on the device; ``arena``: their
    masks, n x rows x M bool on a GPU, n x rows x 2 lineages on a CPU) stepped through shap's
    Owen recursion together.

    :meth:`launch` pops the next step's nodes and queues their masked forwards; :meth:`finish`
    waits for their logits and pushes the children. ``dvalues`` holds the credit when done.
    """

    def __init__(self, engine: Engine, x: torch.Tensor, xb: torch.Tensor, y: torch.Tensor,
                 arena: torch.Tensor) -> None:
        self.engine, self.x, self.xb, self.y, self.arena = engine, x, xb, y, arena
        tree, n = engine.tree, len(x)
        # shap evaluates f(fully masked) then f(x) before the recursion; one forward for all images.
        base = engine._logits(torch.cat([xb, x]), torch.cat([y, y]))
        self.budget = engine.max_evals - 2  # shap's explain_row passes max_evals - 2 to owen
        q = self.q = owen.new_queues(np.asarray(base[:n]), np.asarray(base[n:]), tree.root, self.budget)
        # shap seeds the global generator per image; each image owns one seeded the same way
        self.rngs = [np.random.RandomState(engine.seed) for _ in range(n)]
        self.dvalues = np.zeros((n, 2 * tree.m - 1))  # n x (2M-1), float64 as shap's
        self.tasks = np.zeros((n, max(1, -(-engine.batch_size // 2))), dtype=np.int64)  # popped slots
        self.ntasks = np.zeros(n, dtype=np.int64)
        self.queue = (q["heap"], q["size"], q["prio"], q["tie"])
        self.fields = (q["ctx"], q["f00"], q["f11"], q["node"], q["w"])
        self.active = np.arange(n)
        self.pending: Pending | None = None

    def launch(self) -> bool:
        """Pop the next step's nodes and queue their forwards; False when every image is done."""
        eng, tree, q = self.engine, self.engine.tree, self.q
        while len(self.active):
            going = owen.select(self.active, eng.batch_size, self.budget, tree.expand, self.dvalues, *self.queue,
                                q["f00"], q["f11"], q["node"], q["w"], q["evals"], self.tasks, self.ntasks)
            self.active = self.active[going]
            if self.ntasks[self.active].any():
                # Two masks per popped node, in shap's order (m10 then m01), image after image.
                masks = owen.masks_to_evaluate(self.active, self.tasks, self.ntasks, q["ctx"], q["node"],
                                               q["evals"], tree.left, tree.right)
                self.pending = eng._evaluate(self.x, self.xb, self.y, self.arena, *masks)
                return True
        return False

    def finish(self) -> None:
        """Wait for the launched step's logits and push the popped nodes' children."""
        eng, tree, q, active = self.engine, self.engine.tree, self.q, self.active
        start = time.perf_counter()
        fout = self.pending.result()
        eng.forward_seconds += time.perf_counter() - start
        self.pending = None
        ties = np.concatenate([self.rngs[i].randn(4 * self.ntasks[i]) for i in active])  # 4 per node
        owen.update(active, fout, ties, self.tasks, self.ntasks, self.dvalues, q["heap"], q["size"],
                    q["used"], q["prio"], q["tie"], *self.fields, q["evals"], tree.left, tree.right)


def run_groups(groups: list[LockstepGroup]) -> None:
    """Step every group to its end, round robin: each group's next step is queued before the host
    turns to the next group's results."""
    live = [g for g in groups if g.launch()]
    while live:
        for g in list(live):
            g.finish()
            if not g.launch():
                live.remove(g)
