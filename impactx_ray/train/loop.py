"""Plain-PyTorch training and evaluation loops shared by both stages (no Ray, no MLflow).

Data stays as uint8 tensors in an ``ImageData``; batches are gathered by index and converted to
float on the fly, which keeps CIFAR-sized sets small in memory and makes shuffling reproducible
from one seeded generator.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from impactx_ray.data import ImageData, train_val_split


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG (weight init, dropout) and return a generator for shuffling."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def index_batches(indices: Tensor, batch_size: int, *, generator: torch.Generator | None = None
                  ) -> Iterator[Tensor]:
    """Yield index batches; shuffled when a generator is given, in order otherwise."""
    if generator is not None:
        indices = indices[torch.randperm(len(indices), generator=generator)]
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


def num_batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


@torch.no_grad()
def predict(model: nn.Module, data: ImageData, *, batch_size: int = 256,
            device: torch.device, indices: Tensor | None = None) -> Tensor:
    """Predicted classes of ``model`` (put in eval mode) for ``data`` (or its ``indices``), int64 on CPU."""
    model.eval()
    if indices is None:
        indices = torch.arange(len(data))
    preds = [model(data.float_images(idx).to(device)).argmax(dim=1).cpu()
             for idx in index_batches(indices, batch_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, data: ImageData, *, device: torch.device,
             indices: Tensor | None = None, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (put in eval mode) on ``data`` (or its ``indices``)."""
    if indices is None:
        indices = torch.arange(len(data))
    if len(indices) == 0:
        return float("nan")
    preds = predict(model, data, batch_size=batch_size, device=device, indices=indices)
    return (preds == data.labels[indices]).float().mean().item()


def check_finite(loss: Tensor, epoch: int) -> None:
    """Stop a diverged run early with a message that says so (Tune marks the trial failed)."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {loss.item()} in epoch {epoch}; "
                                 "lower the learning rate")


# (model, x, y, sample indices) -> (loss, {part name: value}) for one batch
StepFn = Callable[[nn.Module, Tensor, Tensor, Tensor], "tuple[Tensor, dict[str, Tensor]]"]
EpochCallback = Callable[[int, "dict[str, float]"], None]
# Everything an interrupted fit needs to go on exactly where it stopped (see ``fit``).
FitState = dict
StateCallback = Callable[[FitState], None]


@dataclass
class StageResult:
    model: nn.Module
    best_epoch: int
    best_val_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Split:
    """The training set and which of its rows train and which validate."""

    data: ImageData
    train_idx: Tensor
    val_idx: Tensor

    @classmethod
    def of(cls, data: ImageData, val_fraction: float, seed: int) -> Split:
        """The seeded split by validation fraction that every run and trial of a config uses."""
        tr, va = train_val_split(len(data), val_fraction, seed=seed)
        return cls(data, torch.as_tensor(tr), torch.as_tensor(va))


@dataclass
class FitHooks:
    """How the caller follows and steers a fit: ``on_epoch`` gets each epoch's history row,
    ``on_state`` the whole state after each epoch, ``resume`` such a state to go on from."""

    on_epoch: EpochCallback | None = None
    on_state: StateCallback | None = None
    resume: FitState | None = None
    progress: bool = True


@dataclass
class TrainPlan:
    """One method's training, as the one loop (:func:`fit`) runs it: the model, its per-batch
    ``step``, the ``params`` that learn at ``lr`` for ``epochs``. ``validate(model, epoch)`` adds
    metrics to an epoch's row after its validation accuracy; ``extra_state()`` adds entries to
    every fit state (single-stage training keeps its current targets there)."""

    label: str
    model: nn.Module
    step: StepFn
    params: list[nn.Parameter]
    lr: float
    epochs: int
    validate: Callable[[nn.Module, int], dict[str, float]] | None = None
    extra_state: Callable[[], dict] | None = None


def train(plan_of: Callable[[], TrainPlan], split: Split, *, seed: int, batch_size: int,
          device: torch.device, hooks: FitHooks | None = None) -> StageResult:
    """Seed, build the plan (its model's initialisation draws from the seeded RNG), then fit it.
    Every method trains through here."""
    generator = seed_everything(seed)
    return fit(plan_of(), split, batch_size=batch_size, generator=generator, device=device,
               hooks=hooks or FitHooks())


def fit(plan: TrainPlan, split: Split, *, batch_size: int, generator: torch.Generator,
        device: torch.device, hooks: FitHooks) -> StageResult:
    """The epoch loop every method shares: Adam over ``plan.params``, one ``plan.step`` per
    batch, then validation accuracy (plus ``plan.validate``'s metrics); keeps the state with the
    best validation accuracy (the earliest on ties) and returns it loaded, in eval mode.

    History rows: ``epoch``, ``train_loss``, ``train_<part>`` for each part the step returns,
    ``val_accuracy`` and the ``validate`` metrics. After every epoch ``hooks.on_state`` receives
    the whole state (model, optimizer, shuffling and dropout RNGs, best weights so far, history,
    the plan's extra state); ``hooks.resume`` with such a state goes on from the epoch after it,
    as if never interrupted.
    """
    model, data, epochs, resume = plan.model, split.data, plan.epochs, hooks.resume
    optimizer = torch.optim.Adam(plan.params, lr=plan.lr)
    best_state, best_acc, best_epoch, history, done, spent = None, -1.0, 0, [], 0, 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        best_state, best_acc = resume["best_state"], resume["best_val_accuracy"]
        best_epoch, history = resume["best_epoch"], list(resume["history"])
        done, spent = resume["epoch"], resume["seconds"]
    start = time.perf_counter() - spent
    steps = num_batches(len(split.train_idx), batch_size)
    for epoch in range(done + 1, epochs + 1):
        model.train()
        sums: dict[str, float] = {}
        seen = 0
        bar = tqdm(index_batches(split.train_idx, batch_size, generator=generator), total=steps,
                   desc=f"{plan.label} epoch {epoch}/{epochs}", leave=False,
                   disable=not hooks.progress)
        for idx in bar:
            x, y = data.float_images(idx).to(device), data.labels[idx].to(device)
            loss, parts = plan.step(model, x, y, idx)
            check_finite(loss, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(idx)
            seen += len(idx)
            bar.set_postfix({k: f"{v / seen:.4f}" for k, v in sums.items()}, refresh=False)
        row = {"epoch": epoch, **{f"train_{k}": v / seen for k, v in sums.items()},
               "val_accuracy": accuracy(model, data, device=device, indices=split.val_idx)}
        if plan.validate is not None:
            row.update(plan.validate(model, epoch))
        history.append(row)
        if row["val_accuracy"] > best_acc:
            best_acc, best_epoch = row["val_accuracy"], epoch
            best_state = copy.deepcopy(model.state_dict())
        if hooks.progress:
            shown = ", ".join(f"{k.replace('train_', '')} {v:.4f}" for k, v in row.items()
                              if k != "epoch")
            tqdm.write(f"{plan.label} epoch {epoch}/{epochs}: {shown}"
                       f"{'  *best' if best_epoch == epoch else ''}")
        if hooks.on_epoch is not None:
            hooks.on_epoch(epoch, row)
        if hooks.on_state is not None:
            hooks.on_state({"epoch": epoch, "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                            "torch_rng": torch.get_rng_state(), "best_state": best_state,
                            "best_val_accuracy": best_acc, "best_epoch": best_epoch,
                            "history": history, "seconds": time.perf_counter() - start,
                            **(plan.extra_state() if plan.extra_state is not None else {})})
    model.load_state_dict(best_state)
    model.eval()
    return StageResult(model, best_epoch, best_acc, history, time.perf_counter() - start)
