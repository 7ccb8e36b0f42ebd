"""The paper's figures as PNG files: example rows (Figs. 3-5) and mean MoRF/LeRF curves with AOPC/SRG.

matplotlib runs on the Agg backend (no display needed on clusters or in CI); import this module
explicitly (``impactx_ray.eval`` does not, to keep matplotlib out of training processes).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from impactx_ray.eval.morf import aopc  # noqa: E402
from impactx_ray.io import write_bytes  # noqa: E402


def _to_numpy(a: object) -> np.ndarray:
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)  # type: ignore[union-attr]


def _image_hwc(img: np.ndarray) -> np.ndarray:
    """One image C×H×W or H×W×C (uint8 or float in [0, 1]) -> H×W×C float in [0, 1] for imshow."""
    img = img.transpose(1, 2, 0) if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3) else img
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    return np.clip(img.squeeze(-1) if img.shape[-1] == 1 else img, 0.0, 1.0)


def _map_hw(m: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """One map H×W, H×W×C or C×H×W -> H×W relevance (summed over channels, as MoRF ranks it)."""
    m = m.astype(np.float32)
    if m.ndim == 3:
        m = m.sum(axis=0) if m.shape[1:] == hw else m.sum(axis=-1)
    return m


def plot_examples(path: str | Path, images: object, maps_by_method: Mapping[str, object],
                  curves_by_method: Mapping[str, object], labels: Sequence[int] | np.ndarray,
                  class_names: Sequence[str], *, titles: Sequence[str] | None = None) -> Path:
    """One row per image: the image, one map per method (e.g. SHAP, IMPACTX, ABN), its MoRF curves.

    ``images`` N×C×H×W or N×H×W×C; each map array has N maps in any layout MoRF accepts; each curve
    array is N×(S+1). Signed maps (SHAP, IMPACTX) use a diverging colormap centred on 0 and scaled
    per map to its max |value| (red = for the class); non-negative maps (ABN's attention) use jet
    over their own min..max, as the ABN paper draws them. ``titles`` replaces the per-row class
    name (e.g. "cat (0.93)", the class and score the paper prints).
    """
    imgs = _to_numpy(images)
    labels = np.asarray(_to_numpy(labels)).reshape(-1)
    maps = {name: _to_numpy(m) for name, m in maps_by_method.items()}
    curves = {name: _to_numpy(c) for name, c in curves_by_method.items()}
    n = len(imgs)
    cols = 2 + len(maps)
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols + 1.0, 2.2 * n), squeeze=False)
    for i in range(n):
        img = _image_hwc(imgs[i])
        hw = img.shape[:2]
        ax = axes[i, 0]
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        ax.set_title(titles[i] if titles is not None else str(class_names[int(labels[i])]), fontsize=9)
        for j, (name, m) in enumerate(maps.items(), start=1):
            _draw_map(axes[i, j], _map_hw(m[i], hw))
            if i == 0:
                axes[i, j].set_title(name, fontsize=9)
        for ax in axes[i, :-1]:
            ax.set_xticks([])
            ax.set_yticks([])
        ax = axes[i, -1]
        for name, c in curves.items():
            ax.plot(np.arange(c.shape[1]), c[i], label=name)
        ax.set_ylim(-0.02, 1.02)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.set_title("MoRF", fontsize=9)
            ax.legend(fontsize=7)
        if i == n - 1:
            ax.set_xlabel("regions replaced", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _draw_map(ax, rel: np.ndarray) -> None:
    if rel.min() >= 0:  # an attention map (ABN): its own min..max, as the ABN paper shows it
        ax.imshow(rel, cmap="jet", vmin=float(rel.min()), vmax=float(rel.max()) + 1e-12)
    else:  # signed attributions: white = 0, red = for the class, blue = against
        peak = float(np.abs(rel).max())
        ax.imshow(rel, cmap="bwr", vmin=-peak, vmax=peak)


def plot_paper_examples(path: str | Path, images: object,
                        sides: Sequence[Mapping[str, object]]) -> Path:
    """The paper's Figs. 3-5: one row per image, one side per model (IMPACTX left, ABN right).

    Each side is ``{"model", "titles", "maps", "curves"}``: the image titled with that model's
    predicted class and score (``titles``, one per row), then each map of ``maps`` (e.g. SHAP of
    the model, the model's own map), then the MoRF curves of ``curves`` for that row.
    """
    imgs = _to_numpy(images)
    n = len(imgs)
    widths = [2 + len(side["maps"]) for side in sides]  # type: ignore[arg-type]
    cols = sum(widths)
    fig, axes = plt.subplots(n, cols, figsize=(2.0 * cols + 1.0, 2.1 * n), squeeze=False)
    for i in range(n):
        img = _image_hwc(imgs[i])
        col = 0
        for side, width in zip(sides, widths):
            ax = axes[i, col]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            ax.set_title(side["titles"][i], fontsize=8)  # type: ignore[index]
            for j, (name, m) in enumerate(side["maps"].items(), start=1):  # type: ignore[union-attr]
                _draw_map(axes[i, col + j], _map_hw(_to_numpy(m)[i], img.shape[:2]))
                if i == 0:
                    axes[i, col + j].set_title(name, fontsize=8)
            for ax in axes[i, col:col + width - 1]:
                ax.set_xticks([])
                ax.set_yticks([])
            ax = axes[i, col + width - 1]
            for name, c in side["curves"].items():  # type: ignore[union-attr]
                c = _to_numpy(c)
                ax.plot(np.arange(c.shape[1]), c[i], label=name)
            ax.set_ylim(-0.02, 1.02)
            ax.tick_params(labelsize=7)
            if i == 0:
                ax.set_title(f"MoRF ({side['model']})", fontsize=8)
                ax.legend(fontsize=6)
            if i == n - 1:
                ax.set_xlabel("regions replaced", fontsize=7)
            col += width
    fig.tight_layout()
    return _save(fig, path)


def plot_mean_morf(path: str | Path, curves_by_method: Mapping[str, object],
                   lerf: Mapping[str, object] | None = None, title: str | None = None) -> Path:
    """Mean MoRF curve per method (true-class score vs. regions replaced), AOPC in the legend;
    with ``lerf``, each method's mean LeRF curve dashed in the same colour and SRG in the legend."""
    from impactx_ray.eval.morf import srg_per_image

    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for name, c in curves_by_method.items():
        c = _to_numpy(c)
        label = f"{name} (AOPC {aopc(c):.3f}"
        if lerf is not None and name in lerf:
            lc = _to_numpy(lerf[name])
            label += f", SRG {srg_per_image(c, lc).mean():.3f}"
        line, = ax.plot(np.arange(c.shape[1]), c.mean(axis=0), label=label + ")")
        if lerf is not None and name in lerf:
            ax.plot(np.arange(lc.shape[1]), lc.mean(axis=0), ls="--", color=line.get_color())
    ax.set_xlabel("regions replaced (MoRF solid, LeRF dashed)" if lerf else
                  "regions replaced (most relevant first)")
    ax.set_ylabel("mean true-class score")
    if title:
        ax.set_title(f"replacement: {title}", fontsize=9)
    ax.set_ylim(0.0, 1.02)  # softmax scores
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format="png")
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return path
