"""The file MLflow logs as an impactx-ray model's code ("models from code": the model object is
made here when the model loads, nothing is pickled). ``registry.register`` passes this path."""

from mlflow.models import set_model

from impactx_ray.serve.registry import ImpactxModel

set_model(ImpactxModel())
