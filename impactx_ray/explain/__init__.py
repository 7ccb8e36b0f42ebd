"""R: SHAP attribution maps of the true class (``shap_maps``) and their on-disk store (``store``).

Plain PyTorch/NumPy/shap: no Ray or MLflow here (the Ray actors live in ``explain/actors.py``).
"""

from impactx_ray.explain.shap_maps import (
    DEFAULT_MAX_EVALS,
    ENGINES,
    TrueClassExplainer,
    default_masker,
    explain_batch,
    explain_true_class,
    fully_masked,
    validate_masker,
)
from impactx_ray.explain.load import find_run_store, load_maps
from impactx_ray.explain.store import (
    MapStore,
    compute_store,
    data_fingerprint,
    file_sha256,
    make_meta,
)

__all__ = [
    "compute_store_ray",
    "find_run_store",
    "load_maps",
    "DEFAULT_MAX_EVALS",
    "ENGINES",
    "MapStore",
    "TrueClassExplainer",
    "compute_store",
    "data_fingerprint",
    "default_masker",
    "explain_batch",
    "explain_true_class",
    "file_sha256",
    "fully_masked",
    "make_meta",
    "validate_masker",
]


def __getattr__(name: str):
    # Ray is imported only by those who use it: importing the package stays Ray-free.
    if name == "compute_store_ray":
        from impactx_ray.explain.actors import compute_store_ray

        return compute_store_ray
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
