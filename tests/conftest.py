"""Shared test setup: offline, quiet, small."""

import os

# Nothing may be downloaded at test time: make huggingface/timm fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def digits():
    """The embedded digits dataset (train, test), loaded once."""
    from impactx_ray.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def submitted_sweep(tmp_path_factory):
    """Made once per pytest session, for every test that needs a finished sweep on a cluster:
    a Ray head with token auth and a real MLflow server (``tests/cluster.py``), and the smoke
    sweep submitted to it with ``ray job submit`` from the repository, as docs/sweeps.md runs it
    (comparison with ABN, WAE and single-stage IMPACTX). Both stay up until the session ends."""
    from shared_sweep import SubmittedSweep

    with SubmittedSweep(tmp_path_factory.mktemp("submitted-sweep")) as sweep:
        yield sweep


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A run directory trained once per session (LeNet-5 on digits, 3 + 3 epochs, 64-evaluation
    maps) with IMPACTX, ABN and WAE, for the tests that use a trained model (predict, serve)."""
    from impactx_ray.cli import main

    out = tmp_path_factory.mktemp("trained") / "run"
    code = main(["run", "--out", str(out), "--model", "lenet5", "--dataset", "digits", "--epochs", "3",
                 "--stage2-epochs", "3", "--max-evals", "64", "--method", "impactx", "abn", "wae", "--quiet"])
    assert code == 0
    return out
