"""Map engines: shap's explainer vs the batched engine, eager and compiled, vs the forward bounds.

In one run, on one model (seeded initialisation: the rates do not depend on the weights' values),
the same digits images and the same masker, max_evals and batch_size:

  (a) engine "shap": ``shap.PartitionExplainer`` one image at a time (the reference)
  (b) engine "batched", eager forward: all images in lockstep, masked images in chunks
  (c) engine "batched", compiled forward (``--compile``): ``torch.compile`` at the chunk size,
      the last chunk of each step padded
  (d) the eager forward bound: images/s of the forward on one chunk of ``--forward-batch`` images,
      divided by max_evals -- what an engine with no overhead could reach
  (e) the compiled forward bound (``--compile``)

The forward share of (b) and (c) is the engine's own timer around its model calls (which end by
copying the picked logits to the host, so a GPU is synchronised); of (a), a timing wrapper. Rates
are steady state: shap's numba kernels are compiled, the engines warmed up on one image and the
compile done (its time is printed) before the clock starts. The engines are timed in turn,
``--repeats`` times (shap, eager, compiled, shap, ...); each row is its engine's median repeat,
and the speed-up is the median of the per-repeat ratios, so a change in the machine's load
during the run (on a shared machine) shifts both sides of a ratio alike. Every engine's maps are
compared with shap's (max |m - shap| / max |shap| over the images). The last line is
``engine_speedup_vs_shap=<(c) or (b) / (a)> forward_share=<its forward time / its wall time>
engine_vs_bound=<the median over repeats of (c) or (b) / its forward bound>``, the bound measured
just before and just after each repeat of that engine (their geometric mean).

    python benchmarks/shap_engine.py --compile              # LeNet-5, 32x32, 2000 evals, 32 images
    python benchmarks/shap_engine.py --compile --model mobilenet --images 2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import shap
import torch

from impactx_ray.data import load_dataset
from impactx_ray.explain import default_masker
from impactx_ray.explain.batched import auto_forward_batch
from impactx_ray.explain.shap_maps import TrueClassExplainer, torch_threads_ctx
from impactx_ray.heap import keep_heap
from impactx_ray.models import create_backbone


class Timed(torch.nn.Module):
    """The model, with the seconds spent in its forward passes counted (for shap's engine)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model, self.cuda = model, device.type == "cuda"
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.model(x)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return out


def build_model(name: str, input_size: int | None, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {} if name == "lenet5" or input_size is None else {"input_size": input_size}
    return create_backbone(name, 10, **kwargs).to(device).eval()


def digits_hwc(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` digits images N x H x W x C in [0, 1] at ``size`` x ``size``, and their labels."""
    train, _ = load_dataset("digits")
    x = train.float_images(torch.arange(n))  # N x 3 x 32 x 32
    if size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy()), train.labels[:n].numpy()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def explainer(model, hwc, *, engine: str, max_evals: int, masker: str, batch_size: int, forward_batch: int,
              precision: str = "fp32", compile: str = "off", channels_last: bool | None = None) -> TrueClassExplainer:
    h, w, c = hwc.shape[1:]
    return TrueClassExplainer(model, (c, h, w), max_evals=max_evals, masker=masker, batch_size=batch_size,
                              seed=0, engine=engine, forward_batch=forward_batch, precision=precision,
                              compile=compile, channels_last=channels_last)


def warm_up(ex: TrueClassExplainer, hwc: np.ndarray, y: np.ndarray, device, full_map: bool) -> float:
    """Seconds to bring ``ex`` to steady state: shap's numba kernels compiled (a 32-evaluation map),
    the forward run once on a full chunk, half a chunk and 2 images (compiled, when ``ex``
    compiles: this is the compile, of every graph the step sizes need),
    and with ``full_map`` one whole map (caches, allocations; skipped where a map takes minutes).
    A batched engine's whole map is of all the images, as timed: its mask rows (a GPU's arena,
    200 MB for 32 images at 32x32x3 and 2000 evaluations; a CPU's lineages, 1 MB) and masked
    buffer are then allocated and touched, as they are in a map worker after its first shard; a
    first touch costs a page fault per 4 KiB."""
    start = time.perf_counter()
    h, w, c = hwc.shape[1:]
    with torch.no_grad():
        if ex.engine == "shap":
            TrueClassExplainer(ex.model, (c, h, w), max_evals=32, masker=ex.masker, engine="shap").explain(hwc[0], y[0])
        else:
            mf = ex.model_forward
            mf.compiled = mf.compile_mode == "on"
            # a step's calls come in every size up to the chunk: on a CPU one dynamic graph serves
            # them, but dynamo may specialise small batches (MobileNet's conv guards batch >= 16)
            for k in sorted({mf.chunk, max(2, mf.chunk // 2), 2}, reverse=True):
                mf(torch.zeros(k, h, w, c, device=device))
        if full_map:
            some = 1 if ex.engine == "shap" else len(hwc)
            ex.explain_many(hwc[:some], y[:some])
    sync(device)
    return time.perf_counter() - start


def timed_maps(ex: TrueClassExplainer, hwc: np.ndarray, y: np.ndarray, device, full_map: bool = True,
               bound=None) -> dict:
    """Warm ``ex`` up (:func:`warm_up`), then time all images:
    {"maps_per_s", "forward_share", "warmup_s", "padded_share", "maps"}; with ``bound`` (a function
    measuring the forward bound in maps/s) also "bound": the geometric mean of the bound measured
    just before and just after the timed maps, so that a drift in the machine's speed during the
    run moves both sides of engine/bound alike."""
    timer = ex.model if isinstance(ex.model, Timed) else None
    warmup = warm_up(ex, hwc, y, device, full_map)
    if ex.engine == "batched":
        ex.batched.forward_seconds, ex.batched.forward_images = 0.0, 0
        ex.model_forward.padded_images = ex.model_forward.graph_images = 0
    if timer is not None:
        timer.seconds = 0.0
    before = bound() if bound is not None else None
    with torch.no_grad():
        start = time.perf_counter()
        maps = ex.explain_many(hwc, y)
        sync(device)
        wall = time.perf_counter() - start
    around = {} if bound is None else {"bound": float(np.sqrt(before * bound()))}
    if ex.engine == "batched":
        fwd = ex.batched.forward_seconds
        padded = ex.model_forward.padded_images / max(ex.model_forward.graph_images, 1)
    else:
        fwd, padded = timer.seconds if timer is not None else float("nan"), 0.0
    return {"maps_per_s": len(hwc) / wall, "forward_share": fwd / wall, "warmup_s": warmup,
            "padded_share": padded, "maps": maps, **around}


def forward_rate(ex: TrueClassExplainer, hwc_shape, forward_batch: int, max_evals: int, device,
                 compiled: bool, seconds: float = 1.0) -> float:
    """Images/s of ``ex``'s model call on one chunk of ``forward_batch`` random images (as the
    engine feeds them), divided by ``max_evals``: maps/s with zero engine overhead."""
    mf = ex.model_forward
    mf.compiled = compiled
    x = torch.rand(forward_batch, *hwc_shape, device=device)  # N x H x W x C
    with torch.no_grad():
        mf(x)  # warm-up (compiled: the graph exists already)
        sync(device)
        reps, start = 0, time.perf_counter()
        while reps < 2 or time.perf_counter() - start < seconds:
            mf(x)
            sync(device)
            reps += 1
    return reps * forward_batch / (time.perf_counter() - start) / max_evals


def median_run(runs: list[dict]) -> dict:
    """The run with the median maps/s (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r["maps_per_s"])[(len(runs) - 1) // 2]


def rel_diffs(maps: np.ndarray, ref: np.ndarray) -> list[float]:
    """max |maps - ref| / max |ref| of each image."""
    return [float(np.abs(maps[i] - ref[i]).max() / max(np.abs(ref[i]).max(), 1e-30)) for i in range(len(ref))]


def rel_diff(maps: np.ndarray, ref: np.ndarray) -> float:
    """max over images of max |maps - ref| / max |ref|."""
    return max(rel_diffs(maps, ref))


PARITY_REL = 1e-5  # of the map's scale: float32 rounding, not a different map


def within(maps: np.ndarray, ref: np.ndarray) -> int:
    """How many images' maps are within PARITY_REL of ``ref``'s scale."""
    return sum(d <= PARITY_REL for d in rel_diffs(maps, ref))


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
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                   help="channels-last weights (auto: on CUDA only)")
    p.add_argument("--compile", action="store_true", help="add the compiled engine and forward bound")
    p.add_argument("--torch-threads", type=int, default=torch.get_num_threads(),
                   help="torch threads for every engine (default: torch's, all cores)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats of every engine; "
                   "the median is reported (default 5)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args()
    keep_heap()  # as the impactx command and map workers run; shap's forward gets it too
    device = torch.device(args.device)
    fb = args.forward_batch or auto_forward_batch(device)
    masker = args.masker or default_masker(args.image_size, args.image_size)
    cl = {"auto": None, "on": True, "off": False}[args.channels_last]
    hwc, y = digits_hwc(args.images, args.image_size)
    model = build_model(args.model, args.input_size, device)
    common = {"max_evals": args.max_evals, "masker": masker, "batch_size": args.batch_size, "forward_batch": fb,
              "precision": args.precision, "channels_last": cl}

    with torch_threads_ctx(args.torch_threads):
        engines = {"shap": explainer(Timed(model, device), hwc, engine="shap", **common),
                   "eager": explainer(model, hwc, engine="batched", compile="off", **common)}
        if args.compile:
            engines["compiled"] = explainer(model, hwc, engine="batched", compile="on", **common)
        # Interleaved repeats: a change in the machine's load hits shap and the engines of the
        # same repeat alike, so each repeat's ratio is fair; the median repeat is reported.
        runs: dict[str, list[dict]] = {name: [] for name in engines}
        best = "compiled" if args.compile else "eager"
        # the best engine's forward bound, measured just before and after each of its repeats
        def bound() -> float:
            return forward_rate(engines[best], hwc.shape[1:], fb, args.max_evals, device, args.compile, seconds=0.5)

        for _ in range(args.repeats):
            for name, ex in engines.items():
                runs[name].append(timed_maps(ex, hwc, y, device, bound=bound if name == best else None))
        bounds = [r["bound"] for r in runs[best]]
        ref, eager = median_run(runs["shap"]), median_run(runs["eager"])
        eager_ex = engines["eager"]
        rows = [("(a) shap, one image at a time", ref),
                (f"(b) batched, eager, {args.images} images in lockstep", eager)]
        if args.compile:
            comp_ex, comp = engines["compiled"], median_run(runs["compiled"])
            rows.append((f"(c) batched, compiled, {args.images} images", comp))
        rows.append((f"(d) forward bound, eager ({fb} images/call)",
                     {"maps_per_s": forward_rate(eager_ex, hwc.shape[1:], fb, args.max_evals, device, False),
                      "forward_share": 1.0}))
        if args.compile:
            rows.append((f"(e) forward bound, compiled ({fb} images/call)",
                         {"maps_per_s": forward_rate(comp_ex, hwc.shape[1:], fb, args.max_evals, device, True),
                          "forward_share": 1.0}))

    print(f"{args.model}, {args.image_size}x{args.image_size} digits, {args.images} images, "
          f"max_evals={args.max_evals}, {masker}, batch_size={args.batch_size}, forward_batch={fb}, "
          f"device={device}, precision={args.precision}, channels_last={eager_ex.model_forward.channels_last}, "
          f"torch {torch.__version__} ({args.torch_threads} threads while timing), shap {shap.__version__}")
    print(f"max |batched - shap| / max |shap|: eager {rel_diff(eager['maps'], ref['maps']):.1e}"
          + (f", compiled {rel_diff(comp['maps'], ref['maps']):.1e}" if args.compile else ""))
    # per image: on CUDA the forward rounds differently per batch size (cuDNN picks per shape), and
    # one near-tie in an image's queue order then moves that image's map (docs/map-engine.md)
    print(f"images within {PARITY_REL:g} of shap's map scale: eager {within(eager['maps'], ref['maps'])}/{args.images}"
          + (f", compiled {within(comp['maps'], ref['maps'])}/{args.images}" if args.compile else ""))
    if args.compile:
        first = runs["compiled"][0]["warmup_s"], runs["eager"][0]["warmup_s"]  # the cold ones
        print(f"compile + first map: {first[0]:.1f} s (eager first map {first[1]:.1f} s); "
              f"padding: {comp['padded_share']:.0%} of the images through the compiled graph")
    print()
    shap_rate = ref["maps_per_s"]
    print(f"| {'engine':<46} | {'maps/s':>8} | {'vs shap':>8} | {'forward share':>13} |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 10}|{'-' * 15}|")
    for name, r in rows:
        print(f"| {name:<46} | {r['maps_per_s']:8.2f} | {r['maps_per_s'] / shap_rate:7.2f}x | "
              f"{r['forward_share']:>13.0%} |")
    ratios = [e["maps_per_s"] / a["maps_per_s"] for e, a in zip(runs[best], runs["shap"])]
    speedup = float(np.median(ratios))
    to_bound = [e["maps_per_s"] / b for e, b in zip(runs[best], bounds)]  # per repeat: same moment
    if args.repeats > 1:
        print(f"\n{best} engine / shap per repeat: {', '.join(f'{r:.2f}' for r in ratios)} "
              f"(median {speedup:.2f}); rows above: the median repeat of each engine")
        print(f"{best} engine / its forward bound per repeat: {', '.join(f'{r:.2f}' for r in to_bound)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ratios": ratios, "engine_vs_bound": to_bound,
                       "rows": [{"name": n, **{k: v for k, v in r.items() if k != "maps"}}
                                for n, r in rows]}, f, indent=1)
    print(f"engine_speedup_vs_shap={speedup:.2f} "
          f"forward_share={median_run(runs[best])['forward_share']:.2f} "
          f"engine_vs_bound={float(np.median(to_bound)):.2f}")


if __name__ == "__main__":
    main()
