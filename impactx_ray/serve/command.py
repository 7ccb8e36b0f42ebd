"""``impactx serve``: a run's model, or a registered one, over HTTP on Ray Serve until Ctrl-C.

Attaches to the Ray cluster in ``RAY_ADDRESS`` when set (the replicas go where Ray places them),
else starts a local Ray. The HTTP proxy listens on ``--host``/``--port``.
"""

from __future__ import annotations

import argparse
import os
import signal
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


def serve_command(args: argparse.Namespace) -> None:
    source, what = model_source(args)
    from ray import serve

    from impactx_ray.explain.actors import init_ray
    from impactx_ray.serve.deployment import ImpactxDeployment

    init_ray()
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI",) if k in os.environ}
    serve.start(http_options={"host": args.host, "port": args.port})
    app = ImpactxDeployment.options(
        num_replicas=args.replicas,
        ray_actor_options={"num_cpus": 1, "num_gpus": args.gpus_per_replica,
                           "runtime_env": {"env_vars": env}},
    ).bind(source, args.device, args.max_batch_size, args.batch_wait_ms / 1000.0)
    serve.run(app, name="impactx", route_prefix="/")
    print(f"serving the {what} at http://{args.host}:{args.port}/ ({args.replicas} replica"
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
