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
