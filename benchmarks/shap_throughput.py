"""SHAP map throughput: shap alone vs our Ray pool with 1 and N workers vs the model-forward bound.

All four measure the same model (LeNet-5, seeded initialisation: throughput does not depend on the
weights' values), the same digits images at 32×32, the same masker and ``max_evals``, in one run:

  (a) shap called directly, one process: ``PartitionExplainer(...)(x, outputs=[y])`` per image
  (b) our pool (``MapPool``) with 1 worker     (c) our pool with N workers
  (d) the forward bound of one worker: images/s of the model at the batched engine's chunk size
      (512) on one thread ÷ max_evals

Rates are steady state: shap's numba kernels are compiled (and pool workers started, with their
model loaded) before the clock starts; the pools' start-up, printed separately, is paid once per
map store, not per map.

    python benchmarks/shap_throughput.py --images 96 --workers 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import shap
import torch

from impactx_ray.data import load_dataset
from impactx_ray.explain import ExplainSettings, MapStore
from impactx_ray.explain.actors import MapPool
from impactx_ray.heap import keep_heap
from impactx_ray.models import create_backbone


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("lenet5", 10).eval()


def shap_direct(images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace) -> float:
    model = build_model()

    def f(x_hwc: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x_hwc).permute(0, 3, 1, 2)).numpy()

    hwc = images.permute(0, 2, 3, 1).numpy()
    explainer = shap.PartitionExplainer(f, shap.maskers.Image(args.masker, hwc.shape[1:]))
    explainer(hwc[:1], max_evals=32, outputs=[0], silent=True)  # compile shap's numba kernels
    start = time.perf_counter()
    for x, y in zip(hwc, labels.tolist()):
        explainer(x[None], max_evals=args.max_evals, batch_size=args.batch_size, outputs=[y],
                  silent=True)
    return len(hwc) / (time.perf_counter() - start)


def pool_rate(images, labels, workers: int, args, tmp: Path) -> tuple[float, float]:
    """(steady-state maps/s, start-up seconds) of a MapPool with ``workers`` workers."""
    settings = ExplainSettings(max_evals=args.max_evals, masker=args.masker,
                               batch_size=args.batch_size, compile=args.compile)
    t0 = time.perf_counter()
    with MapPool(build_model, images, labels, settings, workers=workers,
                 gpus_per_worker=0.0) as pool:
        pool.wait_ready()
        startup = time.perf_counter() - t0
        meta = settings.store_meta(f"bench-{workers}", "bench", (32, 32))
        store = MapStore.create_or_open(tmp / f"w{workers}", meta=meta, num_maps=len(images),
                                        map_shape=(32, 32, 3), shard_size=args.shard_size)
        start = time.perf_counter()
        pool.compute(store, progress=False)
        return len(images) / (time.perf_counter() - start), startup


def forward_bound(args: argparse.Namespace) -> float:
    """Forward images/s of one process (1 torch thread, as a pool worker) at the batched engine's
    CPU chunk size, divided by max_evals: no engine that runs the model can beat it per worker."""
    torch.set_num_threads(1)
    model, x = build_model(), torch.rand(512, 3, 32, 32)
    best = 0.0
    with torch.no_grad():
        model(x)  # warm-up
        for _ in range(3):  # best of three rounds: a bound, not an average
            reps, start = 20, time.perf_counter()
            for _ in range(reps):
                model(x)
            best = max(best, reps * len(x) / (time.perf_counter() - start))
    return best / args.max_evals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-evals", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--masker", default="blur(8,8)")
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="the workers' forward (auto: only shards of >= 200k forward images compile)")
    args = p.parse_args()
    keep_heap()  # as the impactx command and map workers run; shap's forward gets it too

    import ray

    ray.init(address="local", num_cpus=max(args.workers, 1), logging_level="ERROR",
             log_to_driver=False)
    train, _ = load_dataset("digits")
    images, labels = train.float_images(torch.arange(args.images)), train.labels[:args.images]
    with tempfile.TemporaryDirectory() as tmp:
        direct = shap_direct(images, labels, args)
        one, startup1 = pool_rate(images, labels, 1, args, Path(tmp))
        many, startup_n = pool_rate(images, labels, args.workers, args, Path(tmp))
    bound = forward_bound(args)
    ray.shutdown()

    print(f"LeNet-5, 32x32 digits, {args.images} images, max_evals={args.max_evals}, "
          f"{args.masker}, batch_size={args.batch_size}, compile={args.compile}, torch {torch.__version__}, "
          f"shap {shap.__version__}, {torch.get_num_threads()} torch threads in the driver")
    print(f"| {'what':<40} | {'maps/s':>8} | {'vs shap':>8} |")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 10}|")
    rows = [("(a) shap directly, one process", direct),
            (f"(b) pool, 1 worker (start-up {startup1:.1f} s)", one),
            (f"(c) pool, {args.workers} workers (start-up {startup_n:.1f} s)", many),
            ("(d) forward bound, 1 worker (1 thread)", bound)]
    for name, rate in rows:
        print(f"| {name:<40} | {rate:8.2f} | {rate / direct:7.2f}x |")
    print(f"speedup_vs_1_worker={many / one:.2f} workers={args.workers}")


if __name__ == "__main__":
    main()
