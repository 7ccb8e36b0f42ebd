"""Data layer: image data sets as uint8 tensors, seeded train/val splits, data fingerprints, and
the SHAP maps as training data (per-image scaling, decoder targets, per-class means).

``relaxed_checksums`` is exported for tests only (see its docstring); production code never uses it.
"""

from impactx_ray.data.datasets import (
    BUILTIN_DATASETS,
    UNREADABLE,
    ImageData,
    check_data_present,
    check_dataset_name,
    dataset_fingerprint,
    dataset_image_size,
    dataset_num_classes,
    digits_split_indices,
    fingerprint,
    load_dataset,
    read_image,
)
from impactx_ray.data.maps import class_mean_maps, map_targets, scale_maps
from impactx_ray.data.split import train_val_split, validation_size
from impactx_ray.data.torchvision_sets import relaxed_checksums

__all__ = [
    "BUILTIN_DATASETS",
    "ImageData",
    "check_data_present",
    "check_dataset_name",
    "class_mean_maps",
    "dataset_fingerprint",
    "dataset_image_size",
    "dataset_num_classes",
    "digits_split_indices",
    "fingerprint",
    "UNREADABLE",
    "load_dataset",
    "read_image",
    "map_targets",
    "relaxed_checksums",
    "scale_maps",
    "train_val_split",
    "validation_size",
]
