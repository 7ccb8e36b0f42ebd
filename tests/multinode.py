"""A simulated multi-node GPU cluster on one machine, for the cluster tests: run as a process of
its own (``MultiNodeCluster`` in cluster.py starts it), which holds a ``ray.cluster_utils.Cluster``
-- a head with no GPU and worker nodes that declare GPUs (``--device cpu`` runs their work on the
CPU) -- on free ports, in a temp dir of its own, with Ray's token auth on (from the environment).

    python tests/multinode.py SPEC.json READY.json

SPEC: {"temp_dir", "ports": {flag: port}, "head_cpus", "workers": [{"num_cpus", "num_gpus"}]}.
Writes READY (the GCS address, the dashboard URL, the worker nodes' ids), then reads commands
on stdin, one per line: ``remove I`` (kill worker node I's processes, as a lost machine),
``quit``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_path: str, ready_path: str) -> None:
    from ray.cluster_utils import Cluster

    spec = json.loads(Path(spec_path).read_text())
    ports = spec["ports"]
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": spec["head_cpus"], "num_gpus": 0, "temp_dir": spec["temp_dir"],
        "gcs_server_port": ports["--port"], "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": ports["--dashboard-port"],
        "ray_client_server_port": ports["--ray-client-server-port"]})
    # A temp dir per node, as on separate machines: nodes sharing one would share the runtime
    # env's working_dir files, which each node's agent deletes when it no longer needs them.
    workers = [cluster.add_node(num_cpus=w["num_cpus"], num_gpus=w["num_gpus"],
                                temp_dir=f"{spec['temp_dir']}-w{i}")
               for i, w in enumerate(spec["workers"])]
    cluster.wait_for_nodes()
    # What `ray start` writes and `ray.init(address="auto")` reads, in the head's own temp dir: a
    # job's supervisor resolves its driver's RAY_ADDRESS from it, and without it would scan the
    # machine's GCS processes, finding any other cluster running there.
    from ray._private.utils import write_ray_address

    write_ray_address(cluster.gcs_address, spec["temp_dir"])
    Path(ready_path).write_text(json.dumps({
        "address": cluster.address, "dashboard": f"http://127.0.0.1:{ports['--dashboard-port']}",
        "workers": [w.node_id for w in workers], "head": cluster.head_node.node_id}))
    for line in sys.stdin:
        command = line.split()
        if command[:1] == ["remove"]:
            cluster.remove_node(workers[int(command[1])], allow_graceful=False)
            print(f"removed {command[1]}", flush=True)
        elif command[:1] == ["quit"]:
            break
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
