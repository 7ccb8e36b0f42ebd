"""Fetch, once, what a sweep reads from the internet: the timm weights and the torchvision data sets.

    HF_HOME=/shared/hf python docker/preload.py --data-root /shared/data
    HF_HOME=/shared/hf HF_HUB_OFFLINE=1 python docker/preload.py --data-root /shared/data   # check only

Why: without it every GPU worker downloads the pretrained weights of its trials itself, and an
air-gapped cluster fails every timm cell. With ``HF_HOME`` on shared storage the weights are
fetched here once (Hugging Face's cache, ``$HF_HOME/hub``), and the sweep then runs with
``HF_HUB_OFFLINE=1``: every node reads them from the cache and nothing goes to the hub. The data
sets land in ``--data-root`` (torchvision's folders), which the sweep reads with the same
``--data-root`` and no ``--download``. Run with ``HF_HUB_OFFLINE=1`` it fetches nothing and exits
non-zero naming what is missing. Defaults: the paper's models and data sets, what a full sweep
runs; ``lenet5`` has no pretrained weights and ``digits`` is embedded, so they need nothing.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from impactx_ray.sweep.spaces import PAPER_DATASETS, PAPER_MODELS

    p = argparse.ArgumentParser(prog="preload.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, help="where the sweep's --data-root will point")
    p.add_argument("--models", nargs="*", default=list(PAPER_MODELS), help="default: %(default)s")
    p.add_argument("--datasets", nargs="*", default=list(PAPER_DATASETS), help="default: %(default)s")
    args = p.parse_args(argv)
    if not os.environ.get("HF_HOME"):
        print("note: HF_HOME is not set, so the weights go to ~/.cache/huggingface of this machine only; "
              "set HF_HOME to a directory on the shared volume", file=sys.stderr)

    # Imported after parsing: --help answers without loading torch.
    import timm
    from huggingface_hub import constants

    from impactx_ray.data.datasets import load_dataset
    from impactx_ray.models.timm_backbones import TIMM_NAMES

    failed = []
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    for model in args.models:
        name = TIMM_NAMES.get(model, model)
        if model == "lenet5":
            continue
        try:
            timm.create_model(name, pretrained=True)
            print(f"weights  {model} ({name}): in {constants.HF_HUB_CACHE}")
        except Exception as e:  # one line per missing thing; the exit status sums them up
            failed.append(f"weights of {model} ({name}): {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    for dataset in args.datasets:
        if dataset == "digits" or dataset.startswith("imagefolder:"):
            continue
        try:
            load_dataset(dataset, args.data_root, download=not offline)
            print(f"data set {dataset}: in {args.data_root}")
        except Exception as e:
            failed.append(f"data set {dataset}: {str(e).splitlines()[0][:200]}")
    for line in failed:
        print(f"missing  {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
