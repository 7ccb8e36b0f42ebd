"""The ``impactx`` command: ``run`` does every step; ``stage1``/``explain``/``stage2``/``evaluate``
redo one step on an existing run directory; ``predict`` and ``serve`` use what was trained.

Bad input never produces a traceback: ``UserError`` (and argparse's own complaints) become one
line on stderr and exit status 2, and every check runs before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from impactx_ray.defaults import DEFAULT_REPLACEMENTS, MORF_IMAGES
from impactx_ray.errors import UserError, disk_full_line
from impactx_ray.flags import OneLineParser, add_config_flags, config_overrides, positive_int
from impactx_ray.heap import keep_heap

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    from impactx_ray.methods import METHODS

    parser = OneLineParser(prog="impactx", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    steps = {
        "run": "train both stages, compute the SHAP maps and report test accuracies",
        "stage1": "redo stage 1 (the plain classifier A) on an existing run directory",
        "explain": "compute (or finish) the SHAP maps of the stage-1 model",
        "stage2": "redo stage 2 (LEP, decoder, classifier with M frozen)",
        "evaluate": "test accuracy of every trained method; --morf adds MoRF/AOPC and figures",
        "report": "summary.md/summary.csv of a run or sweep directory beside the paper's Table 2",
    }
    for name, help_text in steps.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           argument_default=argparse.SUPPRESS)
        if name == "report":
            p.add_argument("--out", type=Path, required=True, help="run or sweep directory")
            add_use_commands(sub)
            continue
        p.add_argument("--out", type=Path, required=name != "run", default=Path("runs/default")
                       if name == "run" else argparse.SUPPRESS, help="run directory")
        add_config_flags(p)
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--strict", action="store_true", help="refuse unreadable image files in "
                       "an imagefolder dataset (default: skip them with a warning naming each)")
        if name in ("run", "explain"):
            p.add_argument("--workers", type=positive_int, help="compute the SHAP maps on N Ray "
                           "workers (attaches to RAY_ADDRESS when set, else starts a local Ray)")
            p.add_argument("--gpus-per-worker", type=float, help="GPUs per map worker (default: "
                           "1 when the cluster has GPUs, else 0)")
        if name == "run":
            p.add_argument("--method", nargs="+", choices=tuple(METHODS),
                           help="methods to train besides the baseline (default: impactx)")
            p.add_argument("--training", choices=("two-stage", "single-stage"),
                           help="how IMPACTX is trained: two-stage (the paper's; default) or "
                           "single-stage (M, LEP, D, C together, maps refreshed every "
                           "--refresh-every epochs): method impactx or impactx_single")
        if name == "evaluate":
            p.add_argument("--morf", action="store_true", help="MoRF curves and AOPC of IMPACTX's "
                           "maps, SHAP maps of IMPACTX, ABN maps (if trained) and random maps")
            p.add_argument("--morf-images", type=positive_int, help="test images for MoRF "
                           f"(default {MORF_IMAGES})")
            p.add_argument("--replacement", nargs="+", choices=("noise", "blur", "road"),
                           help="what replaces removed regions in the MoRF/LeRF curves, one or "
                           "more of noise (the paper's; default), blur, road (ROAD imputation)")
        if name in ("explain", "stage2"):
            p.add_argument("--checkpoint", type=Path, help="stage-1 checkpoint to use instead of "
                           "the run's own")
        if name == "stage2":
            p.add_argument("--maps", type=Path, help="map store to use instead of the run's own")
    return parser


def add_use_commands(sub: Any) -> None:
    """``predict`` and ``serve``: a trained model on images (docs/usage.md, "Use the trained model")."""
    from impactx_ray.methods import METHODS

    methods = tuple(METHODS)
    p = sub.add_parser("predict", help="class, probabilities and the method's own map of image files",
                       description="class, probabilities and the method's own map of image files, "
                       "into <to>/predictions.csv, maps/*.npy and overlays/*.png")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders of them")
    p.add_argument("--out", type=Path, required=True, help="the run directory whose model predicts")
    p.add_argument("--method", choices=methods, default="impactx", help="which trained model (default impactx)")
    p.add_argument("--to", type=Path, help="where to write (default <out>/predictions/<method>)")
    p.add_argument("--shap", action="store_true", help="add the SHAP map of the same model's predicted class "
                   "(the run's explainer settings, batched engine) beside the method's own")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("serve", help="serve a trained model over HTTP on Ray Serve",
                       description="serve a run's model or a registered MLflow model over HTTP on Ray Serve "
                       "(POST image bytes or a JSON array; JSON class, probabilities and map back)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--out", type=Path, help="a run directory (with --method)")
    which.add_argument("--model", help="a registered model, e.g. models:/impactx-lenet5-digits-impactx/1")
    p.add_argument("--method", choices=methods, default="impactx", help="with --out: which model (default impactx)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=positive_int, default=8000, help="port (default 8000)")
    p.add_argument("--replicas", type=positive_int, default=1, help="model replicas (default 1)")
    p.add_argument("--max-batch-size", type=positive_int, default=32,
                   help="requests batched into one forward call at most (default 32)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long a request waits for others to batch with (default 10 ms)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="Ray GPUs per replica (default 0)")
    p.add_argument("--device", default="auto", help="auto (a GPU when the replica has one), cpu, cuda")


def predict_command(args: argparse.Namespace) -> None:
    from impactx_ray.explain import ExplainSettings
    from impactx_ray.predict import run_predictor
    from impactx_ray.predict.files import predict_files
    from impactx_ray.rundir import RunDir
    from impactx_ray.train import resolve_device

    predictor = run_predictor(args.out, args.method, resolve_device(args.device))
    to = args.to or args.out / "predictions" / args.method
    shap = None
    if args.shap:
        shap = ExplainSettings.from_config(RunDir(args.out).load_config({})).explainer_kwargs(predictor.image_size)
    pred = predict_files(predictor, args.inputs, to, shap=shap, progress=not args.quiet)
    print(f"{predictor.describe()}: {len(pred)} images -> {to / 'predictions.csv'}"
          + (f", maps and overlays in {to}" if pred.maps is not None or shap else ""))


def _print_result(result: dict[str, Any], out: Path) -> None:
    from impactx_ray.methods import METHODS

    for method in METHODS.values():
        if f"{method.name}_test_accuracy" in result:
            print(f"{method.title + ' test accuracy:':<27} "
                  f"{result[f'{method.name}_test_accuracy']:.4f}")
    morf = result.get("morf", {})
    for name, score in morf.get("aopc", {}).items():
        print(f"{'AOPC ' + name + ':':<27} {score:.4f}")
    for replacement, methods in morf.get("metrics", {}).items():
        print(f"{replacement}: method, AOPC (MoRF), AUC MoRF, AUC LeRF, SRG [95% CI]")
        for name, m in methods.items():
            print(f"  {name + ':':<20} " + ", ".join(
                f"{m[k]['mean']:.4f} [{m[k]['ci_low']:.4f}, {m[k]['ci_high']:.4f}]"
                for k in ("aopc", "auc_morf", "auc_lerf", "srg")))
    for model, checks in morf.get("sanity", {}).items():
        cascade = checks["cascading_randomization"]
        print(f"sanity {model}: beats random "
              f"{all(v['passed'] for v in checks['random_ranking'].values())}, rank correlation "
              f"after randomization {cascade['final_rank_correlation']:.3f} "
              f"({'passed' if cascade['passed'] else 'FAILED'})")
    print(f"results: {out / 'result.json'}")


def absolute_paths(overrides: dict[str, Any]) -> dict[str, Any]:
    """The user's relative paths made absolute now, while the current directory is the one
    they meant: config.json is read again by later steps, maybe from elsewhere."""
    from impactx_ray.data.datasets import IMAGEFOLDER_PREFIX

    fixed = dict(overrides)
    for key in ("data_root", "weights"):
        if isinstance(fixed.get(key), str):
            fixed[key] = os.path.abspath(os.path.expanduser(fixed[key]))
    dataset = fixed.get("dataset")
    if isinstance(dataset, str) and dataset.startswith(IMAGEFOLDER_PREFIX):
        path = dataset[len(IMAGEFOLDER_PREFIX):]
        if path.strip():
            fixed["dataset"] = IMAGEFOLDER_PREFIX + os.path.abspath(os.path.expanduser(path))
    return fixed


def prepare(args: argparse.Namespace) -> Any:
    """The ``Run`` of a step, its config validated and its data loaded; nothing is written."""
    from impactx_ray.config import RunConfig
    from impactx_ray.rundir import RunDir
    from impactx_ray.runner import Run

    overrides = absolute_paths(config_overrides(args))
    if args.command == "run":
        cfg = RunConfig.from_dict({**absolute_paths({"data_root": RunConfig.data_root}),
                                   **overrides})
    else:
        cfg = RunDir(args.out).load_config(overrides)
    run = Run(cfg, args.out, progress=not getattr(args, "quiet", False),
              workers=getattr(args, "workers", None),
              gpus_per_worker=getattr(args, "gpus_per_worker", None),
              strict=getattr(args, "strict", False))
    run.check_inputs()  # the data is loaded (and checked) before anything is written
    return run


def execute(run: Any, args: argparse.Namespace) -> None:
    """Run the step (under the run directory's lock)."""
    from impactx_ray.methods import METHODS

    out: Path = args.out
    if args.command == "run":
        methods = tuple(getattr(args, "method", None) or ("impactx",))
        if getattr(args, "training", "two-stage") == "single-stage":
            methods = tuple(dict.fromkeys("impactx_single" if m == "impactx" else m
                                          for m in methods))
        result = run.run_all(methods)
        _print_result(result, out)
        if os.environ.get("MLFLOW_TRACKING_URI"):  # the models, registered (docs/usage.md)
            from impactx_ray.serve.registry import register_run

            register_run(out, run.cfg, result, run.data[1].images)
        return
    checkpoint = getattr(args, "checkpoint", None)
    if args.command == "explain":
        store = run.explain(checkpoint)
        run.dir.save_config(run.cfg)
        print(f"maps: {store.num_maps} in {store.path}")
    elif args.command in ("stage1", "stage2"):
        method = METHODS["baseline" if args.command == "stage1" else "impactx"]
        meta = run.train(method, checkpoint, getattr(args, "maps", None))
        run.dir.save_config(run.cfg)
        print(f"{args.command.replace('stage', 'stage ')}: best val accuracy "
              f"{meta['val_accuracy']:.4f} (epoch {meta['best_epoch']}) "
              f"-> {run.dir.checkpoint(method)}")
    elif args.command == "evaluate":
        _print_result(run.evaluate(morf=getattr(args, "morf", False),
                                   morf_images=getattr(args, "morf_images", MORF_IMAGES),
                                   replacements=tuple(getattr(args, "replacement", DEFAULT_REPLACEMENTS))),
                      out)


def run_command(args: argparse.Namespace) -> None:
    if args.command == "predict":
        predict_command(args)
        return
    if args.command == "serve":
        from impactx_ray.serve.command import serve_command

        serve_command(args)
        return
    out: Path = args.out
    if args.command == "report":
        from impactx_ray.report import report

        report(out)
        return
    from impactx_ray.lock import DirLock

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory; choose a directory for the "
                        "run's files")
    if args.command == "run" and not out.exists():
        # Every input is checked before the directory is created; then it is created locked.
        run = prepare(args)
        with DirLock(out, what="run directory", create=True):
            execute(run, args)
        return
    if not out.exists():
        raise UserError(f"{out / 'config.json'} does not exist; run `impactx run --out {out}` "
                        "first")
    # An existing directory is locked before its config.json is read: another command writing
    # it is reported as such, not as whatever half-state it is in. The lock leaves no trace.
    with DirLock(out, what="run directory"):
        execute(prepare(args), args)


def main(argv: list[str] | None = None) -> int:
    keep_heap()  # large tensors reuse freed heap, no page faults per forward (impactx_ray/heap.py)
    try:
        args = build_parser().parse_args(argv)
        run_command(args)
    except UserError as e:
        print(f"impactx: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a full disk under a write not made through impactx_ray.io
        if disk_full_line(e) is None:
            raise
        print(f"impactx: error: {disk_full_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("impactx: interrupted; finished checkpoints and map shards are kept, rerun to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
