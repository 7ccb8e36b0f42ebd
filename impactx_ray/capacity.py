"""What the Ray cluster can hold: now, on its live nodes, and once its autoscaler has grown it.

A sweep's resources are requests (``--gpus-per-trial``, ``--cpus-per-trial``, ``--map-workers``,
``--gpus-per-map-worker``), not what happens to be alive when the driver starts: on an
autoscaling cluster whose GPU group rests at zero, the first trial finds no GPU at all. So a
step asks for what it needs (docs/sweeps.md, "Resources: what a sweep asks the cluster for"):

* it fits on the nodes up now: nothing to do;
* the cluster has an autoscaler: ask it (``request_resources``) and let Ray place the work as the
  nodes come up, saying what is waited for; a request beyond what its node types can ever hold is
  refused before any work, where the autoscaler publishes its node types;
* no autoscaler: clamp to what fits, in one line (none fits: a one-line error).

How an autoscaler is recognised: Ray's v1 autoscaler (the cluster launcher's, KubeRay's default)
writes its report to the GCS key below at every update (a local Ray runs the same monitor over a
read-only provider, told apart by its node types); autoscaler v2 publishes its node groups, with
their maximum counts, as the cluster config.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray

from impactx_ray.errors import UserError

# ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS: the v1 autoscaler's report, rewritten at
# every update (every few seconds); an older one is a monitor that has stopped.
STATUS_KEY = "__autoscaling_status"
STATUS_FRESH_S = 120.0


@dataclass(frozen=True)
class Bundle:
    """The resources one trial, map worker or task asks for (all of them on one node)."""

    cpus: float
    gpus: float = 0.0

    def as_ray(self) -> dict[str, float]:
        return {k: v for k, v in (("CPU", self.cpus), ("GPU", self.gpus)) if v}

    def kind(self) -> str:
        return "GPU" if self.gpus else "CPU"

    def __str__(self) -> str:
        return describe(self.as_ray())


def describe(resources: dict[str, float]) -> str:
    """``CPU 4, GPU 2``: the CPUs and GPUs of a resource dict."""
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items())
                     if k in ("CPU", "GPU") and v) or "no CPU or GPU"


def fits(node: dict[str, float], bundle: Bundle) -> int:
    """How many ``bundle`` s one node of ``node`` resources holds at once."""
    counts = [math.floor(node.get(k, 0.0) / need + 1e-9) for k, need in bundle.as_ray().items()]
    return min(counts) if counts else 0


def fits_now(bundle: Bundle) -> int:
    """How many ``bundle`` s the live nodes hold at once (each bundle on one node)."""
    return sum(fits(n.get("Resources", {}), bundle) for n in ray.nodes() if n.get("Alive"))


@dataclass(frozen=True)
class Autoscaler:
    """A running autoscaler, and its node types when it publishes them (v2): ``groups`` holds
    (resources of one node, most nodes of that type; -1 unlimited). None: it does not say (v1)."""

    groups: tuple[tuple[dict[str, float], int], ...] | None

    def may_hold(self, bundle: Bundle) -> int | None:
        """The most ``bundle`` s the nodes it may launch hold at once (with the nodes up now);
        None when unknown, or unlimited."""
        if self.groups is None:
            return None
        total = 0
        for resources, most in self.groups:
            each = fits(resources, bundle)
            if each and most < 0:
                return None
            total += each * most
        return max(total, fits_now(bundle))

    def may_have_gpus(self) -> bool | None:
        """Whether a node type it may launch has a GPU; None when it does not say."""
        if self.groups is None:
            return None
        return any(r.get("GPU", 0) > 0 and most != 0 for r, most in self.groups)


def autoscaler() -> Autoscaler | None:
    """The cluster's autoscaler, or None when it has none (a fixed cluster, a local Ray)."""
    try:  # private state accessors: read defensively, an error means "no autoscaler known"
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:
        config = None
    if config is not None and config.node_group_configs:
        return Autoscaler(tuple((dict(g.resources), int(g.max_count))
                                for g in config.node_group_configs))
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(STATUS_KEY)
        report = json.loads(raw) if raw else None
    except Exception:
        report = None
    if not report or time.time() - float(report.get("time", 0)) >= STATUS_FRESH_S:
        return None
    # A local Ray (ray.init(), `ray start` without a cluster config) runs the same monitor over a
    # read-only provider that can add no node: it names each node's type node_<its id>.
    types = (report.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    if all(kind == f"node_{node}" for node, kind in types.items()):
        return None
    return Autoscaler(None)


def ask_autoscaler(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler to make room for ``bundles`` at once (replaces the previous request;
    an empty list withdraws it, so that idle nodes can go)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


@dataclass
class Room:
    """The outcome of :func:`make_room`: how many to start, and when the autoscaler was asked
    (None: everything fits now, or there is no autoscaler)."""

    count: int
    asked_at: float | None = None

    def release(self) -> None:
        """Withdraw the request once the step is done (idle nodes may then scale down)."""
        if self.asked_at is not None:
            ask_autoscaler([])
            self.asked_at = None

    def waiting_line(self, what: str, placed: int) -> str:
        """``waiting for 8 GPU map workers: 2 placed, autoscaler asked 1 min ago``."""
        since = "" if self.asked_at is None else \
            f", autoscaler asked {(time.monotonic() - self.asked_at) / 60:.0f} min ago"
        return f"waiting for {self.count} {what}: {placed} placed{since}"


def _refusal(what: str, flag: str, bundle: Bundle, count: int, now: int,
             scaler: Autoscaler | None, queue: bool) -> str | None:
    """Why ``count`` ``bundle`` s can never be placed (None: they can, or some of them can)."""
    if now >= (1 if queue or scaler is None else count):
        return None
    if scaler is None:
        return (f"{flag}: the Ray cluster ({describe(ray.cluster_resources())}) cannot place one "
                f"of the {what} ({bundle} each), and has no autoscaler to add a node that can; "
                "ask for fewer resources each, or add nodes")
    ever = scaler.may_hold(bundle)
    if ever is None or ever >= (1 if queue else count):
        return None
    if ever < 1:
        return (f"{flag}: no node type of the Ray cluster's autoscaler can hold one of the "
                f"{what} ({bundle} each)")
    return (f"{flag} {count}: the Ray cluster's autoscaler can never hold more than {ever} "
            f"{what} of {bundle} each (its node types and their maximum counts); ask for at "
            f"most {ever}")


def check_room(what: str, flag: str, bundle: Bundle, count: int = 1, *,
               queue: bool = False) -> None:
    """The one-line UserError :func:`make_room` would raise, asking nothing yet: run before any
    work, so that a request the cluster can never hold stops a sweep before its first trial."""
    refused = _refusal(what, flag, bundle, count, fits_now(bundle), autoscaler(), queue)
    if refused:
        raise UserError(refused)


def make_room(what: str, flag: str, bundle: Bundle, count: int,
              log: Callable[[str], None], *, queue: bool = False) -> Room:
    """Room for ``count`` ``bundle`` s at once (``what``: ``map workers``; ``flag``: the flag
    asking for them). Fits now: as asked. An autoscaler: asked for them (refused in one line when
    its node types can never hold that many). Neither: clamped to what fits, said in one line;
    nothing fits: a one-line UserError. ``queue``: what does not fit at once waits its turn (Tune
    trials), so only a bundle that can never be placed is refused, and nothing is clamped."""
    now = fits_now(bundle)
    if now >= count:
        return Room(count)
    scaler = autoscaler()
    refused = _refusal(what, flag, bundle, count, now, scaler, queue)
    if refused:
        raise UserError(refused)
    if scaler is None:
        if not queue:
            log(f"{flag} {count}: the Ray cluster ({describe(ray.cluster_resources())}) holds "
                f"{now} {what} of {bundle} each and has no autoscaler; using {now}")
        return Room(now)
    ever = scaler.may_hold(bundle)
    if queue and ever is not None:
        count = min(count, ever)
    ask_autoscaler([bundle.as_ray()] * count)
    log(f"{what}: {now} of {count} ({bundle} each) fit on the nodes up now; asked the "
        "autoscaler for the rest")
    return Room(count, asked_at=time.monotonic())


def at_once(bundle: Bundle) -> int:
    """How many ``bundle`` s to plan for at once (the default number of map workers, the trials
    Optuna runs together): what the nodes up now hold, or what the autoscaler's node types may
    hold when it says (at least one)."""
    scaler = autoscaler()
    ever = scaler.may_hold(bundle) if scaler is not None else None
    return max(1, fits_now(bundle), ever or 0)


def gpus_by_default(smoke: bool = False) -> tuple[float, str | None]:
    """GPUs per trial or map worker when the user asks for none: one (half in ``--smoke``) when
    the cluster has a GPU now or its autoscaler may launch a GPU node; else none. The second
    item is a line to say, where the choice is not evident (an autoscaler that does not publish
    its node types, so that a GPU group resting at zero cannot be seen)."""
    one = 0.5 if smoke else 1.0
    if ray.cluster_resources().get("GPU", 0) > 0:
        return one, None
    scaler = autoscaler()
    if scaler is None:
        return 0.0, None
    if scaler.may_have_gpus():
        return one, "no GPU node is up yet; the autoscaler may launch GPU nodes: asking for them"
    if scaler.may_have_gpus() is None:
        return 0.0, ("no GPU in the Ray cluster now, and its autoscaler does not publish its node "
                     "types: running on CPUs; pass --gpus-per-trial 1 (and --gpus-per-map-worker "
                     "1) to have it launch GPU nodes")
    return 0.0, None
