"""The defaults and names the whole package shares, each named once here (why each is what it
is: docs/method.md and docs/map-engine.md). The bottom layer: imports nothing of the package."""

#: shap Partition evaluations per map (the paper's 2000).
MAX_EVALS = 2000
#: shap's Partition explainer spends 2 evaluations on the unmasked and fully masked image, then 2
#: per split: with max_evals <= 2 it silently returns a constant map (3 overshoots to 4). One
#: split at least.
MIN_MAX_EVALS = 4
#: ``batch_size`` of shap's explainer call: maps depend on it slightly, so it is recorded.
SHAP_BATCH_SIZE = 100
#: What one image's masks may take in the map engine (one bool row of H·W·C per evaluation).
MASK_BYTES = 1 << 29
#: What replaces removed regions in the MoRF/LeRF comparison, unless asked otherwise.
DEFAULT_REPLACEMENTS = ("noise",)
#: Test images of the MoRF comparison: ``impactx evaluate --morf`` and a sweep's cells.
MORF_IMAGES = 100
SWEEP_MORF_IMAGES = 200
#: Winners are selected by this, the best validation accuracy of a fit, never by test accuracy.
SELECTION_METRIC = "best_val_accuracy"
#: A trained model's file: in a run directory's method folder and in a Tune trial's checkpoint.
CHECKPOINT_FILE = "model.pt"
