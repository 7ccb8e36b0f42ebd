"""Budgeted search: the Optuna space is exactly Table 1's values, seeded; the Tune plans of each
search and scheduler; the dry-run budget; winners only among trials that finished; the record."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from impactx_ray.errors import UserError
from impactx_ray.report import summary_markdown
from impactx_ray.sweep.options import SweepOptions
from impactx_ray.sweep.search import INDEX_KEY, OptunaSpace, SearchSpec, budget, stopped_early, tune_plan
from impactx_ray.sweep.spaces import LEARNING_RATES, Space, cells, stage1_space
from impactx_ray.sweep.stage import StageFailed, StageOutcome, best
from impactx_ray.sweep.trainables import run_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sweeps" / "full_grid.py"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample(space: Space, seed: int, n: int) -> list[dict]:
    """``n`` points drawn by a seeded TPE study through the define-by-run space, as trials see
    them (Optuna's positions dropped)."""
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    define, points = OptunaSpace(space.grid), []
    for _ in range(n):
        trial = study.ask()
        constants = define(trial)
        config = {**trial.params, **constants}
        points.append({k: v for k, v in config.items() if not k.startswith(INDEX_KEY)})
        study.tell(trial, config["lr"] * 100)  # a made-up score: higher lr is better
    return points


def test_optuna_samples_only_table1_values_and_is_seeded():
    space = stage1_space()
    points = sample(space, seed=0, n=25)
    for p in points:
        assert set(p) == {"batch_size", "lr", "val_fraction"}
        assert all(p[k] in space.grid[k] for k in p), p
    assert points == sample(space, seed=0, n=25)
    assert points != sample(space, seed=1, n=25)
    # lr is sampled by its position (ordered): TPE homes in on the better, larger rates
    late = [p["lr"] for p in points[-10:]]
    assert sum(late) / len(late) > LEARNING_RATES[10]


def test_single_value_keys_are_constants():
    space = Space({"batch_size": (32,), "lr": (0.0026,), "val_fraction": (0.1,),
                   "lam": (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4)})
    for p in sample(space, seed=0, n=5):
        assert (p["batch_size"], p["lr"], p["val_fraction"]) == (32, 0.0026, 0.1)
        assert p["lam"] in space.grid["lam"]


@pytest.mark.parametrize("kwargs, message", [
    ({"search": "random"}, "--search must be one of grid, optuna, got 'random'"),
    ({"scheduler": "pbt"}, "--scheduler must be one of fifo, asha, got 'pbt'"),
    ({"num_samples": 0}, "--num-samples must be an integer >= 1, got 0"),
    ({"max_concurrent": 0}, "--max-concurrent must be an integer >= 1, got 0"),
    ({"grace_period": 0}, "--grace-period must be an integer >= 1, got 0"),
    ({"reduction_factor": 1}, "--reduction-factor must be > 1, got 1"),
])
def test_bad_search_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(UserError) as e:
        SearchSpec(**kwargs)
    assert str(e.value) == message


def test_tune_plans():
    space = stage1_space()
    grid = tune_plan(space, SearchSpec(), max_epochs=5, metric="m")
    assert grid.trials == 180 and grid.param_space["lr"] == {"grid_search": list(LEARNING_RATES)}
    assert type(grid.tune_config["scheduler"]).__name__ == "FIFOScheduler"
    sampled = tune_plan(space, SearchSpec("optuna", "asha", num_samples=12, grace_period=2,
                                          reduction_factor=4), max_epochs=8, metric="m", slots=3)
    assert sampled.trials == 12 and sampled.param_space == {}
    assert sampled.tune_config["num_samples"] == 12
    limiter = sampled.tune_config["search_alg"]
    assert limiter.max_concurrent == 3  # the cluster's slots unless --max-concurrent
    asha = sampled.tune_config["scheduler"]
    assert (asha._time_attr, asha._max_t, asha._reduction_factor) == ("epoch", 8, 4)
    assert asha._brackets[0]._rungs[-1][0] == 2  # the first rung: the grace period
    explicit = tune_plan(space, SearchSpec("optuna", num_samples=12, max_concurrent=2), 8, "m",
                         slots=16)
    assert explicit.tune_config["search_alg"].max_concurrent == 2
    # a sample as large as the space is its grid
    lam = Space({"lam": (0.2, 0.4, 0.6)})
    assert tune_plan(lam, SearchSpec("optuna", num_samples=3), 4, "m").param_space == \
        {"lam": {"grid_search": [0.2, 0.4, 0.6]}}
    with pytest.raises(UserError, match="--grace-period 5 is more than --epochs 4"):
        tune_plan(space, SearchSpec(scheduler="asha", grace_period=5), 4, "m")


def test_budget_lines():
    lines = budget(cells(("lenet5",), ("digits", "cifar10")), SearchSpec("optuna", "asha",
                                                                         num_samples=40),
                   small=False, full_stage2=False, epochs=30, stage2_epochs=10)
    assert lines == [
        "budget per cell (optuna+asha):",
        "  stage 1: optuna+asha, 40 trials × 30 epochs = at most 1200 trial-epochs",
        "  stage 2: grid+asha, 7 trials × 10 epochs = at most 70 trial-epochs (the whole grid: "
        "--num-samples covers it)",
        "  comparison: grid, 2 trials × 30 epochs = at most 60 trial-epochs",
        "budget in all: at most 2660 trial-epochs over 2 cell(s); ASHA stops weak trials sooner"]


class Results(list):
    """The parts of Tune's ResultGrid that ``best`` and ``StageOutcome`` read."""

    @property
    def errors(self):
        return [r.error for r in self if r.error is not None]


def result(val, epoch, final=True, error=None, lr=0.001):
    metrics = {"best_val_accuracy": val, "epoch": epoch, **({"test_accuracy": 0.5} if final
                                                            else {})}
    return SimpleNamespace(metrics=metrics, error=error, config={"lr": lr},
                           checkpoint=SimpleNamespace(path=f"/ckpt/{lr}"))


def test_the_winner_is_a_finished_trial_and_the_outcome_counts_epochs():
    results = Results([result(0.90, 4, lr=0.1), result(0.97, 1, final=False, lr=0.2),
                       result(0.93, 4, lr=0.3), result(0.95, 3, error=RuntimeError("x"), lr=0.4),
                       result(float("nan"), 4, lr=0.5)])
    params, metrics, path = best(results, ("lr",))
    assert params == {"lr": 0.3} and path == Path("/ckpt/0.3/model.pt")
    assert stopped_early(results[1].metrics) and not stopped_early(results[0].metrics)
    outcome = StageOutcome.of("optuna+asha", results)
    assert outcome == StageOutcome("optuna+asha", trials=5, early_stopped=1, failed=1,
                                   trial_epochs=16)
    with pytest.raises(StageFailed, match="none of its 1 trials finished"):
        best(Results([result(0.99, 1, final=False)]), ("lr",))


def test_search_settings_enter_the_sweep_identity_only_when_not_the_grid():
    opts = SweepOptions(out=Path("x"), cells=[], base={})
    assert "search" not in opts.settings()
    sampled = SweepOptions(out=Path("x"), cells=[], base={}, smoke=True,
                           search=SearchSpec("optuna", "asha", num_samples=6))
    assert sampled.settings()["search"] == "optuna" and sampled.settings()["num_samples"] == 6
    assert not sampled.small_spaces  # a sample draws from Table 1's space even in --smoke
    assert opts.settings() != SweepOptions(out=Path("x"), cells=[], base={},
                                           search=SearchSpec(scheduler="asha")).settings()


def test_trials_drop_optuna_positions_from_their_run_config():
    cfg = run_config({"model": "lenet5", "dataset": "digits", "lr": 0.0026,
                      f"{INDEX_KEY}.lr": 5, "method": "baseline"})
    assert cfg.lr == 0.0026


def test_summary_says_how_each_winner_was_found():
    row = {"model": "lenet5", "dataset": "digits", "stage1_search": "optuna+asha",
           "stage1_trials": 6, "stage1_early_stopped": 4, "stage1_trial_epochs": 10,
           "stage2_search": "grid", "stage2_trials": 2, "stage2_early_stopped": 0,
           "stage2_trial_epochs": 6}
    assert ("| lenet5 | digits | optuna+asha: 6 trials (4 stopped early), 10 trial-epochs | "
            "grid: 2 trials, 6 trial-epochs |") in summary_markdown([row])


def test_dry_run_prints_the_budget_of_the_chosen_search():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--smoke", "--search",
                           "optuna", "--scheduler", "asha", "--num-samples", "6"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "  stage 1: optuna+asha, 6 trials × 3 epochs = at most 18 trial-epochs" in proc.stdout
    assert "  stage 2: optuna+asha, 6 trials × 3 epochs = at most 18 trial-epochs" in proc.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--smoke", "--scheduler",
                          "asha", "--grace-period", "4"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "full_grid.py: error: --grace-period 4 is more than --epochs 3: ASHA could never stop "
        "a trial"]
