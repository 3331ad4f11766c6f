"""Zero-shot visual grounding (RSNA pneumonia boxes, SIIM pneumothorax masks), BioViL style:

    test image -> G2D encoder -> projected dense map [B,128,h,w] (the 128-d map whose channels match
    the text embedding) -> cosine with the prompt embedding at every position -> [B,h,w]
    -> bilinear upsampling to the image [B,H,W] = heatmap

Scored on the images whose ground-truth mask is non-empty (eval.metrics.grounding_summary):
- pointing: the heatmap's argmax pixel lies inside the mask (what G2D's "Recall" most likely is);
- iou / dice of the thresholded heatmap, OUR rule: each map is min-max scaled to [0, 1] and
  thresholded at `grounding.threshold` (0.5). Why: a cosine map has a model-dependent offset and
  spread (a fixed raw cut keeps everything for one checkpoint and nothing for another), while the
  scaled map at 0.5 keeps "the upper half of this image's similarity range" for any model. G2D's own
  threshold is not published.
- medklip_iou / medklip_dice: MedKLIP's rule, the raw map > 0.008 (reported for comparability only;
  it was tuned to MedKLIP's maps, not cosines).
Images go through the pretraining run's own evaluation view (data.eval_transform: checkpoint);
the pipeline resamples the masks with them (nearest).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from eval.checkpoint import Pretrained
from eval.metrics import MEDKLIP_GROUNDING, grounding_summary
from eval.tasks.base import (TaskConfig, autocast, epochs_of, image_for_display, make_loader, panel_row,
                             save_figure, short_key)
from eval.tasks.segmentation import binary_mask
from eval.zeroshot import prompt_embeddings
from model.text import load_tokenizer


@dataclass
class GroundingSection:
    finding: str = ""                   # the json label the prompts describe (for the record)
    prompts: list[str] = field(default_factory=list)   # positive templates, embeddings averaged
    threshold: float = 0.5              # on the per-image min-max scaled heatmap (see module docstring)
    normalize: bool = True
    heatmap_images: int = 6


@dataclass
class GroundingConfig(TaskConfig):
    grounding: GroundingSection = field(default_factory=GroundingSection)


def similarity_maps(dense: torch.Tensor, text: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """dense [B,D,h,w], text [D] -> cosine heatmaps [B,H,W] (bilinear upsampling to `size`)."""
    sim = torch.einsum("bdhw,d->bhw", F.normalize(dense.float(), dim=1), F.normalize(text.float(), dim=0))
    return F.interpolate(sim[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _weighted(acc: dict, part: dict) -> None:
    n = part["n_images"]
    if n == 0:
        return
    for k in ("pointing", "iou", "dice"):
        acc[k] = acc.get(k, 0.0) + part[k] * n
    acc["n_images"] = acc.get("n_images", 0) + n


def run(cfg: GroundingConfig, weights: Pretrained, out_dir: Path, device: torch.device, log=print) -> dict:
    g, d = cfg.grounding, cfg.data
    if not g.prompts:
        raise ValueError("grounding.prompts: no prompt templates configured")
    model = weights.build_g2d(cfg.model.text_model).to(device).eval()
    tokenizer = load_tokenizer(model.cfg.text_model)
    text = prompt_embeddings(model, tokenizer, list(g.prompts), device).to(device)     # [128]
    loader = make_loader(cfg, d.test_split, device, weights, train=False, masks=True)
    ours, medklip, examples, n_test = {}, {}, [], 0
    with torch.no_grad():
        for batch in epochs_of(loader, 0):
            with autocast(device, cfg.train.precision):
                _global, dense, _attn = model.encode_image(batch.image)
            heat = similarity_maps(dense, text, tuple(batch.image.shape[-2:])).cpu()   # [B,H,W]
            mask = binary_mask(batch)[:, 0].cpu() > 0.5
            n_test += mask.shape[0]
            _weighted(ours, grounding_summary(heat, mask, threshold=g.threshold, normalize=g.normalize))
            _weighted(medklip, grounding_summary(heat, mask, **MEDKLIP_GROUNDING))
            for i in range(mask.shape[0]):
                if mask[i].any() and len(examples) < g.heatmap_images:
                    examples.append((batch.keys[i], image_for_display(batch.image[i]), heat[i], mask[i]))
    n = ours.get("n_images", 0)
    nan = float("nan")
    metrics = {"pointing": ours["pointing"] / n if n else nan, "iou": ours["iou"] / n if n else nan,
               "dice": ours["dice"] / n if n else nan,
               "medklip_iou": medklip["iou"] / n if n else nan, "medklip_dice": medklip["dice"] / n if n else nan,
               "threshold": g.threshold, "normalize": g.normalize,
               "medklip_threshold": MEDKLIP_GROUNDING["threshold"], "n_test": n_test, "n_positive": n}
    plots = []
    if cfg.plots:
        plots.append(plot_heatmaps(examples, out_dir / "heatmaps.png",
                                   f"{cfg.task}: prompt-image cosine (ground truth in white)"))
    return {"metrics": metrics, "headline": "pointing", "plots": plots}


def plot_heatmaps(examples: list[tuple], path: Path, title: str) -> str:
    fig, axes = panel_row(len(examples))
    for ax, (key, img, heat, mask) in zip(axes, examples):
        ax.imshow(img, cmap="gray")
        ax.imshow(heat, cmap="jet", alpha=0.45)
        ax.contour(mask.float(), levels=[0.5], colors="white", linewidths=1)
        peak = int(heat.argmax())
        ax.plot(peak % heat.shape[1], peak // heat.shape[1], "w+", ms=8)
        ax.set_title(short_key(key), fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return save_figure(fig, path)
