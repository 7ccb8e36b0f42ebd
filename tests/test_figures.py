"""Both figures write a non-empty PNG."""

import numpy as np

from impactx_ray.eval.figures import plot_examples, plot_mean_morf

PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_examples_and_mean_morf(tmp_path):
    rng = np.random.default_rng(0)
    n = 3
    images = rng.random((n, 3, 32, 32)).astype(np.float32)
    maps = {
        "SHAP": rng.normal(size=(n, 32, 32, 3)),   # store layout
        "IMPACTX": rng.normal(size=(n, 3, 32, 32)),  # decoder layout
        "ABN": rng.random((n, 1, 32, 32)),          # attention map
    }
    curves = {name: np.sort(rng.random((n, 17)), axis=1)[:, ::-1] for name in maps}
    out = plot_examples(tmp_path / "figs" / "examples.png", images, maps, curves, [0, 2, 1],
                        ["cat", "dog", "ship"], titles=["cat (0.91)", "ship (0.50)", "dog (0.72)"])
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 1000
    mean = plot_mean_morf(tmp_path / "mean_morf.png", curves)
    assert mean.read_bytes().startswith(PNG) and mean.stat().st_size > 1000
