"""PNG figures people look at: reconstruction grids and learning curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI

import matplotlib.pyplot as plt
import numpy as np

from mae_ops.atomic import save_with


def save_figure(fig: plt.Figure, dest: str | Path) -> None:
    save_with(dest, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def _show(ax: plt.Axes, img: np.ndarray) -> None:
    """(C, H, W) float in [0, 1]."""
    img = np.clip(img, 0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img.transpose(1, 2, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def reconstruction_grid(columns: dict[str, np.ndarray], dest: str | Path, title: str = "") -> None:
    """One row per image, one column per named (N, C, H, W) array in [0, 1]."""
    names = list(columns)
    rows = len(next(iter(columns.values())))
    fig, axes = plt.subplots(rows, len(names), figsize=(1.6 * len(names), 1.6 * rows), squeeze=False)
    for r in range(rows):
        for c, name in enumerate(names):
            _show(axes[r, c], columns[name][r])
            if r == 0:
                axes[r, c].set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, dest)


def learning_curve(history: list[dict], keys: list[str], dest: str | Path, title: str = "",
                   right: list[str] | None = None) -> None:  # fmt: skip
    """Per-epoch curves from a list of {'epoch': ..., key: ...} records; ``right`` keys
    (accuracies, on the epochs that have them) on a second axis."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    epochs = [h["epoch"] for h in history]
    for key in keys:
        ax.plot(epochs, [h[key] for h in history], marker="o", markersize=2, label=key)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if right:
        ax2 = ax.twinx()
        for key, style in zip(right, ("s--", "^--", "v--"), strict=False):
            points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
            ax2.plot(*zip(*points, strict=True), style, markersize=4, label=key.replace("_", " "))
        ax2.set_ylabel("validation top-1")
        more = ax2.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, dest)


def sweep_plot(labels: list[str], series: dict[str, list[float | None]], dest: str | Path, title: str = "",
               errors: dict[str, list[float | None]] | None = None) -> None:  # fmt: skip
    """Validation top-1 of each score against the values of one swept setting, with
    error bars (e.g. each accuracy's 95 % interval) where ``errors`` gives them."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = np.arange(len(labels))
    for name, values in series.items():
        errs = (errors or {}).get(name) or [None] * len(values)
        points = [(i, v, e or 0.0) for i, v, e in zip(x, values, errs, strict=True) if v is not None]
        if points:
            xs, ys, es = zip(*points, strict=True)
            ax.errorbar(xs, ys, yerr=es if errors else None, marker="o", capsize=3,
                        label=name.removesuffix("_top1").replace("_", " "))  # fmt: skip
    ax.set_xticks(x, labels)
    ax.set_ylabel("validation top-1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, dest)
