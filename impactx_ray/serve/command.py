"""``impactx serve``: a run's model, or a registered one, over HTTP on Ray Serve until Ctrl-C.

Attaches to the Ray cluster in ``RAY_ADDRESS`` when set (the replicas go where Ray places them),
else starts a local Ray. The HTTP proxy listens on ``--host``/``--port``, unless Serve already
runs on the cluster: it keeps its proxy's address then, and the command says where that is.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from impactx_ray.errors import UserError


def model_source(args: argparse.Namespace) -> tuple[dict[str, str], str]:
    """(what the replicas load, how to name it), checked here before Ray starts."""
    if args.out is not None:
        from impactx_ray.predict import run_checkpoint

        path = run_checkpoint(args.out, args.method).resolve()
        return {"checkpoint": str(path)}, f"{args.method} model of run {args.out}"
    if not args.model.startswith(("models:/", "runs:/")):
        raise UserError(f"--model {args.model}: give a registered model as models:/<name>/<version> "
                        "(or runs:/<run id>/<name>)")
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise UserError(f"--model {args.model}: set MLFLOW_TRACKING_URI to the tracking server that holds it")
    return {"model_uri": args.model}, args.model


def proxy_note(asked: tuple[str, int], running: tuple[str, int]) -> str | None:
    """One line when Serve's proxy is not where it was asked to be: Serve already ran on the
    cluster with other HTTP options, and Serve never changes those of a running proxy."""
    if tuple(asked) == tuple(running):
        return None
    return (f"impactx serve: Serve already runs on this cluster with its HTTP proxy at "
            f"{running[0]}:{running[1]}, so --host {asked[0]} --port {asked[1]} do not apply; the model "
            f"is served there (to move it, stop Serve on the cluster first: serve shutdown)")


def serve_command(args: argparse.Namespace) -> None:
    source, what = model_source(args)
    from ray import serve

    from impactx_ray.explain.actors import init_ray
    from impactx_ray.serve.deployment import ImpactxDeployment

    init_ray()
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI",) if k in os.environ}
    serve.start(http_options={"host": args.host, "port": args.port})
    from ray.serve.context import _get_global_client  # the running proxy's options: no public API

    running = _get_global_client().http_config
    host, port = running.host, running.port
    note = proxy_note((args.host, args.port), (host, port))
    if note:
        print(note, file=sys.stderr, flush=True)
    app = ImpactxDeployment.options(
        num_replicas=args.replicas,
        ray_actor_options={"num_cpus": 1, "num_gpus": args.gpus_per_replica,
                           "runtime_env": {"env_vars": env}},
    ).bind(source, args.device, args.max_batch_size, args.batch_wait_ms / 1000.0)
    serve.run(app, name="impactx", route_prefix="/")
    print(f"serving the {what} at http://{host}:{port}/ ({args.replicas} replica"
          f"{'s' * (args.replicas > 1)}); POST an image; Ctrl-C stops", flush=True)
    stop = threading.Event()
    # Ctrl-C and SIGTERM stop it alike; SIGINT handled explicitly, since a process started in the
    # background of a script inherits SIGINT ignored and Python then raises no KeyboardInterrupt
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        # this application only: Serve itself may hold others on a shared cluster (and a local
        # Ray started here ends with this process)
        serve.delete("impactx")
        print("stopped serving", flush=True)
