"""Images stepped in groups (``explain/lockstep.py``): the same maps however they are grouped, and
two groups interleaved so that one's host work can run while the device computes the other's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from impactx_ray.explain import lockstep
from impactx_ray.explain.batched import BatchedPartition


def _engine(hwc, **kw) -> BatchedPartition:
    weight = torch.randn(int(np.prod(hwc)), 3, generator=torch.Generator().manual_seed(0))
    return BatchedPartition(lambda x: x.flatten(1) @ weight, hwc, masker="blur(2,2)", max_evals=300,
                            batch_size=20, **kw)


@pytest.mark.parametrize("host_masking", [True, False])
@pytest.mark.parametrize("groups", [2, 3])
def test_maps_do_not_depend_on_the_grouping(monkeypatch, groups, host_masking) -> None:
    hwc = (12, 12, 3)
    x = np.random.default_rng(2).random((7, *hwc), dtype=np.float32)
    y = np.array([0, 1, 2, 0, 1, 2, 0])
    one = _engine(hwc, forward_batch=50)
    split = _engine(hwc, forward_batch=50)
    split.host_masking = one.host_masking = host_masking
    monkeypatch.setattr(split, "groups", lambda n: groups)
    assert np.array_equal(one.explain(x, y), split.explain(x, y))


def test_groups_alternate_each_step_queued_before_the_other_finishes(monkeypatch) -> None:
    seen = []
    for name in ("launch", "finish"):
        real = getattr(lockstep.LockstepGroup, name)

        def logged(self, real=real, name=name):
            seen.append((name, len(self.x)))  # the groups below hold 2 and 3 images
            return real(self)

        monkeypatch.setattr(lockstep.LockstepGroup, name, logged)
    engine = _engine((8, 8, 1), forward_batch=16)
    monkeypatch.setattr(engine, "groups", lambda n: 2)
    engine.explain(np.random.default_rng(0).random((5, 8, 8, 1), dtype=np.float32), np.zeros(5, dtype=int))
    assert seen[:4] == [("launch", 2), ("launch", 3), ("finish", 2), ("launch", 2)]
    # every finish of a group comes after the other group's step was queued (while both run)
    finishes = [i for i, (what, _) in enumerate(seen) if what == "finish"]
    assert len(finishes) > 4 and all(seen[i - 1][0] == "launch" for i in finishes)


def test_two_groups_only_on_a_gpu_and_only_when_each_fills_a_forward_call() -> None:
    hwc = (8, 8, 3)
    gpu = _engine(hwc, forward_batch=4096, device="cuda", max_mask_bytes=1 << 20)  # touches no GPU
    assert gpu.groups(410) == 2  # 410 images x 20 masks = 8200 masks a step: two full calls
    assert gpu.groups(400) == 1
    assert _engine(hwc, forward_batch=4096).groups(10_000) == 1  # a CPU
