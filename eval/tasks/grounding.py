"""Zero-shot visual grounding (RSNA pneumonia boxes, SIIM pneumothorax masks), BioViL style:

    test image -> G2D encoder -> projected dense map [B,128,h,w] -> (grounding.dense_map) a 128-d map
    -> cosine with the prompt embedding at every position -> [B,h,w]
    -> bilinear upsampling to the image [B,H,W] = heatmap

Which 128-d map (`grounding.dense_map`; G2D publishes no grounding code, both are inferences):
- projector (default): the projector's output itself (proj_v, "patch_emb" in G2D's code), the map
  whose channel count matches the text (the method notes' reading of the paper's "all elements of
  V_i at the channel level"). It sits before the attention pool's value and output maps.
- attn_value: every position through the attention pool's value / output / c_proj maps
  (model.g2d.G2D.value_map, MaskCLIP's dense features). The global embedding is (per head) the
  attention-weighted mean of exactly these vectors, so they live in the space the text was aligned
  with. On the quality benchmark's miniature model it localises no better than the projector's map
  (both at chance, docs/quality.md), so the reference's reading stays the default.
Both maps' pointing games are always recorded (pointing_projector, pointing_attn_value), so one run
shows the difference on any checkpoint.

Scored on the images whose ground-truth mask is non-empty (eval.metrics.grounding_per_image):
- pointing: the peak of the similarity map lies inside the mask (what G2D's "Recall" most likely
  is), taken on the feature grid and scored at the peak cell's centre pixel (eval.metrics.grid_peak_hits):
  the argmax of the upsampled map would put a border-cell peak on the image edge;
- pointing_cell (a lenient diagnostic, not a paper metric): the peak CELL contains any pixel of the
  region, i.e. the pointing game at the map's own resolution (a 4x4 grid at 128 px has 32-px cells,
  larger than many lesions);
- pointing_chance: the pointing game of a map whose peak is a uniformly random cell (the fraction of
  cell centres inside the mask, eval.metrics.grid_chance): the level `pointing` must beat;
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
from typing import Literal

import torch
import torch.nn.functional as F

from eval.checkpoint import Pretrained
from eval.metrics import MEDKLIP_GROUNDING, grid_peak_hits, grounding_per_image
from eval.plots import image_for_display, panel_row, save_figure, short_key
from eval.tasks.base import TaskConfig
from eval.tasks.data import binary_mask, epochs_of, make_loader, sample_ids
from eval.tasks.fit import autocast, log_info
from eval.zeroshot import prompt_embeddings
from model.text import load_tokenizer

# Per-image arrays in predictions.npz (nan on images without a finding, which are not scored).
PER_IMAGE = (
    "pointing",
    "pointing_cell",
    "pointing_chance",
    "pointing_attn_value",
    "pointing_projector",
    "iou",
    "dice",
    "medklip_iou",
    "medklip_dice",
    "positive",
)


@dataclass
class GroundingSection:
    finding: str = ""  # the json label the prompts describe (for the record)
    prompts: list[str] = field(default_factory=list)  # positive templates, embeddings averaged
    dense_map: Literal["projector", "attn_value"] = "projector"  # the map compared with the prompt (docstring)
    threshold: float = 0.5  # on the per-image min-max scaled heatmap (see module docstring)
    normalize: bool = True
    heatmap_images: int = 6


@dataclass
class GroundingConfig(TaskConfig):
    grounding: GroundingSection = field(default_factory=GroundingSection)


def prompt_cosine(dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """dense [B,D,h,w], text [D] -> cosine at every position of the feature grid [B,h,w] (float32)."""
    return torch.einsum("bdhw,d->bhw", F.normalize(dense.float(), dim=1), F.normalize(text.float(), dim=0))


def upsample(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B,h,w] -> [B,H,W] bilinear (align_corners=False): the heatmap IoU/Dice threshold."""
    return F.interpolate(grid[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def run(cfg: GroundingConfig, weights: Pretrained, out_dir: Path, device: torch.device, log=log_info) -> dict:
    g, d = cfg.grounding, cfg.data
    if not g.prompts:
        raise ValueError("grounding.prompts: no prompt templates configured")
    model = weights.build_g2d(cfg.model.text_model).to(device).eval()
    tokenizer = load_tokenizer(model.cfg.text_model)
    text = prompt_embeddings(model, tokenizer, list(g.prompts), device).to(device)  # [128]
    loader = make_loader(cfg, d.test_split, device, weights, train=False, masks=True)
    per_image: dict[str, list[torch.Tensor]] = {k: [] for k in PER_IMAGE}
    examples, keys, meta = [], [], []
    with torch.no_grad():
        for batch in epochs_of(loader, 0):
            with autocast(device, cfg.train.autocast_precision(device)):
                _global, projected, _attn = model.encode_image(batch.image)  # [B,128,h,w]
                maps = {"projector": projected, "attn_value": model.value_map(projected)}
            grids = {name: prompt_cosine(dense, text).cpu() for name, dense in maps.items()}  # [B,h,w]
            mask = binary_mask(batch)[:, 0].cpu() > 0.5  # [B,H,W]
            for name, grid in grids.items():
                hits = grid_peak_hits(grid, mask).double()
                per_image[f"pointing_{name}"].append(torch.where(mask.flatten(1).any(1), hits, torch.nan))
            grid = grids[g.dense_map]
            heat = upsample(grid, tuple(mask.shape[-2:]))  # [B,H,W]
            ours = grounding_per_image(heat, mask, grid, threshold=g.threshold, normalize=g.normalize)
            medklip = grounding_per_image(heat, mask, grid, **MEDKLIP_GROUNDING)
            for k in ("pointing", "pointing_cell", "pointing_chance", "iou", "dice", "positive"):
                per_image[k].append(ours[k])
            per_image["medklip_iou"].append(medklip["iou"])
            per_image["medklip_dice"].append(medklip["dice"])
            keys.extend(batch.keys)
            meta.extend(batch.meta)
            for i in range(mask.shape[0]):
                if mask[i].any() and len(examples) < g.heatmap_images:
                    examples.append((batch.keys[i], image_for_display(batch.image[i]), heat[i], mask[i], grid[i]))
    if not keys:
        raise ValueError("the test split yielded no samples")
    arrays = {k: torch.cat(v).numpy() for k, v in per_image.items()}
    positive = arrays["positive"]
    n = int(positive.sum())
    nan = float("nan")

    def mean(k: str) -> float:
        return float(arrays[k][positive].mean()) if n else nan

    metrics = {
        "pointing": mean("pointing"),
        "pointing_cell": mean("pointing_cell"),
        "pointing_chance": mean("pointing_chance"),
        "pointing_attn_value": mean("pointing_attn_value"),
        "pointing_projector": mean("pointing_projector"),
        "dense_map": g.dense_map,
        "iou": mean("iou"),
        "dice": mean("dice"),
        "medklip_iou": mean("medklip_iou"),
        "medklip_dice": mean("medklip_dice"),
        "threshold": g.threshold,
        "normalize": g.normalize,
        "medklip_threshold": MEDKLIP_GROUNDING["threshold"],
        "n_test": len(keys),
        "n_positive": n,
        "pointing_rule": "peak cell centre",
    }
    predictions = {**sample_ids(keys, meta), **arrays}
    plots = []
    if cfg.plots:
        plots.append(
            plot_heatmaps(
                examples,
                out_dir / "heatmaps.png",
                f"{cfg.task}: prompt-image cosine (ground truth in white, + = peak cell centre)",
            )
        )
    return {"metrics": metrics, "headline": "pointing", "plots": plots, "predictions": predictions}


def plot_heatmaps(examples: list[tuple], path: Path, title: str) -> str:
    fig, axes = panel_row(len(examples))
    for ax, (key, img, heat, mask, grid) in zip(axes, examples):
        ax.imshow(img, cmap="gray")
        ax.imshow(heat, cmap="jet", alpha=0.45)
        ax.contour(mask.float(), levels=[0.5], colors="white", linewidths=1)
        peak, (h, w), (big_h, big_w) = int(grid.argmax()), grid.shape, heat.shape
        ax.plot((peak % w + 0.5) * big_w / w, (peak // w + 0.5) * big_h / h, "w+", ms=8)  # scored point
        ax.set_title(short_key(key), fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return save_figure(fig, path)
