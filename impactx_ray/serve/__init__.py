"""The trained models at the edges: MLflow's Model Registry (``registry.py``, pyfunc models that
return class, probabilities and map) and HTTP serving on Ray Serve (``deployment.py``,
``command.py``). MLflow and Ray are imported by those modules only, never by this package."""


def registered_name(cell: str, method: str) -> str:
    """The registry name of a cell's model of ``method``: ``impactx-<cell>-<method>``, e.g.
    impactx-lenet5-digits-impactx."""
    return f"impactx-{cell}-{method}"
