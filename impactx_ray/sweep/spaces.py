"""The paper's search spaces (Table 1) and the (model, dataset) cells of the experiment."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from impactx_ray.config import cell_name

# Table 1. Learning rates come from integer steps (1 + 5·i)/10000 — never a float arange, whose
# rounding would make grid points like 0.0036000000000000003.
BATCH_SIZES = (16, 32, 64)
LEARNING_RATES = tuple((1 + 5 * i) / 10_000 for i in range(20))  # 0.0001, 0.0006, …, 0.0096
VAL_FRACTIONS = (0.05, 0.1, 0.2)
LAMBDAS = tuple((2 * i) / 10 for i in range(1, 8))  # 0.2, 0.4, …, 1.4

# The paper's experiment: these backbones on these datasets (the cells of Table 2).
PAPER_MODELS = ("lenet5", "mobilenet", "efficientnet_b2")
PAPER_DATASETS = ("cifar10", "cifar100", "stl10")

# The RunConfig fields each stage searches (Table 1).
STAGE1_SEARCHED = ("batch_size", "lr", "val_fraction")
STAGE2_SEARCHED = ("lam",)


@dataclass(frozen=True)
class Space:
    """One grid: parameter name → values (their product is the set of trials)."""

    grid: dict[str, tuple]

    @property
    def size(self) -> int:
        n = 1
        for values in self.grid.values():
            n *= len(values)
        return n

    def points(self) -> list[dict]:
        keys = list(self.grid)
        return [dict(zip(keys, combo)) for combo in product(*self.grid.values())]


def stage1_space(smoke: bool = False) -> Space:
    if smoke:  # two configurations, as cheap as the grid allows
        return Space({"batch_size": (32,), "lr": (0.0026, 0.0046), "val_fraction": (0.1,)})
    return Space({"batch_size": BATCH_SIZES, "lr": LEARNING_RATES, "val_fraction": VAL_FRACTIONS})


def stage2_space(smoke: bool = False, full: bool = False,
                 winner: dict | None = None) -> Space:
    """λ grid on the stage-1 winner's hyperparameters, or (``full``) λ × batch size × learning
    rate. Never the validation fraction: stage 2 trains on top of the winner's frozen M, so it
    keeps M's split — the splits are nested, and a larger fraction would put images M trained
    on into stage 2's validation set (the trials get the winner's fraction from their base)."""
    lambdas = (0.4, 1.0) if smoke else LAMBDAS
    if full:
        searched = {k: v for k, v in stage1_space(smoke).grid.items() if k != "val_fraction"}
        return Space({**searched, "lam": lambdas})
    fixed = {k: (v,) for k, v in (winner or {}).items() if k in STAGE1_SEARCHED}
    return Space({**fixed, "lam": lambdas})


@dataclass(frozen=True)
class Cell:
    model: str
    dataset: str

    @property
    def name(self) -> str:
        return cell_name(self.model, self.dataset)


def cells(models: tuple[str, ...] = PAPER_MODELS,
          datasets: tuple[str, ...] = PAPER_DATASETS) -> list[Cell]:
    return [Cell(m, d) for m, d in product(models, datasets)]


# The comparison stage: ABN and WAE, once each, with the stage-1 winner's hyperparameters (the
# paper's); single-stage IMPACTX (§3.3, not run in the paper) joins them when asked: it
# recomputes the training set's maps as it trains, so it costs a map budget per refresh.
COMPARISON_METHODS = ("abn", "wae")
# name: title (the method table's; kept here so that full_grid.py parses its flags without torch)
COMPARABLE_METHODS = {"abn": "ABN", "wae": "WAE", "impactx_single": "IMPACTX single-stage"}


def plan(cell_list: list[Cell], smoke: bool = False, full_stage2: bool = False,
         comparison: tuple[str, ...] = COMPARISON_METHODS) -> list[str]:
    """The lines ``--dry-run`` prints: cells, trials per stage (every stage), and totals."""
    s1 = stage1_space(smoke).size
    s2 = stage2_space(smoke, full_stage2).size
    s3 = len(comparison)
    n = len(cell_list)
    lines = [f"{n} cells; per cell: {s1} stage-1 + {s2} stage-2 + {s3} comparison "
             f"({', '.join(COMPARABLE_METHODS[m] for m in comparison)}) trials = {s1 + s2 + s3}"]
    lines += [f"  {c.name}: model={c.model} dataset={c.dataset}" for c in cell_list]
    lines.append(f"total: {n * s1} stage-1 + {n * s2} stage-2 + {n * s3} comparison = "
                 f"{n * (s1 + s2 + s3)} trials")
    return lines
