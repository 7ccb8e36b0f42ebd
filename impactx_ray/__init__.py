"""impactx-ray: IMPACTX explanation-guided training, from one run on a laptop to a Ray sweep."""

from impactx_ray.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
