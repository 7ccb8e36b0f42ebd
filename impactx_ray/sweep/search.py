"""How a stage explores its Table 1 space: the paper's grid, or a budgeted Optuna (TPE) search,
with or without ASHA stopping weak trials early.

The grid is the paper's protocol and the default. ``optuna`` samples ``num_samples`` points of
exactly the same values (seeded TPE through Ray Tune's ``OptunaSearch``); ``asha`` stops a trial
at a rung (``grace_period``, ``grace_period·reduction_factor``, … epochs) when its best validation
accuracy so far is below the top ``1/reduction_factor`` of the trials that reached that rung —
the number selection uses, so a trial is never stopped for one noisy epoch it already beat.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from impactx_ray.config import check_int
from impactx_ray.errors import UserError
from impactx_ray.sweep.spaces import COMPARISON_METHODS, Cell, Space, stage1_space, stage2_space

SEARCHES = ("grid", "optuna")
SCHEDULERS = ("fifo", "asha")
# Optuna's own bookkeeping in a trial's config: for long ordered value lists (20 learning rates,
# 7 λ) TPE samples the position in the list, an integer it can model as ordered, and the trial
# gets the value at that position. Not a RunConfig field: trainables drop it.
INDEX_KEY = "search_index"
# Every trial reports ``epoch`` (1, 2, …): ASHA's clock, the same after a retried trial resumes.
EPOCH = "epoch"


@dataclass(frozen=True)
class SearchSpec:
    """What ``--search``, ``--scheduler`` and their flags ask of every searched stage."""

    search: str = "grid"
    scheduler: str = "fifo"
    num_samples: int = 20             # optuna: trials per stage (capped by the stage's grid)
    max_concurrent: int | None = None  # optuna: trials at once (None: as many as the cluster fits)
    grace_period: int = 1             # asha: epochs every trial gets before it can be stopped
    reduction_factor: float = 3.0     # asha: 1/rf of the trials at a rung go on to the next
    seed: int = 0                     # optuna: the TPE sampler's seed

    def __post_init__(self) -> None:
        if self.search not in SEARCHES:
            raise UserError(f"--search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, "
                            f"got {self.scheduler!r}")
        check_int("--num-samples", self.num_samples, minimum=1)
        check_int("--grace-period", self.grace_period, minimum=1)
        if self.max_concurrent is not None:
            check_int("--max-concurrent", self.max_concurrent, minimum=1)
        if not self.reduction_factor > 1:
            raise UserError(f"--reduction-factor must be > 1, got {self.reduction_factor!r}")

    @property
    def label(self) -> str:
        """``grid``, ``optuna``, ``grid+asha`` or ``optuna+asha``: how a winner was found."""
        return self.search + ("+asha" if self.scheduler == "asha" else "")

    def settings(self) -> dict[str, Any]:
        """What decides a sweep's trials (the sweep's identity records it); the grid's defaults
        record nothing, so sweeps started before these flags resume as they were."""
        if self.search == "grid" and self.scheduler == "fifo":
            return {}
        keep = {"search", "scheduler"}
        if self.search == "optuna":
            keep |= {"num_samples", "max_concurrent", "seed"}
        if self.scheduler == "asha":
            keep |= {"grace_period", "reduction_factor"}
        return {k: v for k, v in asdict(self).items() if k in keep}

    def for_space(self, space: Space) -> SearchSpec:
        """The search one stage runs: a sample as large as the grid is the grid itself, run
        exhaustively (Optuna would only repeat points)."""
        if self.search == "optuna" and self.num_samples >= space.size:
            return replace(self, search="grid")
        return self

    def trials(self, space: Space) -> int:
        return space.size if self.search == "grid" else self.num_samples

    def check_epochs(self, epochs: int, flag: str = "--epochs") -> None:
        if self.scheduler == "asha" and self.grace_period > epochs:
            raise UserError(f"--grace-period {self.grace_period} is more than {flag} "
                            f"{epochs}: ASHA could never stop a trial")


@dataclass(frozen=True)
class OptunaSpace:
    """Optuna's define-by-run space over exactly the grid's values (a class, not a closure:
    Tune pickles the searcher with its experiment state, which is what makes it resumable)."""

    grid: dict[str, tuple]

    def __call__(self, trial: Any) -> dict[str, Any]:
        chosen = {}
        for key, values in self.grid.items():
            if len(values) == 1:
                chosen[key] = values[0]
            elif len(values) > 3 and all(isinstance(v, (int, float)) for v in values):
                chosen[key] = values[trial.suggest_int(f"{INDEX_KEY}.{key}", 0, len(values) - 1)]
            else:
                trial.suggest_categorical(key, list(values))
        return chosen


@dataclass
class TunePlan:
    """What a ``tune.Tuner`` needs from a stage's search: the searched part of its
    ``param_space``, ``TuneConfig`` arguments, and the number of trials it will run."""

    param_space: dict[str, Any]
    tune_config: dict[str, Any]
    trials: int


def tune_plan(space: Space, search: SearchSpec, max_epochs: int, metric: str,
              slots: int = 1) -> TunePlan:
    """The Tune pieces for one stage (``metric`` is maximised; ``max_epochs`` is ASHA's max_t;
    ``slots``: trials the cluster runs at once, Optuna's concurrency unless --max-concurrent)."""
    # Ray is imported here, not above: --dry-run reads the budget without starting Ray.
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    search = search.for_space(space)
    # reuse_actors: a trial on digits or CIFAR-scale LeNet-5 is seconds; a fresh actor for each
    # (a process importing torch, timm and the data) would cost as much again
    config: dict[str, Any] = {"metric": metric, "mode": "max", "reuse_actors": True}
    if search.scheduler == "asha":
        search.check_epochs(max_epochs)
        config["scheduler"] = ASHAScheduler(time_attr=EPOCH, max_t=max_epochs,
                                            grace_period=search.grace_period,
                                            reduction_factor=search.reduction_factor)
    else:
        config["scheduler"] = FIFOScheduler()
    if search.search == "grid":
        grid = {k: tune.grid_search(list(v)) for k, v in space.grid.items()}
        return TunePlan(grid, config, space.size)
    searcher = OptunaSearch(space=OptunaSpace(space.grid), metric=metric, mode="max",
                            seed=search.seed)
    # Also Tune's limit on pending trials: without the limiter it starts one trial at a time.
    searcher = ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent or max(1, slots))
    # the searcher has the metric: TuneConfig must not name it a second time for the searcher,
    # but the scheduler takes it from TuneConfig
    return TunePlan({}, {**config, "search_alg": searcher, "num_samples": search.num_samples},
                    search.num_samples)


def stopped_early(result: dict[str, Any] | None) -> bool:
    """A trial that ended without its final report (which alone carries ``test_accuracy``):
    the scheduler stopped it."""
    return bool(result) and "test_accuracy" not in result


def budget(cell_list: list[Cell], search: SearchSpec, *, small: bool, full_stage2: bool,
           epochs: int, stage2_epochs: int,
           comparison: tuple[str, ...] = COMPARISON_METHODS) -> list[str]:
    """The ``--dry-run`` budget: per stage, the search, its trials and the most trial-epochs
    they can take (ASHA only ever takes fewer); then the sweep's total."""
    stages = (("stage 1", stage1_space(small), search, epochs),
              ("stage 2", stage2_space(small, full_stage2), search, stage2_epochs),
              ("comparison", Space({"method": comparison}), SearchSpec(), epochs))
    lines, most = [f"budget per cell ({search.label}):"], 0
    for label, space, asked, max_epochs in stages:
        chosen = asked.for_space(space)
        n = chosen.trials(space)
        most += n * max_epochs
        note = " (the whole grid: --num-samples covers it)" if chosen is not asked else ""
        lines.append(f"  {label}: {chosen.label}, {n} trials × {max_epochs} epochs = at most "
                     f"{n * max_epochs} trial-epochs{note}")
    early = "; ASHA stops weak trials sooner" if search.scheduler == "asha" else ""
    lines.append(f"budget in all: at most {len(cell_list) * most} trial-epochs over "
                 f"{len(cell_list)} cell(s){early}")
    return lines
