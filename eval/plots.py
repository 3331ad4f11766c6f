"""Figures of the evaluation runs: written atomically as PNG with the Agg backend (no display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.io import atomic_open
from eval.metrics import roc_curve


def save_figure(fig, path: Path) -> str:
    """Write a matplotlib figure as PNG atomically and close it; returns the file name."""
    import matplotlib.pyplot as plt

    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=90)
    plt.close(fig)
    return path.name


def plt_agg():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: list[dict], path: Path, title: str) -> str:
    plt = plt_agg()
    fig, ax = plt.subplots(figsize=(4.5, 3))
    epochs = [h["epoch"] + 1 for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def panel_row(n: int):
    """A figure with one row of n image panels (wide enough for the title even when n is 1)."""
    plt = plt_agg()
    fig, axes = plt.subplots(1, max(n, 1), figsize=(max(2.4 * n, 5.0), 2.9), squeeze=False)
    for ax in axes[0]:
        ax.axis("off")
    return fig, axes[0]


def short_key(key: str, n: int = 16) -> str:
    """The distinctive end of a sample key (DICOM UIDs share long prefixes)."""
    return key if len(key) <= n else "..." + key[-n:]


def image_for_display(image: torch.Tensor) -> torch.Tensor:
    """[C,H,W] normalised image -> [H,W] min-max scaled to [0,1] for imshow (any normalisation)."""
    g = image.float().mean(dim=0).cpu()
    return (g - g.min()) / (g.max() - g.min()).clamp_min(1e-6)


def plot_roc(scores: np.ndarray, onehot: np.ndarray, names: list[str], path: Path, title: str) -> str:
    """ROC curve per class of scores [n, C] against 0/1 targets [n, C] (`LabelSpec.onehot`)."""
    plt = plt_agg()
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    for c, name in enumerate(names):
        y = onehot[:, c]
        if 0 < y.sum() < y.size:
            fpr, tpr, _ = roc_curve(y, scores[:, c])
            ax.plot(fpr, tpr, lw=1.2, label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)
