"""The session's shared cluster and finished sweep (the ``submitted_sweep`` fixture, conftest.py):
one smoke sweep submitted as a Ray job to a simulated multi-node GPU cluster with token auth (a
head with no GPU, two worker nodes declaring one GPU each), logging to a real MLflow server."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from cluster import MlflowServer, MultiNodeCluster

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--smoke", "--max-evals", "32", "--comparison", "abn", "wae", "impactx_single",
         "--refresh-every", "3"]
# the GPU-cluster preset, on GPUs the worker nodes declare: --device cpu runs the work on CPUs
GPU_PRESET = ["--gpus-per-trial", "1", "--map-workers", "2", "--gpus-per-map-worker", "1",
              "--device", "cpu"]
GPU_NODES = [{"num_cpus": 1, "num_gpus": 1}] * 2


class SubmittedSweep:
    """``with SubmittedSweep(tmp) as s:`` ``s.cluster`` (its ``env`` is a user's shell for it,
    ``workers`` its GPU nodes' ids),
    ``s.uri`` (the MLflow server), ``s.out`` (the sweep's ``--out``) and ``s.job`` (the finished
    ``ray job submit``, its output). A failed submission is kept in ``s.job`` for the test to show."""

    def __init__(self, root: Path) -> None:
        self.root, self.out = root, root / "job-sweep"
        self._stack = ExitStack()

    def __enter__(self) -> SubmittedSweep:
        try:
            self.cluster = self._stack.enter_context(MultiNodeCluster(self.root / "cluster",
                                                                      GPU_NODES))
            self.uri = self._stack.enter_context(MlflowServer(self.root / "mlflow"))
            self.job = subprocess.run(
                [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address",
                 self.cluster.dashboard, "--working-dir", ".", "--runtime-env-json",
                 json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": self.uri}}), "--", "python",
                 "sweeps/full_grid.py", *SMOKE, *GPU_PRESET, "--out", str(self.out)],
                cwd=ROOT, env=self.cluster.env, capture_output=True, text=True, timeout=900)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
