"""The ``impactx`` command: ``run`` does every step; ``stage1``/``explain``/``stage2``/``evaluate``
redo one step on an existing run directory.

Bad input never produces a traceback: ``UserError`` (and argparse's own complaints) become one
line on stderr and exit status 2, and every check runs before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from impactx_ray.errors import UserError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors on one line (no usage block) with exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


# (flag, RunConfig field, type, help). Defaults are suppressed so that sub-commands can tell what
# the user actually passed from what comes from the run's saved config.json.
CONFIG_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--model", "model", str, "backbone: lenet5, mobilenet, mobilenet_v2, efficientnet_b2 or a timm name"),
    ("--dataset", "dataset", str, "digits, cifar10, cifar100, stl10 or imagefolder:PATH"),
    ("--batch-size", "batch_size", int, "batch size of both stages"),
    ("--lr", "lr", float, "learning rate (Adam) of stage 1, and of stage 2 unless --stage2-lr"),
    ("--val-fraction", "val_fraction", float, "fraction of the training set held out for validation"),
    ("--lambda", "lam", float, "λ: weight of the map MSE in stage 2's loss CE + λ·MSE"),
    ("--epochs", "epochs", int, "stage-1 epochs (and stage-2 epochs unless --stage2-epochs)"),
    ("--stage2-epochs", "stage2_epochs", int, "stage-2 epochs"),
    ("--stage2-lr", "stage2_lr", float, "stage-2 learning rate"),
    ("--max-evals", "max_evals", int, "model evaluations per SHAP map (paper: 2000)"),
    ("--masker", "masker", str, "shap.maskers.Image mask value (default blur(H/4,W/4))"),
    ("--shap-batch-size", "shap_batch_size", int, "batch_size of shap's explainer call"),
    ("--engine", "engine", str, "SHAP map engine: batched (default; exact, fast) or shap"),
    ("--seed", "seed", int, "seed of the split, initialisation and shuffling"),
    ("--pretrained", "pretrained", _bool, "true/false: start from pretrained weights (timm default: true)"),
    ("--weights", "weights", str, "local pretrained weights file (timm format)"),
    ("--image-size", "image_size", int, "imagefolder images are resized to this (default 32)"),
    ("--input-size", "input_size", int, "model input size for timm backbones (default: timm's)"),
    ("--data-root", "data_root", str, "where datasets live (default ./data)"),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="impactx", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
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
            continue
        p.add_argument("--out", type=Path, required=name != "run", default=Path("runs/default")
                       if name == "run" else argparse.SUPPRESS, help="run directory")
        for flag, dest, typ, help_flag in CONFIG_FLAGS:
            p.add_argument(flag, dest=dest, type=typ, help=help_flag)
        p.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                       help="train the backbone from random initialisation")
        p.add_argument("--download", dest="download", action="store_true",
                       help="download the dataset if it is missing")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if name in ("run", "explain"):
            p.add_argument("--workers", type=_positive_int, help="compute the SHAP maps on N Ray "
                           "workers (attaches to RAY_ADDRESS when set, else starts a local Ray)")
            p.add_argument("--gpus-per-worker", type=float, help="GPUs per map worker (default: "
                           "1 when the cluster has GPUs, else 0)")
        if name == "run":
            p.add_argument("--method", nargs="+", choices=("baseline", "impactx", "abn", "wae"),
                           help="methods to train besides the baseline (default: impactx)")
        if name == "evaluate":
            p.add_argument("--morf", action="store_true", help="MoRF curves and AOPC of IMPACTX's "
                           "maps, SHAP maps of IMPACTX, ABN maps (if trained) and random maps")
            p.add_argument("--morf-images", type=_positive_int, help="test images for MoRF "
                           "(default 100)")
        if name in ("explain", "stage2"):
            p.add_argument("--checkpoint", type=Path, help="stage-1 checkpoint to use instead of "
                           "the run's own")
        if name == "stage2":
            p.add_argument("--maps", type=Path, help="map store to use instead of the run's own")
    return parser


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    fields = {dest for _, dest, _, _ in CONFIG_FLAGS} | {"download"}
    return {k: v for k, v in vars(args).items() if k in fields}


def _print_result(result: dict[str, Any], out: Path) -> None:
    names = {"baseline": "baseline (A)", "impactx": "IMPACTX", "abn": "ABN", "wae": "WAE"}
    for method, name in names.items():
        if f"{method}_test_accuracy" in result:
            print(f"{name + ' test accuracy:':<27} {result[f'{method}_test_accuracy']:.4f}")
    for method, score in result.get("morf", {}).get("aopc", {}).items():
        print(f"{'AOPC ' + method + ':':<27} {score:.4f}")
    print(f"results: {out / 'result.json'}")


def run_command(args: argparse.Namespace) -> None:
    from impactx_ray.config import RunConfig
    from impactx_ray.runner import Run, load_run_config

    out: Path = args.out
    if args.command == "report":
        from impactx_ray.sweep.report import report

        report(out)
        return
    progress = not getattr(args, "quiet", False)
    overrides = _config_overrides(args)
    if args.command == "run":
        cfg = RunConfig.from_dict(overrides)
        run = Run(cfg, out, progress=progress)
        run.gpus_per_worker = getattr(args, "gpus_per_worker", None)
        methods = tuple(getattr(args, "method", None) or ("impactx",))
        _print_result(run.run_all(workers=getattr(args, "workers", None), methods=methods), out)
        return
    cfg = load_run_config(out, overrides)
    run = Run(cfg, out, progress=progress)
    run.gpus_per_worker = getattr(args, "gpus_per_worker", None)
    run.train_data  # noqa: B018 - load (and check) the data before anything is written
    checkpoint = getattr(args, "checkpoint", None)
    if args.command == "stage1":
        meta = run.stage1()
        run.save_config()
        print(f"stage 1: best val accuracy {meta['val_accuracy']:.4f} (epoch {meta['best_epoch']})"
              f" -> {run.dir.stage1}")
    elif args.command == "explain":
        run.load_stage1(checkpoint)  # validate the checkpoint before touching the store
        store = run.explain(checkpoint, workers=getattr(args, "workers", None))
        run.save_config()
        print(f"maps: {store.num_maps} in {store.path}")
    elif args.command == "stage2":
        meta = run.stage2(checkpoint, getattr(args, "maps", None))
        run.save_config()
        print(f"stage 2: best val accuracy {meta['val_accuracy']:.4f} (epoch {meta['best_epoch']})"
              f" -> {run.dir.stage2}")
    elif args.command == "evaluate":
        _print_result(run.evaluate(morf=getattr(args, "morf", False),
                                   morf_images=getattr(args, "morf_images", 100)), out)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        run_command(args)
    except UserError as e:
        print(f"impactx: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("impactx: interrupted; finished checkpoints and map shards are kept, rerun to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
