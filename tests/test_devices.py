"""The device a step runs on: as asked, the GPU Ray gave it, and never a silent CPU run while it
holds a Ray GPU that torch cannot use (here: a fake GPU on a CPU-only machine)."""

import pytest
import torch

from impactx_ray.devices import cuda_problem, resolve_device, worker_device
from impactx_ray.errors import UserError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(),
                             reason="needs a torch that cannot use CUDA (the tests fake a GPU torch cannot reach)")


def test_a_worker_without_a_ray_gpu_runs_on_the_cpu_and_an_explicit_device_is_kept():
    assert worker_device("auto", [], "a trial") == torch.device("cpu")
    assert worker_device("cpu", [0], "a trial") == torch.device("cpu")  # --device cpu on a GPU


@no_cuda
def test_holding_a_ray_gpu_torch_cannot_use_is_one_line_naming_it():
    with pytest.raises(UserError) as e:
        worker_device("auto", [0], "trial t1 (impactx) on node gpu-7 (abc)")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert msg.startswith("trial t1 (impactx) on node gpu-7 (abc) holds Ray GPU 0, but torch cannot use it")
    assert f"torch {torch.__version__}" in msg and msg.endswith("or pass --device cpu")
    with pytest.raises(UserError, match="--device cuda was asked for.*torch"):
        resolve_device("cuda")
    assert torch.__version__ in cuda_problem() and "\n" not in cuda_problem()


@pytest.fixture(scope="module")
def fake_gpu_ray():
    """A local Ray whose one node declares a GPU that this CPU-only torch cannot use."""
    import os
    from pathlib import Path

    import ray

    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=2, num_gpus=1, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


@no_cuda
@pytest.mark.slow
def test_a_ray_task_given_a_fake_gpu_stops_instead_of_running_on_the_cpu(fake_gpu_ray):
    ray = fake_gpu_ray
    from impactx_ray.explain.actors import ray_device

    on_gpu = ray.remote(num_gpus=1, max_retries=0)(lambda d: str(ray_device(d, "the test task")))
    assert ray.get(on_gpu.remote("cpu")) == "cpu"  # asked for the CPU: runs there
    with pytest.raises(ray.exceptions.RayTaskError) as e:
        ray.get(on_gpu.remote("auto"))
    assert isinstance(e.value.cause, UserError)
    assert "the test task on node " in str(e.value.cause) and "holds Ray GPU 0" in str(e.value.cause)
    no_gpu = ray.remote(num_gpus=0)(lambda: str(ray_device("auto", "a CPU task")))
    assert ray.get(no_gpu.remote()) == "cpu"


@no_cuda
@pytest.mark.slow
def test_map_workers_on_a_fake_gpu_stop_with_one_line_or_run_on_the_cpu_when_asked(fake_gpu_ray, tmp_path):
    from functools import partial

    from impactx_ray.explain import ExplainSettings, MapStore, compute_store, fully_masked
    from impactx_ray.explain.actors import compute_store_ray

    from tolerances import assert_maps_close, logit_scale
    from toys import TinyNet

    settings = ExplainSettings(max_evals=40, masker="blur(8,8)", batch_size=20, seed=0)
    x, y = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])

    def store(name):
        return MapStore.create_or_open(tmp_path / name, meta=settings.store_meta("c" * 64, "d" * 64, (32, 32)),
                                       num_maps=4, map_shape=(32, 32, 3), shard_size=2)

    build = partial(TinyNet, gain=20)  # maps well above its logits' rounding (tolerances.py)
    refused = store("auto")
    with pytest.raises(UserError) as e:
        compute_store_ray(refused, build, x, y, settings, workers=1, gpus_per_worker=1, progress=False)
    assert len(str(e.value).splitlines()) == 1 and "a SHAP map worker on node" in str(e.value)
    assert "holds Ray GPU 0" in str(e.value) and not refused.is_complete()
    on_cpu = store("cpu")  # --device cpu: the worker holds the GPU and computes on its CPU
    compute_store_ray(on_cpu, build, x, y, settings, workers=1, gpus_per_worker=1, device="cpu",
                      progress=False)
    here, model = store("here"), build().eval()
    compute_store(here, model, x, y, settings, progress=False)
    assert_maps_close(on_cpu.load(), here.load(), logit_scale(model, x, fully_masked(x, settings.masker)))
