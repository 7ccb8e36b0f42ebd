"""Maps/s at every paper resolution: shap vs the batched engine (eager, compiled, fp32/bf16/fp16).

Cases (the engine explains images at their native resolution; the timm models resize inside):
LeNet-5 at 32x32 (CIFAR) and 96x96 (STL-10), MobileNet V1 (224) and EfficientNet-B2 (260) on
32x32 images. Per case, in one process on one device: shap's explainer (fp32, a few images), the
engine eager in every ``--precisions``, compiled in every ``--compiled`` precision, the eager
forward bound with contiguous and channels-last weights, and the fidelity of every engine's maps
against the eager fp32 engine's: max |m - fp32| / max |fp32| per map and Spearman's rank
correlation per map (mean and worst). ``--scaling`` adds maps/s against max_evals for one case.
Models are seeded; ``--train-epochs`` first trains each on the digits training set so that its
logits (and so its maps' sensitivity to rounding) look like a trained model's.

Work runs in priority order and stops starting new rows at ``--budget-s`` (rows left are marked
"not run"); every finished row is appended to ``--out`` (JSON lines) at once.

    python benchmarks/map_table.py --device cpu --out benchmarks/results/map_table_cpu.jsonl
    python benchmarks/map_table.py --device cuda --precisions fp32 bf16 fp16 --compiled bf16 fp32 fp16 \\
        --train-epochs 2 --scaling mobilenet --out $OUT/map_table_gpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.stats import spearmanr
from shap_engine import build_model, digits_hwc, explainer, forward_rate, rel_diff, sync, timed_maps

from impactx_ray.data import load_dataset
from impactx_ray.explain import default_masker
from impactx_ray.heap import keep_heap

# case: (model, image side, engine images on CUDA, on CPU, shap images); input sizes are timm's own.
# LeNet-5 at 96x96 runs 32 images on a CPU as at 32x32: a CPU keeps no mask arena (masking.py), so
# a store shard's images all step together there (an arena held 9 at 96x96 in 512 MiB).
CASES = {
    "lenet5-32": ("lenet5", 32, 1024, 32, 8),
    "lenet5-96": ("lenet5", 96, 256, 32, 2),
    "mobilenet": ("mobilenet", 32, 32, 2, 1),
    "efficientnet_b2": ("efficientnet_b2", 32, 16, 2, 1),
}


def train_briefly(model: torch.nn.Module, epochs: int, device: torch.device) -> None:
    """A few epochs of Adam on the digits training set (32x32), so the logits are a trained model's."""
    if epochs < 1:
        return
    train, _ = load_dataset("digits")
    x, y = train.float_images().to(device), train.labels.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), device=device).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def fidelity(maps: np.ndarray, ref: np.ndarray) -> dict:
    rel = [float(np.abs(m - r).max() / max(np.abs(r).max(), 1e-30)) for m, r in zip(maps, ref)]
    rho = [float(spearmanr(m.ravel(), r.ravel())[0]) for m, r in zip(maps, ref)]
    return {"rel_mean": float(np.mean(rel)), "rel_max": max(rel), "rho_mean": float(np.mean(rho)),
            "rho_min": min(rho)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--max-evals", type=int, default=2000)
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=("fp32", "bf16", "fp16"))
    p.add_argument("--compiled", nargs="*", default=["fp32"], choices=("fp32", "bf16", "fp16"))
    p.add_argument("--images-scale", type=float, default=1.0, help="scale every case's image counts")
    p.add_argument("--train-epochs", type=int, default=0)
    p.add_argument("--scaling", default=None, choices=list(CASES), help="maps/s against max_evals for this case")
    p.add_argument("--shape-cost", default=None, choices=list(CASES),
                   help="time the eager forward's first and second call at a few new batch sizes")
    p.add_argument("--scaling-evals", nargs="+", type=int, default=[500, 1000, 2000, 4000])
    p.add_argument("--forward-batch", type=int, nargs="+", default=None,
                   help="per case, in --cases order (default: probed on CPU as a store shard's call does; "
                   "4096 LeNet, 1024 timm on CUDA)")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new row after this many seconds")
    p.add_argument("--out", required=True, help="JSON lines, one per row")
    args = p.parse_args()
    keep_heap()  # as the impactx command and map workers run; shap's forward gets it too
    device, t0 = torch.device(args.device), time.perf_counter()
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "max_evals": args.max_evals}
    out = open(args.out, "a")

    def emit(row: dict) -> None:
        row = {**info, **row}
        print(json.dumps(row), flush=True)
        out.write(json.dumps(row) + "\n")
        out.flush()

    def time_left() -> bool:
        return time.perf_counter() - t0 < args.budget_s

    plans = []
    for i, case in enumerate(args.cases):
        name, side, n_gpu, n_cpu, n_shap = CASES[case]
        n = n_gpu if device.type == "cuda" else n_cpu
        n, n_shap = max(1, round(n * args.images_scale)), max(1, round(n_shap * args.images_scale))
        fb = (args.forward_batch[i] if args.forward_batch else
              (512 if device.type == "cpu" else (4096 if name == "lenet5" else 1024)))
        model = build_model(name, None, device)
        train_briefly(model, args.train_epochs, device)
        hwc, y = digits_hwc(n, side)
        if device.type == "cpu" and not args.forward_batch:  # the chunk a store shard's call would probe
            probe = explainer(model, hwc, engine="batched", compile="off", max_evals=args.max_evals,
                              masker=default_masker(side, side), batch_size=100, forward_batch=fb).model_forward
            rates = probe.probe_chunk(hwc.shape[1:])
            fb = probe.chunk
            emit({"case": case, "row": "forward batch probe", "images_per_s": rates, "chosen": fb})
        common = {"max_evals": args.max_evals, "masker": default_masker(side, side), "batch_size": 100,
                  "forward_batch": fb}
        # a whole warm-up map only where a map takes seconds, not minutes (timm models on a CPU)
        common_warm = name == "lenet5" or device.type == "cuda"
        plans.append((case, model, hwc, y, n_shap, common, common_warm))

    refs: dict[str, np.ndarray] = {}
    for case, model, hwc, y, n_shap, common, full in plans:  # first: shap, eager in every precision
        if not time_left():
            emit({"case": case, "row": "eager", "status": "not run"})
            continue
        r = timed_maps(explainer(model, hwc[:n_shap], engine="shap", **common), hwc[:n_shap], y[:n_shap], device,
                       full)
        emit({"case": case, "row": "shap", "precision": "fp32", "images": n_shap, "maps_per_s": r["maps_per_s"]})
        shap_maps = r["maps"]
        for precision in args.precisions:
            if not time_left():
                emit({"case": case, "row": f"eager {precision}", "status": "not run"})
                continue
            for cl in (False, True):  # the forward bound in both layouts; the engine in the faster one
                ex = explainer(model, hwc, engine="batched", compile="off", precision=precision,
                               channels_last=cl, **common)
                emit({"case": case, "row": "forward bound eager", "precision": precision, "channels_last": cl,
                      "maps_per_s": forward_rate(ex, hwc.shape[1:], common["forward_batch"],
                                                 common["max_evals"], device, False)})
            ex = explainer(model, hwc, engine="batched", compile="off", precision=precision, **common)
            r = timed_maps(ex, hwc, y, device, full)
            refs.setdefault(case, r["maps"])  # fp32 comes first
            emit({"case": case, "row": "engine eager", "precision": precision, "images": len(hwc),
                  "channels_last": ex.model_forward.channels_last, "maps_per_s": r["maps_per_s"],
                  "forward_share": r["forward_share"], "vs_shap_maps": rel_diff(r["maps"][:n_shap], shap_maps),
                  **fidelity(r["maps"], refs[case])})
    for case, model, hwc, _y, _n_shap, common, _full in plans:  # what a new batch size costs the eager forward
        if case == args.shape_cost and time_left():
            ex = explainer(model, hwc, engine="batched", compile="off", **common)
            for k in (1000, 999, 998, 1000):
                x = torch.rand(k, *hwc.shape[1:], device=device)
                times = []
                for _ in range(2):
                    sync(device)
                    start = time.perf_counter()
                    with torch.no_grad():
                        ex.model_forward(x)
                    sync(device)
                    times.append(time.perf_counter() - start)
                emit({"case": case, "row": "eager batch-size cost", "batch": k, "first_s": times[0],
                      "again_s": times[1]})
    compiled: dict[tuple[str, str], object] = {}  # (case, precision) -> its ModelForward, compiled
    for precision in args.compiled:  # then compiled, one precision across cases at a time
        for case, model, hwc, y, _n_shap, common, full in plans:
            if not time_left():
                emit({"case": case, "row": f"engine compiled {precision}", "status": "not run"})
                continue
            ex = explainer(model, hwc, engine="batched", compile="on", precision=precision, **common)
            r = timed_maps(ex, hwc, y, device, full)
            compiled[case, precision] = ex.model_forward
            emit({"case": case, "row": "engine compiled", "precision": precision, "images": len(hwc),
                  "channels_last": ex.model_forward.channels_last, "maps_per_s": r["maps_per_s"],
                  "forward_share": r["forward_share"], "compile_s": r["warmup_s"],
                  "compiled_ok": ex.model_forward.compile_mode == "on",
                  "padded_share": r["padded_share"], **fidelity(r["maps"], refs[case]),
                  "forward_bound": forward_rate(ex, hwc.shape[1:], common["forward_batch"], common["max_evals"],
                                                device, True)})
    if args.scaling:
        case, model, hwc, y, _, common, full = next(pl for pl in plans if pl[0] == args.scaling)
        precision = args.compiled[0] if args.compiled else args.precisions[0]
        for evals in args.scaling_evals:
            if not time_left():
                emit({"case": case, "row": f"scaling {evals}", "status": "not run"})
                continue
            ex = explainer(model, hwc, engine="batched", compile="on" if args.compiled else "off",
                           precision=precision, **{**common, "max_evals": evals})
            if (case, precision) in compiled:  # the graph compiled above, not a second compile
                ex.model_forward = compiled[case, precision]
            r = timed_maps(ex, hwc, y, device, full)
            emit({"case": case, "row": "scaling", "precision": precision, "compiled": bool(args.compiled),
                  "max_evals": evals, "images": len(hwc), "maps_per_s": r["maps_per_s"]})
    sync(device)
    emit({"row": "done", "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
