"""R: SHAP attribution maps of the true class (``shap_maps``, ``batched``), the settings that
identify them (``settings``), their on-disk store (``store``), filling it (``compute``, and
``actors`` on Ray) and loading it (``load``).

Plain PyTorch/NumPy/shap: no Ray or MLflow here, except ``explain/actors.py`` (imported lazily).
"""

from impactx_ray.explain.compute import compute_store
from impactx_ray.explain.load import find_run_store, load_checkpoint_maps, load_maps
from impactx_ray.explain.settings import ExplainSettings
from impactx_ray.explain.shap_maps import (
    ENGINES,
    TrueClassExplainer,
    default_masker,
    explain_batch,
    explain_true_class,
    fully_masked,
    validate_masker,
)
from impactx_ray.explain.store import MapStore

__all__ = [
    "ENGINES",
    "ExplainSettings",
    "MapStore",
    "TrueClassExplainer",
    "compute_store",
    "compute_store_ray",
    "default_masker",
    "explain_batch",
    "explain_true_class",
    "find_run_store",
    "fully_masked",
    "load_checkpoint_maps",
    "load_maps",
    "validate_masker",
]


def __getattr__(name: str):
    # Ray is imported only by those who use it: importing the package stays Ray-free.
    if name == "compute_store_ray":
        from impactx_ray.explain.actors import compute_store_ray

        return compute_store_ray
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
