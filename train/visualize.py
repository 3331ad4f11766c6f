"""PNGs a person looks at: input, head-mean attention, pseudo-mask and decoder output per image;
the loss curves of a run (each loss term and the lr vs step)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common.io import atomic_open  # noqa: E402


def save_attention_grid(path: Path, image: torch.Tensor, out, keys: list[str], max_rows: int = 4) -> None:
    """image [B, C, H, W]; out.attention [B, heads, h, w]; out.pseudo_mask / seg_logits [B, 1, H, W]."""
    n = min(max_rows, image.shape[0])
    img = image[:n, 0].detach().float().cpu()
    attn = out.attention[:n].detach().float().mean(dim=1, keepdim=True)
    attn = F.interpolate(attn, size=img.shape[-2:], mode="bilinear", align_corners=False)[:, 0].cpu()
    mask = out.pseudo_mask[:n, 0].detach().float().cpu()
    seg = out.seg_logits[:n, 0].detach().float().sigmoid().cpu()
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.6 * n), squeeze=False)
    for r in range(n):
        panels = [
            (img[r], None, "input"),
            (attn[r], "jet", "attention (head mean)"),
            (mask[r], "gray", "pseudo-mask"),
            (seg[r], "gray", "decoder sigmoid"),
        ]
        for c, (data, cmap, title) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(img[r], cmap="gray")
            if cmap is not None:
                ax.imshow(data, cmap=cmap, alpha=0.5)
            ax.set_title(f"{title}\n{keys[r][:18]}" if c == 0 else title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=80)
    plt.close(fig)


LOSS_TERMS = ("loss", "vla_loss", "pa_loss")


def save_loss_curves(metrics_path: Path, path: Path) -> Path:
    """PNG of each loss term and the learning rate vs step, read from a run's metrics.jsonl (the
    training rows; validation rows carry no loss). Written at the end of pretraining; tools call it
    on any run folder. Raises ValueError naming the file when it holds no training rows."""
    rows = []
    for n, line in enumerate(Path(metrics_path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{metrics_path}:{n}: not JSON ({exc.msg})") from None
        if isinstance(record, dict) and "loss" in record and "lr" in record:
            rows.append(record)
    if not rows:
        raise ValueError(f"{metrics_path} has no training rows (step, loss, lr) to plot")
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    for term in LOSS_TERMS:
        if all(term in r for r in rows):
            ax_loss.plot(steps, [r[term] for r in rows], label=term)
    ax_loss.set_ylabel("loss (mean over ranks)")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in rows], color="black")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=80)
    plt.close(fig)
    return path
