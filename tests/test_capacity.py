"""What a sweep asks the cluster for (impactx_ray/capacity.py), on described clusters: nodes up
now, an autoscaler that publishes its node types (v2), one that does not (v1), none. Ray itself is
replaced by the cluster's description; the simulated clusters of test_multinode.py run it live."""

import json
import time

import pytest

from impactx_ray import capacity
from impactx_ray.capacity import Autoscaler, Bundle, check_room, make_room
from impactx_ray.errors import UserError

GPU_WORKER = Bundle(1.0, 1.0)


@pytest.fixture
def cluster(monkeypatch):
    """``cluster(nodes, scaler)``: live nodes (resource dicts) and the autoscaler (or None); the
    requests made of the autoscaler are recorded in the list it returns."""
    def describe(nodes, scaler):
        asked = []
        monkeypatch.setattr(capacity.ray, "nodes",
                            lambda: [{"Alive": True, "Resources": n} for n in nodes])
        total = {}
        for n in nodes:
            for k, v in n.items():
                total[k] = total.get(k, 0) + v
        monkeypatch.setattr(capacity.ray, "cluster_resources", lambda: total)
        monkeypatch.setattr(capacity, "autoscaler", lambda: scaler)
        monkeypatch.setattr(capacity, "ask_autoscaler", asked.append)
        return asked
    return describe


HEAD = {"CPU": 8}
GPU_NODE = {"CPU": 16, "GPU": 2}


def test_a_request_that_fits_now_is_kept_and_asks_nothing(cluster):
    asked = cluster([HEAD, GPU_NODE, GPU_NODE], Autoscaler(None))
    room = make_room("map workers", "--map-workers", GPU_WORKER, 4, print)
    assert room.count == 4 and room.asked_at is None and asked == []


def test_without_an_autoscaler_workers_are_clamped_in_one_line(cluster):
    cluster([HEAD, GPU_NODE], None)
    said = []
    room = make_room("map workers", "--map-workers", GPU_WORKER, 8, said.append)
    assert room.count == 2
    assert said == ["--map-workers 8: the Ray cluster (CPU 24, GPU 2) holds 2 map workers of "
                    "CPU 1, GPU 1 each and has no autoscaler; using 2"]
    # trials queue for the two slots instead: nothing is clamped or said
    said.clear()
    assert make_room("trials", "--gpus-per-trial", GPU_WORKER, 12, said.append,
                     queue=True).count == 2 and said == []


def test_without_an_autoscaler_a_gpu_request_on_cpu_nodes_is_refused_before_any_work(cluster):
    cluster([HEAD], None)
    with pytest.raises(UserError, match=r"^--gpus-per-trial: the Ray cluster \(CPU 8\) cannot "
                       r"place one of the trials \(CPU 1, GPU 1 each\), and has no autoscaler"):
        check_room("trials", "--gpus-per-trial", GPU_WORKER, queue=True)


def test_an_autoscaler_is_asked_for_the_rest_and_the_wait_is_said(cluster):
    asked = cluster([HEAD], Autoscaler(None))  # v1: its node types unknown, no GPU node up
    said = []
    room = make_room("map workers", "--map-workers", GPU_WORKER, 8, said.append)
    assert room.count == 8 and asked == [[{"CPU": 1.0, "GPU": 1.0}] * 8]
    assert said == ["map workers: 0 of 8 (CPU 1, GPU 1 each) fit on the nodes up now; asked the "
                    "autoscaler for the rest"]
    room.asked_at -= 61  # a minute later
    assert room.waiting_line("GPU map workers", 2) == \
        "waiting for 8 GPU map workers: 2 placed, autoscaler asked 1 min ago"
    room.release()
    assert asked[-1] == [] and room.asked_at is None  # withdrawn: idle nodes may go


def test_beyond_what_the_autoscaler_may_ever_launch_is_refused_in_one_line(cluster):
    v2 = Autoscaler(((HEAD, 0), (GPU_NODE, 4)))  # at most 4 nodes of 2 GPUs: 8 workers
    asked = cluster([HEAD], v2)
    assert v2.may_hold(GPU_WORKER) == 8 and v2.may_have_gpus()
    with pytest.raises(UserError) as e:
        check_room("map workers", "--map-workers", GPU_WORKER, 16)
    assert str(e.value) == ("--map-workers 16: the Ray cluster's autoscaler can never hold more "
                            "than 8 map workers of CPU 1, GPU 1 each (its node types and their "
                            "maximum counts); ask for at most 8")
    check_room("map workers", "--map-workers", GPU_WORKER, 8)  # 8 is fine
    # trials beyond it queue, and the autoscaler is asked for no more than it may hold
    make_room("trials", "--gpus-per-trial", GPU_WORKER, 180, print, queue=True)
    assert len(asked[-1]) == 8
    with pytest.raises(UserError, match="no node type of the Ray cluster's autoscaler can hold"):
        check_room("trials", "--gpus-per-trial", Bundle(1.0, 4.0), queue=True)


def test_gpus_by_default(cluster):
    cluster([HEAD, GPU_NODE], None)
    assert capacity.gpus_by_default() == (1.0, None)
    assert capacity.gpus_by_default(smoke=True) == (0.5, None)
    cluster([HEAD], Autoscaler(((GPU_NODE, 4),)))  # v2, a GPU group resting at zero
    assert capacity.gpus_by_default()[0] == 1.0
    cluster([HEAD], Autoscaler(None))  # v1 at zero GPU nodes: cannot tell, says so
    gpus, why = capacity.gpus_by_default()
    assert gpus == 0.0 and "pass --gpus-per-trial 1" in why
    cluster([HEAD], None)  # a CPU cluster
    assert capacity.gpus_by_default() == (0.0, None)


@pytest.mark.parametrize("types, found", [
    ({"a" * 56: "node_" + "a" * 56}, False),  # a local Ray: the read-only provider's node types
    ({"a" * 56: "ray.head.default", "b" * 56: "gpu"}, True),  # the cluster launcher / KubeRay
])
def test_an_autoscaler_is_told_from_a_local_ray_by_its_node_types(monkeypatch, types, found):
    report = {"time": time.time(), "autoscaler_report": {"node_type_mapping": types}}
    monkeypatch.setattr("ray.experimental.internal_kv._internal_kv_get",
                        lambda key: json.dumps(report).encode())
    monkeypatch.setattr("ray._private.state.state.get_cluster_config", lambda: None)
    assert (capacity.autoscaler() is not None) is found
    report["time"] -= 600  # a report nobody has refreshed: no autoscaler runs
    assert capacity.autoscaler() is None
