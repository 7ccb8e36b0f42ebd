"""What the paper published, for reports to print beside our results."""

# Paper Table 2: test accuracy (%) per (dataset, model) for baseline A, IMPACTX, ABN and WAE.
PAPER_TABLE2: dict[tuple[str, str], dict[str, float]] = {
    ("cifar10", "lenet5"): {"baseline": 67.96, "impactx": 70.65, "abn": 68.49, "wae": 68.10},
    ("cifar10", "mobilenet"): {"baseline": 94.63, "impactx": 96.27, "abn": 95.41, "wae": 94.75},
    ("cifar10", "efficientnet_b2"): {"baseline": 98.06, "impactx": 98.38, "abn": 98.19,
                                     "wae": 98.08},
    ("cifar100", "lenet5"): {"baseline": 36.23, "impactx": 39.49, "abn": 37.62, "wae": 36.20},
    ("cifar100", "mobilenet"): {"baseline": 76.72, "impactx": 79.37, "abn": 78.24, "wae": 76.98},
    ("cifar100", "efficientnet_b2"): {"baseline": 87.88, "impactx": 89.06, "abn": 88.89,
                                      "wae": 88.27},
    ("stl10", "lenet5"): {"baseline": 52.59, "impactx": 55.86, "abn": 53.36, "wae": 52.99},
    ("stl10", "mobilenet"): {"baseline": 91.07, "impactx": 95.79, "abn": 92.71, "wae": 91.42},
    ("stl10", "efficientnet_b2"): {"baseline": 98.76, "impactx": 99.00, "abn": 98.59,
                                   "wae": 98.65},
}
