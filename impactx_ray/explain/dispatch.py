"""One ``MapPool.compute`` (``actors.py``) on Ray: shards handed to the workers that have started,
two in flight each; results yielded as they finish; transient errors retried; a worker gone for
good, or stuck restarting past ``restart_timeout_s``, has its shards handed to the others; a
line says what it waits for when no shard finishes for a while."""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from impactx_ray.capacity import describe
from impactx_ray.errors import UserError
from impactx_ray.explain.store import MapStore


def user_error_in(err: BaseException) -> str | None:
    """The one-line ``UserError`` a Ray worker raised (a GPU torch cannot use, say), read back
    from the error Ray hands the driver (its traceback as text); None for any other error."""
    prefix = f"{UserError.__module__}.{UserError.__name__}: "
    for line in str(err).splitlines():
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    return None


def init_user_error(err: BaseException) -> str | None:
    """The one-line ``UserError`` a worker's ``__init__`` raised, from its actor-death message;
    None for any other death."""
    return user_error_in(err) if getattr(err, "actor_init_failed", False) else None


def count(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"


def actor_state(actor: Any) -> str:
    """Ray's state of an actor (ALIVE, RESTARTING, PENDING_CREATION, DEAD), from the GCS."""
    try:
        from ray._private.state import actors

        return actors(actor_id=actor._actor_id.hex()).get("State", "UNKNOWN")
    except Exception:  # a private accessor: when it cannot answer, the actor counts as alive
        return "UNKNOWN"



class Dispatch:
    """One ``MapPool.compute``: hands shards to ready workers and yields (shard, maps, where
    made) as they finish; warms up the workers not yet ready; retries transient errors; reports
    stalls."""

    def __init__(self, pool: Any, store: MapStore, queue: deque[int]) -> None:
        # pool: the actors.MapPool computing (its actors, ready list, room, needs, data_refs, log
        # and limits); not imported, as actors.py imports this module
        self.pool, self.store, self.queue = pool, store, queue
        self.warming = {a.warm_up.remote(pool.data_refs): a for a in pool.actors
                        if a not in pool.ready} if queue else {}
        self.in_flight: dict[ray.ObjectRef, tuple[Any, int]] = {}
        self.unavailable: dict[int, int] = {}  # shard -> consecutive ActorUnavailableErrors
        self.down_since: dict[Any, float] = {}  # worker -> when it was first seen not ALIVE
        self.said_waiting = -math.inf

    def refill(self) -> None:
        """Keep two shards in flight per ready worker, so none idles while the driver writes."""
        for actor in self.pool.ready:
            for _ in range(2 - sum(a is actor for a, _ in self.in_flight.values())):
                if self.queue:
                    i = self.queue.popleft()
                    ref = actor.explain_shard.remote(i, *self.store.shard_range(i),
                                                     self.pool.data_refs)
                    self.in_flight[ref] = (actor, i)

    def drop(self, actor: Any, err: BaseException) -> None:
        """A worker gone for good: its shards go back to the queue for the others."""
        self.pool.ready = [a for a in self.pool.ready if a is not actor]
        if not self.pool.ready and not self.warming:
            refused = init_user_error(err)
            if refused:  # the workers refused to start (a GPU torch cannot use): the user's to fix
                raise UserError(refused) from None
            cause = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise RuntimeError(f"every map worker died (last: {cause}); finished shards are "
                               "kept, rerun to resume") from err

    def say_waiting(self) -> None:
        """While the autoscaler adds nodes for workers not started yet, a line every
        ``WAITING_LINE_S``: ``waiting for 8 GPU map workers: 2 placed, autoscaler asked 1 min
        ago``."""
        room = self.pool.room
        if room.asked_at is None or not self.warming:
            return
        if time.monotonic() - self.said_waiting >= self.pool.WAITING_LINE_S:
            self.pool.log(room.waiting_line(f"{self.pool.needs.kind()} map workers",
                                            len(self.pool.ready)))
            self.said_waiting = time.monotonic()

    def requeue_stuck(self) -> None:
        """A worker that holds shards but has not been ALIVE for ``restart_timeout_s`` (Ray is
        restarting it on a node that is gone, and no node is free for it) is given up: its shards
        go back to the queue for the others, and the worker is killed so it stops waiting."""
        holders = {id(a): a for a, _ in self.in_flight.values()}
        now = time.monotonic()
        for actor in holders.values():
            state = actor_state(actor)
            if state in ("ALIVE", "UNKNOWN"):
                self.down_since.pop(actor, None)
                continue
            since = self.down_since.setdefault(actor, now)
            if now - since < self.pool.restart_timeout_s:
                continue
            mine = [ref for ref, (a, _) in self.in_flight.items() if a is actor]
            shards = sorted(self.in_flight.pop(ref)[1] for ref in mine)
            self.queue.extendleft(reversed(shards))
            self.pool.log(f"map worker {self.name(actor)} has been {state} for "
                          f"{now - since:.0f} s (its node gone, no node free for it): shards "
                          f"{', '.join(map(str, shards))} go to the other workers")
            ray.kill(actor, no_restart=True)
            self.down_since.pop(actor, None)
            self.drop(actor, RuntimeError(f"map worker {self.name(actor)} stuck {state}"))
        self.refill()

    def __iter__(self):
        self.refill()
        last = checked = time.monotonic()
        while self.in_flight or (self.queue and self.warming):
            self.say_waiting()
            if time.monotonic() - checked >= self.pool.POLL_S:
                self.requeue_stuck()
                checked = time.monotonic()
            wait = max(0.0, min(last + self.pool.watchdog_s - time.monotonic(), self.pool.POLL_S))
            done, _ = ray.wait([*self.in_flight, *self.warming], num_returns=1, timeout=wait)
            if not done:
                if time.monotonic() - last >= self.pool.watchdog_s:
                    self.pool.log(self.stall_report(time.monotonic() - last))
                    last = time.monotonic()
                continue
            ref = done[0]
            if ref in self.warming:
                actor = self.warming.pop(ref)
                try:
                    ray.get(ref)
                except RayActorError as err:  # it never started: the others go on
                    self.drop(actor, err)
                else:
                    self.pool.ready.append(actor)
                self.refill()
                continue
            actor, i = self.in_flight.pop(ref)
            try:
                shard, maps, made_by = ray.get(ref)
            except ActorUnavailableError as err:
                # Transient by Ray's definition (a restart, a network blip): retry the shard on
                # the same worker, and only give the worker up when it stays unavailable.
                self.queue.appendleft(i)
                self.unavailable[i] = self.unavailable.get(i, 0) + 1
                if self.unavailable[i] > self.pool.TRANSIENT_RETRIES:
                    self.drop(actor, err)
                else:
                    self.pool.log(f"map worker {self.name(actor)} unavailable for shard {i} "
                                  f"(try {self.unavailable[i]} of {self.pool.TRANSIENT_RETRIES}); "
                                  "retrying")
                    time.sleep(min(5.0, 0.5 * self.unavailable[i]))
                self.refill()
                continue
            except (ActorDiedError, RayActorError) as err:  # out of restarts
                self.queue.appendleft(i)
                self.drop(actor, err)
                self.refill()
                continue
            self.unavailable.pop(i, None)
            last = time.monotonic()
            yield shard, maps, made_by
            self.refill()
        if self.queue:  # cannot happen while a worker is left; never report success without maps
            raise RuntimeError(f"{len(self.queue)} map shards were not computed; rerun to resume")

    def name(self, actor: Any) -> str:
        return f"#{self.pool.actors.index(actor) + 1}" if actor in self.pool.actors else "?"

    def stall_report(self, seconds: float) -> str:
        """One line: what is running where, and what the rest is waiting on."""
        running = ", ".join(f"shard {i} on worker {self.name(a)}"
                            for a, i in sorted(self.in_flight.values(), key=lambda t: t[1]))
        parts = [f"SHAP maps: no shard finished in {seconds:.0f} s",
                 f"running: {running or 'none'}"]
        if self.queue:
            parts.append(f"{count(len(self.queue), 'shard')} queued for a free worker")
        if self.warming:
            parts.append(f"{count(len(self.warming), 'worker')} not started yet: loading the "
                         f"model, or waiting for {self.pool.needs} each (the cluster "
                         f"has {describe(ray.available_resources())} free of "
                         f"{describe(ray.cluster_resources())})")
        return "; ".join(parts)
