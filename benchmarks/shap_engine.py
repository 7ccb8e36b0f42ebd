"""Map engines: the batched Partition engine vs shap's explainer, same model, images and settings.

In one run, on one model (seeded initialisation: the rates do not depend on the weights' values),
the same digits images and the same masker, max_evals and batch_size:

  (a) engine "shap": ``shap.PartitionExplainer`` one image at a time (the reference)
  (b) engine "batched": all images in lockstep, masked images through the model in chunks
  (c) the forward bound: images/s of one forward pass on a chunk of ``--forward-batch`` images,
      divided by max_evals -- what an engine with no overhead at all could reach

For (a) and (b) the share of wall time spent inside the model's forward pass is measured by a
timing wrapper around the model (synchronising CUDA). Rates are steady state: shap's numba kernels
are compiled and both engines warmed up before the clock starts. The maps of (a) and (b) are
compared too (max |batched - shap| / max |shap| over the images).

    python benchmarks/shap_engine.py                        # LeNet-5, 32x32, 2000 evals, 32 images
    python benchmarks/shap_engine.py --model mobilenet --input-size 32 --device cuda
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import shap
import torch

from impactx_ray.data import load_dataset
from impactx_ray.explain import default_masker
from impactx_ray.explain.batched import auto_forward_batch
from impactx_ray.explain.shap_maps import TrueClassExplainer, torch_threads_ctx
from impactx_ray.models import create_backbone


class Timed(torch.nn.Module):
    """The model, with the seconds spent in its forward passes (and the images) counted."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model, self.cuda = model, device.type == "cuda"
        self.seconds, self.images = 0.0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.model(x)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.images += len(x)
        return out


def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {} if args.model == "lenet5" else {"input_size": args.input_size}
    return create_backbone(args.model, 10, **kwargs).to(device).eval()


def run_engine(engine: str, model: Timed, hwc: np.ndarray, y: np.ndarray, args) -> tuple[float, float, np.ndarray]:
    """(maps/s, forward share of wall time, maps) of one engine on all images."""
    h, w, c = hwc.shape[1:]
    settings = {"masker": args.masker, "batch_size": args.batch_size, "seed": 0, "engine": engine,
                "forward_batch": args.forward_batch}
    TrueClassExplainer(model, (c, h, w), max_evals=32, **settings).explain_many(hwc[:2], y[:2])  # warm-up
    ex = TrueClassExplainer(model, (c, h, w), max_evals=args.max_evals, **settings)
    model.seconds = 0.0
    with torch.no_grad():
        start = time.perf_counter()
        maps = ex.explain_many(hwc, y)
        wall = time.perf_counter() - start
    return len(hwc) / wall, model.seconds / wall, maps


def forward_bound(model: torch.nn.Module, shape: tuple[int, int, int], args, device) -> float:
    """Forward images/s at the chunk size, divided by max_evals: maps/s with zero overhead."""
    h, w, c = shape
    x = torch.rand(args.forward_batch, h, w, c, device=device).permute(0, 3, 1, 2)  # as engines feed it
    with torch.no_grad():
        model(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        reps, start = 3, time.perf_counter()
        for _ in range(reps):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return reps * len(x) / (time.perf_counter() - start) / args.max_evals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lenet5", help="backbone name (lenet5, mobilenet, any timm name)")
    p.add_argument("--input-size", type=int, default=None, help="the timm model's input size (default: its own)")
    p.add_argument("--image-size", type=int, default=32, help="digits resized to this side (default 32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--max-evals", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--forward-batch", type=int, default=None,
                   help="masked images per model call (default: the engine's, 512 on CPU, 4096 on CUDA)")
    p.add_argument("--masker", default=None, help="default: blur a quarter of the image wide")
    p.add_argument("--torch-threads", type=int, default=torch.get_num_threads(),
                   help="torch threads for both engines (default: torch's, all cores)")
    args = p.parse_args()
    device = torch.device(args.device)
    args.forward_batch = args.forward_batch or auto_forward_batch(device)
    args.masker = args.masker or default_masker(args.image_size, args.image_size)

    train, _ = load_dataset("digits")
    x = train.float_images(torch.arange(args.images))  # N x 3 x 32 x 32 in [0, 1]
    if args.image_size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(args.image_size,) * 2, mode="bilinear", align_corners=False)
    hwc = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())  # N x H x W x C
    y = train.labels[: args.images].numpy()

    model = Timed(build_model(args, device), device)
    with torch_threads_ctx(args.torch_threads):
        shap_rate, shap_share, ref = run_engine("shap", model, hwc, y, args)
        rate, share, maps = run_engine("batched", model, hwc, y, args)
        bound = forward_bound(model.model, hwc.shape[1:], args, device)
    diff = max(float(np.abs(maps[i] - ref[i]).max() / max(np.abs(ref[i]).max(), 1e-30)) for i in range(len(ref)))

    print(f"{args.model}, {args.image_size}x{args.image_size} digits, {args.images} images, "
          f"max_evals={args.max_evals}, {args.masker}, batch_size={args.batch_size}, "
          f"forward_batch={args.forward_batch}, device={device}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads here, {args.torch_threads} while timing), shap {shap.__version__}")
    print(f"max |batched - shap| / max |shap| = {diff:.1e}")
    print()
    print(f"| {'engine':<44} | {'maps/s':>8} | {'vs shap':>8} | {'forward share':>13} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 10}|{'-' * 15}|")
    rows = [("(a) shap, one image at a time", shap_rate, f"{shap_share:.0%}"),
            (f"(b) batched, {args.images} images in lockstep", rate, f"{share:.0%}"),
            (f"(c) forward bound ({args.forward_batch} images/call)", bound, "100%")]
    for name, r, s in rows:
        print(f"| {name:<44} | {r:8.2f} | {r / shap_rate:7.2f}x | {s:>13} |")
    print(f"engine_speedup_vs_shap={rate / shap_rate:.2f} forward_share={share:.2f}")


if __name__ == "__main__":
    main()
