"""Plain-PyTorch training and evaluation loops shared by both stages (no Ray, no MLflow).

Data stays as uint8 tensors in an ``ImageData``; batches are gathered by index and converted to
float on the fly, which keeps CIFAR-sized sets small in memory and makes shuffling reproducible
from one seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from impactx_ray.data import ImageData


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks the GPU when there is one; an explicit ``cuda`` without one is an error."""
    from impactx_ray.errors import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for, but torch sees no CUDA device")
    return torch.device(name)


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
def predict(logits_fn: Callable[[Tensor], Tensor], data: ImageData, *, batch_size: int = 256,
            device: torch.device, indices: Tensor | None = None) -> Tensor:
    """Predicted classes for ``data`` (or its ``indices``), as an int64 CPU tensor."""
    if indices is None:
        indices = torch.arange(len(data))
    preds = [logits_fn(data.float_images(idx).to(device)).argmax(dim=1).cpu()
             for idx in index_batches(indices, batch_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(logits_fn: Callable[[Tensor], Tensor], data: ImageData, *, device: torch.device,
             indices: Tensor | None = None, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of ``logits_fn`` on ``data`` (or its ``indices``)."""
    if indices is None:
        indices = torch.arange(len(data))
    if len(indices) == 0:
        return float("nan")
    preds = predict(logits_fn, data, batch_size=batch_size, device=device, indices=indices)
    return (preds == data.labels[indices]).float().mean().item()


def eval_mode(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """A logits function running ``model`` in eval mode (first output when it returns a tuple)."""
    model.eval()

    def logits_fn(x: Tensor) -> Tensor:
        out = model(x)
        return out[0] if isinstance(out, tuple) else out

    return logits_fn


def check_finite(loss: Tensor, epoch: int) -> None:
    """Stop a diverged run early with a message that says so (Tune marks the trial failed)."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {loss.item()} in epoch {epoch}; "
                                 "lower the learning rate")
