"""One lockstep group against two on a GPU (impactx_ray/explain/lockstep.py): LeNet-5 at 32x32,
the same images explained both ways, interleaved, each against the forward bound measured beside it.

On CUDA the engine steps the images in flight as two groups, so one group's host work (numba's
queue, tie-breakers) runs while the GPU computes the other's forwards; this script forces one
group and two on the same explainer and prints both rates, their ratio and whether the maps agree
(they must: each image keeps its own queue). On a CPU it runs with tiny sizes (a test of the
script; the engine uses one group there).

    python benchmarks/lockstep_groups.py --device cuda            # 1024 images, 2000 evaluations
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from shap_engine import build_model, digits_hwc, explainer, forward_rate, sync

from impactx_ray.explain import default_masker


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=None, help="default: 1024 on CUDA, 8 on a CPU")
    p.add_argument("--max-evals", type=int, default=None, help="default: 2000 on CUDA, 100 on a CPU")
    p.add_argument("--forward-batch", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    n = args.images or (1024 if cuda else 8)
    evals = args.max_evals or (2000 if cuda else 100)
    model = build_model("lenet5", None, dev)
    hwc, y = digits_hwc(n, 32)
    ex = explainer(model, hwc, engine="batched", compile="off", forward_batch=args.forward_batch,
                   max_evals=evals, masker=default_masker(32, 32), batch_size=100)
    ex.explain_many(hwc[:64], y[:64])  # warm-up: cuDNN's plans, numba, the arena
    maps, shares = {}, {1: [], 2: []}
    for rep in range(args.repeats):
        for groups in (1, 2):
            ex.batched.groups = lambda k, g=groups: g  # the instance's rule, overridden
            sync(dev)
            start = time.perf_counter()
            maps[groups] = ex.explain_many(hwc, y)
            sync(dev)
            rate = n / (time.perf_counter() - start)
            bound = forward_rate(ex, (32, 32, 3), args.forward_batch, evals, dev, False)
            shares[groups].append(rate / bound)
            print(f"repeat {rep}, {groups} group(s): {rate:.1f} maps/s, forward bound {bound:.1f}, "
                  f"share {rate / bound:.2f}", flush=True)
    scale = np.abs(maps[1]).reshape(n, -1).max(1)
    rel = np.abs(maps[1] - maps[2]).reshape(n, -1).max(1) / scale
    print(f"maps, one group vs two: {int((rel <= 1e-5).sum())}/{n} within 1e-5 of the map scale, max {rel.max():.1e}")
    print(f"one_group_vs_bound={np.median(shares[1]):.2f} two_groups_vs_bound={np.median(shares[2]):.2f} "
          f"two_vs_one={np.median(shares[2]) / np.median(shares[1]):.2f}")


if __name__ == "__main__":
    main()
