"""The layout of a run directory (``--out``) and its small JSON files.

    config.json            the RunConfig every step reads (sub-commands may override parts of it)
    <method dir>/model.pt  each method's checkpoint (``methods.METHODS[...].directory``: stage1/,
                           stage2/, abn/, wae/), + history.json beside it
    maps/<key>/            map stores (``explain.ExplainSettings`` names them)
    morf/                  MoRF curves, AOPC and figures (``evaluate --morf``)
    result.json            test accuracies of every method, hyperparameters, timings
    record.jsonl           every evaluation as the recorder entries a sweep sends to MLflow
    timings.json           seconds per step and maps/s, merged across commands
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from impactx_ray.config import RunConfig
from impactx_ray.defaults import CHECKPOINT_FILE
from impactx_ray.errors import UserError
from impactx_ray.io import file_sha256, read_json, write_json
from impactx_ray.methods import BASELINE, Method
from impactx_ray.pipeline.record import FileRecorder, record_evaluation
from impactx_ray.train.checkpoint import load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    @property
    def map_stores(self) -> Path:
        """The folder of the run's map stores, one per (checkpoint, settings)."""
        return self.root / "maps"

    @property
    def morf(self) -> Path:
        return self.root / "morf"

    def checkpoint(self, method: Method) -> Path:
        return self.root / method.directory / CHECKPOINT_FILE

    def history(self, method: Method) -> Path:
        return self.root / method.directory / "history.json"

    @property
    def record(self) -> FileRecorder:
        """The run's record (``record.jsonl``): what MLflow holds for a sweep's cell, as files."""
        return FileRecorder(self.root / "record.jsonl")

    def record_evaluation(self, cfg: RunConfig, result: dict[str, Any], morf: bool) -> None:
        """An evaluation in the run's record: the config, every accuracy, the MoRF measures."""
        key = self.record.start("run", self.root.name)
        self.record.params(key, cfg.to_dict())
        record_evaluation(self.record, key, result, result.get("morf") if morf else None, self.morf)
        self.record.finish(key)

    def previous_morf(self) -> dict[str, Any] | None:
        """The MoRF summary an earlier ``evaluate --morf`` left in result.json, if any."""
        return (read_json(self.result) if self.result.exists() else {}).get("morf")

    def save_config(self, cfg: RunConfig) -> None:
        write_json(self.config, cfg.to_dict())

    def load_config(self, overrides: dict[str, Any]) -> RunConfig:
        """The run's saved config with ``overrides`` applied (validated; nothing is written)."""
        saved = read_json(self.config, hint=f"run `impactx run --out {self.root}` first")
        try:
            return RunConfig.from_saved(saved, overrides)
        except UserError as e:
            try:
                RunConfig.from_saved(saved)
            except UserError:  # the saved file is at fault, not a flag: name it
                raise UserError(f"{self.config}: {e}") from None
            raise

    def save_trained(self, method: Method, state: dict[str, Any], meta: dict[str, Any],
                     history: list[dict[str, float]], *, wall: float) -> None:
        """A trained method's checkpoint and history in its folder, its wall time in timings.json."""
        save_checkpoint(self.checkpoint(method), state, meta)
        write_json(self.history(method), history)
        self.record_timings(**{f"{method.name}_wall": wall})

    def record_timings(self, **timings: float) -> dict[str, float]:
        """Merge ``timings`` into timings.json (steps may run in separate commands)."""
        merged = {**(read_json(self.timings) if self.timings.exists() else {}), **timings}
        write_json(self.timings, merged)
        return merged

    def mismatch(self, method: Method, cfg: RunConfig, path: Path | None = None) -> str | None:
        """How the checkpoint of ``method`` (here, or at ``path``) disagrees with ``cfg`` on a
        setting that shaped it, e.g. ``stage2/model.pt was trained with lam=0.6, not 1.4``;
        None when it agrees or is absent. Checkpoints from before the method table record no
        settings and cannot be checked."""
        path = path or self.checkpoint(method)
        if not path.exists():
            return None
        saved = load_checkpoint(path)[1].get("config")
        if not isinstance(saved, dict):
            return None
        for key in method.settings:
            if key in saved and saved[key] != getattr(cfg, key):
                return (f"{path} was trained with {key}={saved[key]!r}, not "
                        f"{key}={getattr(cfg, key)!r}")
        return None

    def check_compatible(self, cfg: RunConfig, methods: tuple[Method, ...], hint: str, *,
                         skip_stale: bool = False) -> None:
        """Refuse ``cfg`` when it disagrees with a checkpoint here of ``methods`` on a setting that
        shaped it: a step would build on, or report, a model made with other settings.
        ``skip_stale`` passes over checkpoints built on an older stage 1 (``run`` retrains them)."""
        for method in methods:
            if skip_stale and self.stale(method):
                continue
            problem = self.mismatch(method, cfg)
            if problem:
                raise UserError(f"{problem}; {hint}")

    def check_stage1(self, cfg: RunConfig, checkpoint: Path | None) -> None:
        """The stage-1 checkpoint a step builds on must have been trained with ``cfg``."""
        problem = self.mismatch(BASELINE, cfg, checkpoint)
        if problem:
            raise UserError(f"{problem}; pass the settings it was trained with, or redo it with "
                            f"`impactx stage1 --out {self.root}`")

    def stale(self, method: Method) -> bool:
        """Whether the checkpoint of a method built on stage 1 was built on another stage-1
        checkpoint than the one here now (a redone stage 1); such a checkpoint is retrained."""
        path, stage1 = self.checkpoint(method), self.checkpoint(BASELINE)
        if not method.builds_on_stage1 or not path.exists():
            return False
        built_on = load_checkpoint(path)[1].get("stage1_hash")
        return built_on is not None and (not stage1.exists() or built_on != file_sha256(stage1))

    def holds(self, method: Method, cfg: RunConfig) -> bool:
        """Whether the method's checkpoint here was made with ``cfg`` (its settings), is the model
        the method builds now (its fixed ``meta`` facts: an IMPACTX checkpoint from before the
        paper's LeNet-5 LEP is not) and, for the methods on the stage-1 model, was made from the
        stage-1 checkpoint here."""
        path = self.checkpoint(method)
        if not path.exists():
            return False
        _, meta = load_checkpoint(path)
        stage1 = self.checkpoint(BASELINE)
        if "stage1_hash" in meta and (not stage1.exists() or
                                      meta["stage1_hash"] != file_sha256(stage1)):
            return False
        if any(meta.get(k) != v for k, v in method.meta):
            return False
        saved, wanted = meta.get("config"), cfg.subset(method.settings)
        if not isinstance(saved, dict) or set(saved) - set(wanted):
            return False
        # a setting added since the checkpoint was written (e.g. precision) is not in its
        # config: it was made the way that setting's default makes it
        default = RunConfig().subset(method.settings)
        return all(saved.get(k, default[k]) == v for k, v in wanted.items())
