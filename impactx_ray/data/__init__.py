"""Data layer: image data sets as uint8 tensors, seeded train/val splits, data fingerprints.

``relaxed_checksums`` is exported for tests only (see its docstring); production code never uses it.
"""

from impactx_ray.data.datasets import (
    DATASETS,
    ImageData,
    check_dataset_name,
    dataset_fingerprint,
    dataset_image_size,
    dataset_num_classes,
    digits_split_indices,
    load_dataset,
)
from impactx_ray.data.split import train_val_split, validation_size
from impactx_ray.data.torchvision_sets import relaxed_checksums

__all__ = [
    "DATASETS",
    "ImageData",
    "check_dataset_name",
    "dataset_fingerprint",
    "dataset_image_size",
    "dataset_num_classes",
    "digits_split_indices",
    "load_dataset",
    "relaxed_checksums",
    "train_val_split",
    "validation_size",
]
