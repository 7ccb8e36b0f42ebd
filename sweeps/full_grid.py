"""The paper's whole experiment as one Ray job: for every (model, dataset) cell, the Table 1 grid
for stage 1, SHAP maps of the winner over the cluster, the λ grid for stage 2, every trial in
MLflow, and a Table 2 summary.

    ray job submit --working-dir . -- python sweeps/full_grid.py --out /shared/impactx
    python sweeps/full_grid.py --smoke            # the same pipeline, small, on this machine
    python sweeps/full_grid.py --dry-run          # what would run, without starting Ray
    python sweeps/full_grid.py --search optuna --scheduler asha --num-samples 40   # a budget

Rerun the same command with the same --out to resume an interrupted sweep.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from impactx_ray.defaults import DEFAULT_REPLACEMENTS, MAX_EVALS, SWEEP_MORF_IMAGES
from impactx_ray.errors import UserError, disk_full_line
from impactx_ray.flags import OneLineParser, add_config_flags, config_overrides, positive_int
from impactx_ray.sweep.search import SCHEDULERS, SEARCHES, SearchSpec, budget
from impactx_ray.sweep.spaces import (
    COMPARABLE_METHODS,
    COMPARISON_METHODS,
    PAPER_DATASETS,
    PAPER_MODELS,
    STAGE1_SEARCHED,
    STAGE2_SEARCHED,
    cells,
    plan,
)

SMOKE = {"models": ["lenet5"], "datasets": ["digits"], "epochs": 3, "max_evals": 100,
         "morf_images": 50}
FULL = {"epochs": 30, "max_evals": MAX_EVALS, "morf_images": SWEEP_MORF_IMAGES}
# Where the user's browser opens the MLflow UI, when not at the tracking URI (compose, k8s).
UI_ENV_VAR = "IMPACTX_MLFLOW_UI"
# Set by Ray's job supervisor in the environment of every job's entrypoint.
JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Set per cell (--models, --datasets) or searched by the grids: not flags of a sweep.
NOT_FLAGS = ("model", "dataset", *STAGE1_SEARCHED, *STAGE2_SEARCHED)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="full_grid.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), help="sweep directory "
                   "(shared storage on a multi-node cluster)")
    p.add_argument("--smoke", action="store_true", help="digits, LeNet-5, 2 stage-1 "
                   "configurations, 2 λ values, few epochs and evaluations")
    p.add_argument("--dry-run", action="store_true", help="print the cells and trial counts")
    p.add_argument("--name", help="the sweep's name: its MLflow experiment is impactx/NAME "
                   "(default: --out's folder name and a hash of its path)")
    p.add_argument("--restart", action="store_true", help="start afresh on an --out that holds "
                   "a sweep with other settings; its files move to <out>/previous/<time>/")
    p.add_argument("--models", nargs="+", help=f"default: {' '.join(PAPER_MODELS)}")
    p.add_argument("--datasets", nargs="+", help=f"default: {' '.join(PAPER_DATASETS)}")
    p.add_argument("--stage2-space", choices=("lambda", "full"), default="lambda",
                   help="stage 2 over λ on the stage-1 winner (default), or over λ × batch size "
                   "× learning rate (the validation fraction stays M's: stage 2 keeps its split)")
    p.add_argument("--search", choices=SEARCHES, default="grid", help="grid: the paper's Table 1 "
                   "grid (default); optuna: --num-samples points of the same values, seeded TPE")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="fifo", help="asha: stop trials "
                   "whose best validation accuracy trails at 1, 3, 9, … epochs (default fifo: "
                   "every trial runs all its epochs)")
    p.add_argument("--num-samples", type=positive_int, default=SearchSpec.num_samples,
                   help="optuna: trials per stage (default %(default)s; a stage whose grid is "
                   "no larger runs its grid)")
    p.add_argument("--max-concurrent", type=positive_int, help="optuna: trials at once (default: "
                   "as many as the cluster fits; fewer lets TPE learn from more results)")
    p.add_argument("--grace-period", type=positive_int, default=SearchSpec.grace_period,
                   help="asha: epochs before a trial can be stopped (default %(default)s)")
    p.add_argument("--reduction-factor", type=float, default=SearchSpec.reduction_factor,
                   help="asha: 1 in this many trials goes on at each rung (default %(default)s)")
    # Requests, not what happens to be up when the driver starts (docs/sweeps.md, "Resources"):
    # an autoscaling cluster is asked for the nodes; a fixed one clamps, in one line.
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, help="fractions allowed (default: 1 when the "
                   "cluster has a GPU or its autoscaler says it may launch GPU nodes, 0.5 in "
                   "--smoke, else 0); a GPU cluster: --gpus-per-trial 1 --map-workers N")
    p.add_argument("--map-workers", type=int, help="SHAP map workers (default: one per GPU the "
                   "cluster has or its autoscaler may launch, else one per CPU)")
    p.add_argument("--gpus-per-map-worker", type=float, help="GPUs per SHAP map worker (default: "
                   "as --gpus-per-trial's default, 1 where GPUs are)")
    p.add_argument("--max-failures", type=int, default=0, help="retries of a crashed trial")
    p.add_argument("--tracking-outage-limit", type=float, default=10.0, metavar="MIN",
                   help="minutes the MLflow server may stay unreachable (training goes on, the "
                   "records wait in <out>/tracking) before the sweep stops, resumable "
                   "(default %(default)s)")
    p.add_argument("--allow-failures", action="store_true", help="exit 0 even when trials "
                   "failed (the sweep always goes on without them)")
    p.add_argument("--strict", action="store_true", help="refuse unreadable image files in "
                   "an imagefolder: dataset (default: skip them with a warning naming each)")
    p.add_argument("--morf-images", type=int, help="test images for the MoRF comparison "
                   "(default 200; smoke 50; 0 skips it)")
    # checked by options_from (and --dry-run): eval.road's names, without importing torch here
    p.add_argument("--replacement", nargs="+", metavar="{noise,blur,road}",
                   default=list(DEFAULT_REPLACEMENTS), help="what replaces removed regions in "
                   "the MoRF/LeRF curves: noise (the paper's; default), blur, road (ROAD's noisy "
                   "linear imputation); several give a comparison each")
    p.add_argument("--comparison", nargs="+", choices=tuple(COMPARABLE_METHODS),
                   default=list(COMPARISON_METHODS), help="methods trained once on the stage-1 "
                   "winner's hyperparameters (default: abn wae, the paper's); impactx_single adds "
                   "single-stage IMPACTX with stage 2's λ, which recomputes the maps of 1/E of "
                   "the training set after every epoch (--refresh-every E)")
    # Every other RunConfig flag, defined once with `impactx`'s (defaults: 30 epochs, 2000
    # evaluations; --smoke: 3 and 100).
    add_config_flags(p, exclude=NOT_FLAGS)
    return p.parse_args(argv)


def check_out_outlives_the_job(out: Path) -> None:
    """A Ray job runs in a copy of ``--working-dir`` that Ray deletes with its session: a relative
    ``--out`` would put the sweep (checkpoints, maps, the embedded MLflow store) there."""
    if os.environ.get(JOB_ENV_VAR) and not out.is_absolute():
        raise UserError(f"--out {out} is relative, and this runs as a Ray job: it would land in "
                        f"the job's temporary working directory ({Path.cwd()}) and be lost with "
                        "the Ray session; pass an absolute path on storage that outlives the "
                        "job, e.g. --out $HOME/impactx-runs/sweep (shared storage on a "
                        "multi-node cluster)")


def check_data_outlives_the_job(data_root: str | None, datasets: list[str]) -> None:
    """In a Ray job a relative data path resolves inside the job's temporary working directory:
    refused (like a relative ``--out``) for every dataset read from files. Only the driver reads
    it: trials, map workers and the MoRF task get the cell's data from the driver through Ray's
    object store, so it need not be on shared storage."""
    if not os.environ.get(JOB_ENV_VAR):
        return
    root = data_root or "./data"  # RunConfig's default
    reads_root = any(d != "digits" and not d.startswith("imagefolder:") for d in datasets)
    paths = [("--data-root", root)] if reads_root else []
    paths += [("--datasets", d) for d in datasets if d.startswith("imagefolder:")]
    for flag, path in paths:
        if Path(path.removeprefix("imagefolder:")).is_absolute():
            continue
        raise UserError(f"{flag} {path} is relative, and this runs as a Ray job: it would resolve "
                        f"in the job's temporary working directory ({Path.cwd()}); pass an "
                        "absolute path the driver's node can read (trials and map workers get the "
                        "data from the driver through Ray's object store, never from this path)")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
        check_out_outlives_the_job(args.out)
        models = args.models or (SMOKE["models"] if args.smoke else list(PAPER_MODELS))
        datasets = args.datasets or (SMOKE["datasets"] if args.smoke else list(PAPER_DATASETS))
        cell_list = cells(tuple(models), tuple(datasets))
        check_data_outlives_the_job(getattr(args, "data_root", None), list(datasets))
        args.search_spec = SearchSpec(args.search, args.scheduler, args.num_samples,
                                      args.max_concurrent, args.grace_period,
                                      args.reduction_factor, getattr(args, "seed", None) or 0)
        preset = SMOKE if args.smoke else FULL
        # epochs per trial, per stage: ASHA's grace period must fit both (checked before Ray)
        args.trial_epochs = getattr(args, "epochs", None) or preset["epochs"]
        args.trial_epochs2 = getattr(args, "stage2_epochs", None) or args.trial_epochs
        args.search_spec.check_epochs(args.trial_epochs)
        args.search_spec.check_epochs(args.trial_epochs2, "--stage2-epochs")
        if args.dry_run:
            return dry_run(args, cell_list)
        return run(args, cell_list)
    except UserError as e:
        print(f"full_grid.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk under a write not made through impactx_ray.io
        if disk_full_line(e) is None:
            raise
        print(f"full_grid.py: error: {disk_full_line(e)}", file=sys.stderr)
        return 2


def dry_run(args: argparse.Namespace, cell_list: list) -> int:
    """Check the names, say which data is missing, print every stage's trial count; no Ray."""
    from impactx_ray.data import check_data_present, check_dataset_name
    from impactx_ray.eval.road import REPLACEMENTS
    from impactx_ray.models import check_backbone_name

    for cell in cell_list:
        check_backbone_name(cell.model)
        check_dataset_name(cell.dataset)
    unknown = [r for r in args.replacement if r not in REPLACEMENTS]
    if unknown:
        raise UserError(f"--replacement: unknown {unknown[0]!r}; use one or more of "
                        f"{', '.join(REPLACEMENTS)}")
    search: SearchSpec = args.search_spec
    small = args.smoke and search.search == "grid"
    if search.search == "grid":
        print("\n".join(plan(cell_list, args.smoke, args.stage2_space == "full",
                             comparison=tuple(args.comparison))))
    else:
        print(f"{len(cell_list)} cells; Optuna samples Table 1's values")
        print("\n".join(f"  {c.name}: model={c.model} dataset={c.dataset}" for c in cell_list))
    print("\n".join(budget(cell_list, search, small=small, full_stage2=args.stage2_space == "full",
                           epochs=args.trial_epochs, stage2_epochs=args.trial_epochs2,
                           comparison=tuple(args.comparison))))
    root = getattr(args, "data_root", "./data")
    missing = 0
    for name in dict.fromkeys(c.dataset for c in cell_list):
        try:
            check_data_present(name, root, getattr(args, "image_size", 32))
            print(f"data {name}: present")
        except UserError as e:
            missing += 1
            print(f"data {name}: {e}")
    if missing and not getattr(args, "download", False):
        print(f"{missing} dataset(s) missing: put them in place, or pass --download, before "
              "the real run (it stops before starting Ray otherwise)")
    return 0


def run(args: argparse.Namespace, cell_list: list) -> int:
    from impactx_ray.sweep.options import options_from
    from impactx_ray.sweep.pipeline import claim_out, run_sweep
    from impactx_ray.sweep.tracking import tracking_uri

    preset = SMOKE if args.smoke else FULL
    base = {"epochs": preset["epochs"], "max_evals": preset["max_evals"], **config_overrides(args)}
    morf_images = preset["morf_images"] if args.morf_images is None else args.morf_images
    # Absolute: trials run in their own working directories.
    base["data_root"] = str(Path(base.get("data_root", "./data")).resolve())
    opts = options_from(  # validates every value before Ray starts
        args.out, cell_list, smoke=args.smoke, full_stage2=args.stage2_space == "full",
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial or 0.0,
        map_workers=args.map_workers, gpus_per_map_worker=args.gpus_per_map_worker,
        max_failures=args.max_failures, morf_images=morf_images,
        tracking_outage_limit=args.tracking_outage_limit,
        name=args.name, restart=args.restart, search=args.search_spec, strict=args.strict,
        replacements=tuple(args.replacement), comparison=tuple(args.comparison), **base)
    from impactx_ray.config import RunConfig
    from impactx_ray.data import load_dataset
    from impactx_ray.pipeline import check_before_writing

    trains = {}
    for name in dict.fromkeys(c.dataset for c in cell_list):  # missing data: fail before Ray
        # (skipped unreadable files are said by each cell, which loads the data again)
        trains[name] = load_dataset(name, base["data_root"], download=base.get("download", False),
                                    image_size=base.get("image_size", 32), strict=args.strict,
                                    warn=lambda _: None)[0]
    for cell in cell_list:  # the checks `impactx run` makes: mask budget, backbone and weights
        check_before_writing(RunConfig.from_dict({**opts.base, "model": cell.model,
                                                  "dataset": cell.dataset}), trains[cell.dataset])
    del trains

    sweep = claim_out(opts)  # resume only with the same settings: checked before Ray starts
    # Trials checkpoint every epoch (to resume mid-trial), which makes Tune snapshot its
    # experiment state often; its warning about that, every few seconds, would bury the
    # progress lines.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from impactx_ray.capacity import Bundle, autoscaler, check_room, gpus_by_default
    from impactx_ray.explain.actors import init_ray

    init_ray()  # plain ray.init(): RAY_ADDRESS when set, else a local Ray
    if args.gpus_per_trial is None:  # GPUs up now, or that the autoscaler says it may launch
        opts.gpus_per_trial, why = gpus_by_default(args.smoke)
        if why:
            print(f"trials: {why}")
    # what the cluster can never hold stops the sweep here, before its first trial
    check_room("trials", "--gpus-per-trial" if opts.gpus_per_trial else "--cpus-per-trial",
               Bundle(opts.cpus_per_trial, opts.gpus_per_trial), queue=True)
    if args.map_workers and args.gpus_per_map_worker:
        check_room("map workers", "--map-workers", Bundle(1.0, args.gpus_per_map_worker),
                   args.map_workers, queue=autoscaler() is None)  # no autoscaler: clamped later
    rows = run_sweep(opts, sweep)
    uri = tracking_uri(args.out)
    print(f"summary: {args.out / 'summary.md'}")
    # the tracking URI the nodes use (http://mlflow:5000 in compose) may not open from the
    # user's browser: IMPACTX_MLFLOW_UI names the address that does
    ui = os.environ.get(UI_ENV_VAR)
    print(f"MLflow UI: {ui}" if ui else f"compare the trials: mlflow ui --backend-store-uri {uri}"
          if uri.startswith("sqlite") else f"MLflow: {uri}")
    failed = sum(r.get(k, 0) for r in rows for k in ("stage1_failed", "stage2_failed",
                                                     "comparison_failed", "failed_trials"))
    if failed:
        print(f"{failed} trials failed; see the FAILED runs in MLflow"
              + ("" if args.allow_failures else " (exit status 1; --allow-failures: 0)"),
              file=sys.stderr)
        return 0 if args.allow_failures else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
