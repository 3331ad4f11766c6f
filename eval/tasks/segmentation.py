"""Semantic segmentation (SIIM pneumothorax, RSNA pneumonia boxes as masks): MGCA's protocol.

    image [B,C,H,W] -> smp U-Net (encoder, 1 class): FROZEN pretrained encoder -> decoder -> logits [B,1,H,W]

`segmentation.variant`:
- encoder: the pretrained encoder + a new, randomly initialised U-Net decoder (MGCA / G2D "encoder").
- encoder_decoder: the whole pretrained U-Net (encoder + the decoder G2D pretrained with its
  pseudo-segmentation loss + head), encoder frozen, decoder fine-tuned (G2D "encoder-decoder").
Loss 10 * focal(gamma 2) - log(soft Dice); AdamW lr 2e-4 wd 0.05; early stopping on the validation
loss; the decoder of the best epoch is tested. Training images (not validation/test) get MGCA's
ShiftScaleRotate(shift 0, scale +-0.1, rotate +-10 degrees, p=0.5, black border), image and mask
together (eval/augment.py; `segmentation.augment: none` turns it off). MGCA warps before its resize
to 224, we after the pipeline's resize: the same geometry, one resampling less. Metrics on the test
split at probability > 0.5: Dice per image with MGCA's rule (empty ground truth + empty prediction =
1, averaged over all images), Dice over the images with a non-empty ground truth only, and IoU (same
empty rule).

Our loss details (the reference gives only the formula): focal = mean over pixels of
(1 - p_t)^gamma * BCE; soft Dice over the whole batch flattened, with +1 smoothing in numerator and
denominator (so an all-empty batch has Dice 1 when nothing is predicted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from eval.augment import shift_scale_rotate
from eval.checkpoint import Pretrained
from eval.metrics import dice_score, iou_score
from eval.plots import image_for_display, panel_row, plot_history, save_figure, short_key
from eval.tasks.base import TaskConfig
from eval.tasks.data import binary_mask, epochs_of, make_loader, sample_ids
from eval.tasks.fit import autocast, fit, freeze, log_info, place

VARIANTS = ("encoder", "encoder_decoder")


@dataclass
class SegmentationSection:
    variant: str = "encoder"  # encoder | encoder_decoder
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)  # new decoder (encoder variant): smp's default, as MGCA
    focal_weight: float = 10.0
    focal_gamma: float = 2.0
    threshold: float = 0.5  # probability > threshold is foreground
    augment: str = "shift_scale_rotate"  # training augmentation: shift_scale_rotate (MGCA) | none
    augment_p: float = 0.5
    overlay_images: int = 6  # test images drawn in overlays.png (positives first)


@dataclass
class SegmentationConfig(TaskConfig):
    segmentation: SegmentationSection = field(default_factory=SegmentationSection)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-bce)  # probability given to the true class
    return ((1 - p_t) ** gamma * bce).mean()


def soft_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    p, t = logits.sigmoid().flatten(), target.flatten()
    return (2 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, focal_weight: float, gamma: float) -> torch.Tensor:
    """focal_weight * focal(gamma) - log(soft Dice), in float32. logits, target [B,1,H,W]."""
    logits, target = logits.float(), target.float()
    return focal_weight * focal_loss(logits, target, gamma) - torch.log(soft_dice(logits, target))


def run(cfg: SegmentationConfig, weights: Pretrained, out_dir: Path, device: torch.device, log=log_info) -> dict:
    s, d = cfg.segmentation, cfg.data
    if s.variant not in VARIANTS:
        raise ValueError(f"segmentation.variant={s.variant!r}; choose one of {VARIANTS}")
    unet = place(
        weights.build_unet(
            pretrained_decoder=s.variant == "encoder_decoder", decoder_channels=tuple(s.decoder_channels)
        ),
        device,
        cfg.train,
    )
    freeze(unet.encoder)
    trainable = nn.ModuleList([unet.decoder, unet.segmentation_head])

    def set_train_mode():
        trainable.train()
        unet.encoder.eval()

    if s.augment not in ("shift_scale_rotate", "none"):
        raise ValueError(f"segmentation.augment={s.augment!r}; choose shift_scale_rotate or none")
    train = make_loader(cfg, d.train_split, device, weights, train=True, masks=True)
    black = -torch.tensor(train.spec.mean) / torch.tensor(train.spec.std)  # [C] normalised value of 0
    generator = torch.Generator().manual_seed(cfg.seed)

    def loss_on_batch(batch):
        image, mask = batch.image, binary_mask(batch)
        if trainable.training and s.augment == "shift_scale_rotate":  # training batches only
            image, mask = shift_scale_rotate(image, mask, black, generator, p=s.augment_p)
        return segmentation_loss(unet(image), mask, s.focal_weight, s.focal_gamma)

    valid = make_loader(cfg, d.valid_split, device, weights, train=False, masks=True)
    test = make_loader(cfg, d.test_split, device, weights, train=False, masks=True)
    fitted = fit(trainable, loss_on_batch, train, valid, cfg.train, set_train_mode, device, log)
    unet.eval()
    metrics, examples, predictions = _test(unet, test, s, device, cfg.train.autocast_precision(device))
    metrics.update(
        {
            "variant": s.variant,
            "augment": s.augment,
            **fitted.summary(),
        }
    )
    plots = []
    if cfg.plots:
        plots.append(
            plot_overlays(
                examples,
                out_dir / "overlays.png",
                f"{cfg.task} ({s.variant}): ground truth (green) vs prediction (red)",
            )
        )
        plots.append(plot_history(fitted.history, out_dir / "loss.png", f"{cfg.task} ({s.variant}): loss"))
    return {"metrics": metrics, "headline": "dice", "plots": plots, "predictions": predictions}


@torch.no_grad()
def _test(unet: nn.Module, loader, s: SegmentationSection, device, precision: str) -> tuple[dict, list, dict]:
    """(metrics, overlay examples, predictions.npz arrays: ids, per-image dice/iou/positive/areas)."""
    dice_all, dice_raw, iou_all, positive, gt_area, pred_area = [], [], [], [], [], []
    examples: list[tuple] = []
    keys, meta = [], []
    for batch in epochs_of(loader, 0):
        with autocast(device, precision):
            logits = unet(batch.image)
        prob = logits.float().sigmoid()[:, 0]  # [B,H,W]
        target = binary_mask(batch)[:, 0] > 0.5  # [B,H,W] bool
        pred = prob > s.threshold
        dice_all.append(dice_score(pred, target).cpu())
        dice_raw.append(dice_score(pred, target, empty_rule=False).cpu())
        iou_all.append(iou_score(pred, target).cpu())
        pos = target.flatten(1).any(1).cpu()
        positive.append(pos)
        gt_area.append(target.flatten(1).sum(1).cpu())
        pred_area.append(pred.flatten(1).sum(1).cpu())
        keys.extend(batch.keys)
        meta.extend(batch.meta)
        for i in range(prob.shape[0]):
            examples.append(
                (bool(pos[i]), batch.keys[i], image_for_display(batch.image[i]), target[i].cpu(), pred[i].cpu())
            )
        # Keep the first positives (then negatives) only: the overlay shows a handful.
        examples.sort(key=lambda e: not e[0])
        del examples[s.overlay_images :]
    if not dice_all:
        raise ValueError("the test split yielded no samples")
    dice_all, dice_raw, iou_all, positive = map(torch.cat, (dice_all, dice_raw, iou_all, positive))
    n_pos = int(positive.sum())
    predictions = {
        **sample_ids(keys, meta),
        "dice": dice_all.numpy(),
        "dice_raw": dice_raw.numpy(),
        "iou": iou_all.numpy(),
        "positive": positive.numpy(),
        "gt_area": torch.cat(gt_area).numpy(),
        "pred_area": torch.cat(pred_area).numpy(),
    }
    return (
        {
            "dice": float(dice_all.mean()),
            "dice_positive": float(dice_all[positive].mean()) if n_pos else float("nan"),
            "dice_negative_images": float(dice_all[~positive].mean()) if n_pos < positive.numel() else float("nan"),
            "iou": float(iou_all.mean()),
            "threshold": s.threshold,
            "n_test": int(positive.numel()),
            "n_test_positive": n_pos,
        },
        examples,
        predictions,
    )


def plot_overlays(examples: list[tuple], path: Path, title: str) -> str:
    fig, axes = panel_row(len(examples))
    for ax, (pos, key, img, target, pred) in zip(axes, examples):
        ax.imshow(img, cmap="gray")
        if target.any():
            ax.contour(target.float(), levels=[0.5], colors="lime", linewidths=1)
        if pred.any():
            ax.contour(pred.float(), levels=[0.5], colors="red", linewidths=1)
        ax.set_title(f"{short_key(key)}\n{'positive' if pos else 'negative'}", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return save_figure(fig, path)
