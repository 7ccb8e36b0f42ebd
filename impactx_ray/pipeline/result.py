"""One result schema for a run's ``result.json`` and a sweep cell's ``cells/<cell>/result.json``.

Both hold the same core, built here: ``model``, ``dataset``, the hyperparameters a sweep chooses
(``batch_size``, ``lr``, ``val_fraction``, ``lam``), ``<method>_val_accuracy`` and
``<method>_test_accuracy`` of every method evaluated, and, once maps were compared, ``aopc`` (per
map), ``metrics`` (per replacement and map, with CIs) and ``sanity``; then ``warnings``. A run adds
its whole config (``hyperparameters``), ``trained_with``, ``num_train``/``num_test``, ``device``,
``timings_s`` and the full MoRF summary (``morf``); a cell adds how each stage's search went and
its failed trials. ``report.py`` reads the core of either; :func:`as_row` reads files written
before this schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from impactx_ray.config import RunConfig

#: The hyperparameters of Table 1 a row shows (a sweep searches them; a run is given them).
HYPER = ("batch_size", "lr", "val_fraction", "lam")
#: What a row takes of a MoRF summary (``morf.json``).
MORF_FIELDS = ("aopc", "metrics", "sanity")


def result_row(cfg: RunConfig, accuracies: Mapping[str, float],
               morf: Mapping[str, Any] | None = None,
               warnings: list[str] | None = None) -> dict[str, Any]:
    """The core of a result: the cell's model and dataset, ``cfg``'s hyperparameters, the
    ``accuracies`` ({``<method>_{val,test}_accuracy``: value}) and, given a MoRF summary, its
    measures."""
    row: dict[str, Any] = {"model": cfg.model, "dataset": cfg.dataset,
                           **{k: getattr(cfg, k) for k in HYPER}, **accuracies}
    if morf is not None:
        row.update({k: morf[k] for k in MORF_FIELDS if k in morf})
    row["warnings"] = list(warnings or [])
    return row


def as_row(result: Mapping[str, Any]) -> dict[str, Any]:
    """A ``result.json`` of any version with the core at its top level: files of this schema as
    they are; a run's from before it (its config under ``hyperparameters``, its measures under
    ``morf``) lifted."""
    if "model" in result:
        return dict(result)
    hp = result.get("hyperparameters", {})
    row = {"model": hp.get("model"), "dataset": hp.get("dataset"), **{k: hp.get(k) for k in HYPER},
           **{k: v for k, v in result.items() if k.endswith("_accuracy")}}
    if "morf" in result:
        row.update({k: result["morf"][k] for k in MORF_FIELDS if k in result["morf"]})
    return {**row, **{k: v for k, v in result.items() if k not in row}}
