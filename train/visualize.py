"""PNG grid a person looks at: input, head-mean attention, pseudo-mask and decoder output."""
from __future__ import annotations

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
        panels = [(img[r], None, "input"), (attn[r], "jet", "attention (head mean)"),
                  (mask[r], "gray", "pseudo-mask"), (seg[r], "gray", "decoder sigmoid")]
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
