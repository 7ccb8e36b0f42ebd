"""Command-line flags shared by ``impactx`` (cli.py) and ``sweeps/full_grid.py``: one definition
of every RunConfig flag, and an argparse parser that fails on one line with exit status 2.
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from impactx_ray.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors as a ``UserError`` (one line, exit status 2), not a usage block."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


# (flag, RunConfig field, type, help). Defaults are suppressed so that a sub-command can tell what
# the user passed from what comes from the run's saved config.json (or the sweep's defaults).
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
    ("--precision", "precision", str, "map forward precision: fp32 (default, shap-exact), bf16 or fp16"),
    ("--compile", "compile", str, "torch.compile the map engine's forward: auto (default), on or off"),
    ("--seed", "seed", int, "seed of the split, initialisation, shuffling and shap's tie-breaks"),
    ("--pretrained", "pretrained", boolean, "true/false: start from pretrained weights (timm default: true)"),
    ("--weights", "weights", str, "local pretrained weights file (timm format)"),
    ("--image-size", "image_size", int, "imagefolder images are resized to this (default 32)"),
    ("--input-size", "input_size", int, "model input size for timm backbones (default: timm's)"),
    ("--data-root", "data_root", str, "where datasets live (default ./data)"),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N"),
    ("--refresh-every", "refresh_every", int, "single-stage training: recompute each image's "
     "map every E epochs (1/E of them after each epoch)"),
]
CONFIG_FIELDS = frozenset(dest for _, dest, _, _ in CONFIG_FLAGS) | {"download"}


def add_config_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """Add every RunConfig flag (but the fields in ``exclude``) with suppressed defaults, plus
    ``--no-pretrained`` and ``--download``."""
    for flag, dest, typ, help_text in CONFIG_FLAGS:
        if dest not in exclude:
            parser.add_argument(flag, dest=dest, type=typ, default=argparse.SUPPRESS,
                                help=help_text)
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                        default=argparse.SUPPRESS,
                        help="train the backbone from random initialisation")
    parser.add_argument("--download", dest="download", action="store_true",
                        default=argparse.SUPPRESS, help="download the dataset if it is missing")


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig fields the user passed on the command line."""
    return {k: v for k, v in vars(args).items() if k in CONFIG_FIELDS}
