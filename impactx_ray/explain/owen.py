"""shap's ``owen`` queue work for many images at once, compiled with numba (shap's own dependency).

Every image keeps its own priority queue of shap's items ``(priority, tie, ctx_row, f00, f11,
node, weight)``; a step pops each image's nodes as shap does and, once the model has given
f10/f01 for the masks of the popped nodes, pushes their children. The arithmetic is shap's,
operation for operation, in float64 (numba compiles without fast-math or FMA contraction), and
pops come in the order of the unique keys ``(priority, tie)``, so the popped nodes, their order and
every value are those of ``shap.PartitionExplainer.owen``; the tests compare maps with shap's.

Layout, for ``n`` images: item fields live in ``n × S`` arrays indexed by a slot (slots are
handed out in push order and never reused: ``S = 1 + 4 * (budget // 2 + 1)``); ``heap[i]`` is a
binary min-heap of image i's slots, ``size[i]`` long. Plain NumPy in, plain NumPy out.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


def new_queues(f00: np.ndarray, f11: np.ndarray, root: int, budget: int) -> dict[str, np.ndarray]:
    """The queues of ``n`` images, each holding shap's first item ``(0, 0, 0, f00, f11, root,
    1.0)`` (arena row 0 is the empty mask); float64 f00/f11 as shap computes them."""
    n = len(f00)
    slots = 1 + 4 * (budget // 2 + 1)
    q = {"prio": np.zeros((n, slots)), "tie": np.zeros((n, slots)),
         "ctx": np.zeros((n, slots), dtype=np.int64), "f00": np.zeros((n, slots)),
         "f11": np.zeros((n, slots)), "node": np.zeros((n, slots), dtype=np.int64),
         "w": np.zeros((n, slots)), "heap": np.zeros((n, slots), dtype=np.int64),
         "size": np.ones(n, dtype=np.int64), "used": np.ones(n, dtype=np.int64),
         "evals": np.zeros(n, dtype=np.int64)}
    q["f00"][:, 0], q["f11"][:, 0] = f00, f11
    q["node"][:, 0], q["w"][:, 0] = root, 1.0
    return q


@njit(cache=True)
def _less(prio, tie, a, b):
    return prio[a] < prio[b] or (prio[a] == prio[b] and tie[a] < tie[b])


@njit(cache=True)
def _pop(heap, size, i, prio, tie):
    """Remove and return the slot with the smallest key from image i's heap."""
    h, p, t = heap[i], prio[i], tie[i]
    top = h[0]
    size[i] -= 1
    n = size[i]
    if n > 0:
        last = h[n]
        pos = 0
        while True:  # sift ``last`` down from the root
            child = 2 * pos + 1
            if child >= n:
                break
            if child + 1 < n and _less(p, t, h[child + 1], h[child]):
                child += 1
            if _less(p, t, h[child], last):
                h[pos] = h[child]
                pos = child
            else:
                break
        h[pos] = last
    return top


@njit(cache=True)
def _push(heap, size, used, i, prio, tie, ctx, f00, f11, node, w, v_prio, v_tie, v_ctx, v_f00,
          v_f11, v_node, v_w):
    s = used[i]
    used[i] += 1
    prio[i, s], tie[i, s], ctx[i, s] = v_prio, v_tie, v_ctx
    f00[i, s], f11[i, s], node[i, s], w[i, s] = v_f00, v_f11, v_node, v_w
    h, p, t = heap[i], prio[i], tie[i]
    pos = size[i]
    size[i] += 1
    while pos > 0:  # sift up
        parent = (pos - 1) // 2
        if _less(p, t, s, h[parent]):
            h[pos] = h[parent]
            pos = parent
        else:
            break
    h[pos] = s


@njit(parallel=True, cache=True)
def select(active, batch_size, budget, expand, dv, heap, size, prio, tie, f00, f11, node, w,
           evals, tasks, ntasks):
    """Pop this step's nodes of every image in ``active`` as shap does; ``tasks[i, :ntasks[i]]``
    gets the slots of the nodes to expand. Returns whether each image goes on.

    shap pops while ``len(masks) < batch_size and evals + len(masks) < budget``, two masks per
    expanded node; a popped leaf only adds its value. Past the budget, every queued node adds
    ``(f11 - f00) * weight`` to its own value in pop order, and the recursion ends.
    """
    going = np.zeros(len(active), dtype=np.bool_)
    for a in prange(len(active)):  # images are independent: each owns its queue and values
        i = active[a]
        ntasks[i] = 0
        if size[i] == 0:
            continue
        if evals[i] >= budget:
            while size[i] > 0:
                s = _pop(heap, size, i, prio, tie)
                dv[i, node[i, s]] += (f11[i, s] - f00[i, s]) * w[i, s]
            continue
        limit = min(-(-batch_size // 2), -(-(budget - evals[i]) // 2))  # ceil divisions
        while size[i] > 0 and ntasks[i] < limit:
            s = _pop(heap, size, i, prio, tie)
            if expand[node[i, s]]:
                tasks[i, ntasks[i]] = s
                ntasks[i] += 1
            else:
                dv[i, node[i, s]] += (f11[i, s] - f00[i, s]) * w[i, s]
        going[a] = ntasks[i] > 0 or size[i] > 0
    return going


@njit(cache=True)
def masks_to_evaluate(active, tasks, ntasks, ctx, node, evals, left, right):
    """The step's masks, image after image, two per popped node (m10 then m01, shap's order):
    (image, context arena row, node whose mask is OR-ed in, arena row the mask is stored at)."""
    total = 0
    for a in range(len(active)):
        total += 2 * ntasks[active[a]]
    img = np.empty(total, dtype=np.int64)
    ctx_row = np.empty(total, dtype=np.int64)
    add = np.empty(total, dtype=np.int64)
    row = np.empty(total, dtype=np.int64)
    k = 0
    for a in range(len(active)):
        i = active[a]
        for j in range(ntasks[i]):
            s = tasks[i, j]
            parent = node[i, s]
            for half in range(2):
                img[k] = i
                ctx_row[k] = ctx[i, s]
                add[k] = left[parent] if half == 0 else right[parent]
                row[k] = evals[i] + 1 + 2 * j + half
                k += 1
    return img, ctx_row, add, row


@njit(parallel=True, cache=True)
def update(active, fout, ties, tasks, ntasks, dv, heap, size, used, prio, tie, ctx, f00, f11,
           node, w, evals, left, right):
    """Push the children of every popped node, given f10, f01 per node (interleaved in ``fout``,
    image after image) and four tie-breakers per node (``ties``, in the same order): shap's
    arithmetic, in shap's order."""
    starts = np.zeros(len(active) + 1, dtype=np.int64)  # each image's first mask in fout
    for a in range(len(active)):
        starts[a + 1] = starts[a] + 2 * ntasks[active[a]]
    for a in prange(len(active)):  # images are independent: each owns its queue and values
        i = active[a]
        pos, tpos = starts[a], 2 * starts[a]  # its masks in fout, its tie-breakers in ties
        row = evals[i] + 1  # arena rows of this step's masks: m10, m01 per node
        for j in range(ntasks[i]):
            s = tasks[i, j]
            c, g00, g11, ind, wt = ctx[i, s], f00[i, s], f11[i, s], node[i, s], w[i, s]
            f10, f01 = fout[pos + 2 * j], fout[pos + 2 * j + 1]
            lind, rind = left[ind], right[ind]
            r10, r01 = row + 2 * j, row + 2 * j + 1
            nw = wt / 2
            d = (g11 - f10 - f01 + g00) * wt
            dv[i, ind] += d
            t = tpos + 4 * j
            _push(heap, size, used, i, prio, tie, ctx, f00, f11, node, w,
                  -abs(f10 - g00) * nw, ties[t], c, g00, f10, lind, nw)
            _push(heap, size, used, i, prio, tie, ctx, f00, f11, node, w,
                  -abs(f01 - g00) * nw, ties[t + 1], c, g00, f01, rind, nw)
            dv[i, ind] -= d
            _push(heap, size, used, i, prio, tie, ctx, f00, f11, node, w,
                  -abs(g11 - f01) * nw, ties[t + 2], r01, f01, g11, lind, nw)
            _push(heap, size, used, i, prio, tie, ctx, f00, f11, node, w,
                  -abs(g11 - f10) * nw, ties[t + 3], r10, f10, g11, rind, nw)
        evals[i] += 2 * ntasks[i]
