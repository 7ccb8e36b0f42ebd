"""The paper's stage-1 grid against a budgeted search, on the embedded digits data, in one run.

  (a) grid: Table 1's 180 stage-1 trials (batch size × learning rate × validation fraction),
      every trial ``--epochs`` epochs — the paper's protocol
  (b) optuna+asha: ``--num-samples`` trials of the same values, seeded TPE, ASHA stopping the
      weak ones at 1, 3, … epochs; once per ``--seeds`` seed (TPE's picks vary with the seed)

Both run the sweep's own stage-1 trainable and search plans (``sweep/search.py``) on a local
Ray with the same resources per trial; no MLflow. The table gives, per search: trials,
trial-epochs (the compute spent), wall time, the best validation accuracy (what selection
uses) and that winner's test accuracy. The last line compares the searches' means over seeds:

    epoch_budget_ratio=<optuna+asha trial-epochs / grid trial-epochs> val_gap_pp=<grid best val − optuna best val, pp>

    python benchmarks/search_budget.py                      # 180-trial grid, 3 seeds of 60
    python benchmarks/search_budget.py --epochs 3 --seeds 0 --num-samples 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
from ray import tune

from impactx_ray.data import load_dataset
from impactx_ray.sweep.search import SearchSpec, tune_plan
from impactx_ray.sweep.spaces import STAGE1_SEARCHED, stage1_space
from impactx_ray.sweep.stage import METRIC, best
from impactx_ray.sweep.trainables import CPUS, stage1_trainable


def run_search(spec: SearchSpec, args: argparse.Namespace, data: tuple, storage: Path,
               name: str) -> dict:
    """One stage-1 search, as the sweep runs it; its trials, trial-epochs, time and winner."""
    space = stage1_space()
    slots = int(ray.cluster_resources()["CPU"])
    plan = tune_plan(space, spec, args.epochs, METRIC, slots=slots)
    base = {"model": "lenet5", "dataset": "digits", "epochs": args.epochs, "seed": 0,
            "device": "cpu", CPUS: 1}
    trainable = tune.with_resources(tune.with_parameters(stage1_trainable, data=data),
                                    {"cpu": 1})
    tuner = tune.Tuner(trainable, param_space={**base, **plan.param_space},
                       tune_config=tune.TuneConfig(**plan.tune_config),
                       run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0,
                                                 checkpoint_config=tune.CheckpointConfig(
                                                     num_to_keep=1)))
    start = time.perf_counter()
    results = tuner.fit()
    seconds = time.perf_counter() - start
    assert not results.errors, results.errors
    params, metrics, _ = best(results, STAGE1_SEARCHED)
    return {"search": spec.label, "seed": spec.seed if spec.search != "grid" else "-",
            "trials": len(results),
            "trial_epochs": sum(int(r.metrics["epoch"]) for r in results),
            "seconds": seconds, "best_val": metrics[METRIC], "test": metrics["test_accuracy"],
            "winner": params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=4, help="epochs per trial (default 4)")
    p.add_argument("--num-samples", type=int, default=60, help="optuna trials (default 60)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--grace-period", type=int, default=1)
    p.add_argument("--reduction-factor", type=float, default=3.0)
    p.add_argument("--cpus", type=int, help="Ray's CPUs (default: all of this machine's)")
    args = p.parse_args()
    # Per-epoch trial checkpoints force Tune's experiment snapshots; its warning about that would
    # drown the table (Tune reads the variable when a run starts).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False,
             log_to_driver=False)
    data = load_dataset("digits")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(run_search(SearchSpec(), args, data, Path(tmp), "grid"))
        for seed in args.seeds:
            spec = SearchSpec("optuna", "asha", num_samples=args.num_samples,
                              grace_period=args.grace_period,
                              reduction_factor=args.reduction_factor, seed=seed)
            rows.append(run_search(spec, args, data, Path(tmp), f"optuna-{seed}"))
    ray.shutdown()

    print(f"\nstage-1 search on digits, LeNet-5, {args.epochs} epochs per trial, "
          f"{int(args.cpus or 0) or 'all'} CPUs")
    print("| search | seed | trials | trial-epochs | wall s | best val acc | its test acc | winner |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        winner = ", ".join(f"{k}={v}" for k, v in r["winner"].items())
        print(f"| {r['search']} | {r['seed']} | {r['trials']} | {r['trial_epochs']} | "
              f"{r['seconds']:.0f} | {100 * r['best_val']:.2f} | {100 * r['test']:.2f} | "
              f"{winner} |")
    grid, sampled = rows[0], rows[1:]
    ratio = statistics.mean(r["trial_epochs"] for r in sampled) / grid["trial_epochs"]
    gap = 100 * (grid["best_val"] - statistics.mean(r["best_val"] for r in sampled))
    worst = 100 * (grid["best_val"] - min(r["best_val"] for r in sampled))
    print(f"over {len(sampled)} seed(s): worst val gap {worst:.2f} pp; wall time ratio "
          f"{statistics.mean(r['seconds'] for r in sampled) / grid['seconds']:.3f}")
    print(f"epoch_budget_ratio={ratio:.3f} val_gap_pp={gap:.2f}")


if __name__ == "__main__":
    main()
