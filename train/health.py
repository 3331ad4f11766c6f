"""Training health, visible: is the contrastive model learning, or has it collapsed?

A run that does not learn looks busy (steps, img/s) while its VLA loss sits at chance, ln(number of
negatives), and its embeddings shrink to one point, so every later number (retrieval, zero-shot AUC
with an arbitrary sign) is noise. Two signals, computed on log steps only from the embeddings the
step already returned (no extra forward; a [B, B] matmul and two std reductions on the device):
- spread: per-dimension std of the L2-normalised image and text embeddings, averaged over dims;
  isotropic unit vectors in D dims give about 1/sqrt(D), a collapsed tower gives ~0;
- separation: mean cosine of the matched (positive) pairs vs the mean over unmatched (negative) pairs.
And one signal of the pseudo masks, computed every step (a [B, B] matmul over the masks, on the device)
and averaged over the log window:
- collapse: mean IoU between the pseudo masks of different images of a batch. A mask that sits in the
  same place on every image teaches the decoder position, not findings. Masks of 15% of the image
  placed independently overlap by IoU ~0.08; attention drawn to shared anatomy (lungs, heart) raises
  that, but an IoU above MASK_COLLAPSE_IOU = 0.8 means each mask shares ~89% of its pixels with every
  other (I / (2A - I) = 0.8 -> I = 0.89 A): one region for all images, whatever they show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from train.optim import warmup_length

STAT_NAMES = ("img_emb_std", "txt_emb_std", "pos_cos", "neg_cos")
MASK_COLLAPSE_IOU = 0.8  # mean pairwise pseudo-mask IoU over a log window above which masks have collapsed


def pairwise_mask_iou(masks: torch.Tensor) -> torch.Tensor:
    """masks [B,1,H,W] (or [B,...]) {0,1} -> [] on their device: the mean IoU over the B(B-1) ordered
    pairs of different images. Two empty masks count as identical (IoU 1); nan when B < 2 (no pair).
    Float32 outside autocast: pixel counts up to H*W must stay exact. No host sync."""
    b = masks.shape[0]
    with torch.autocast(masks.device.type, enabled=False):
        flat = masks.detach().flatten(1).float()  # [B, N]
        inter = flat @ flat.T  # [B, B] shared pixels
        area = flat.sum(dim=1)
        union = area[:, None] + area[None, :] - inter
        iou = torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(inter))
        off_diagonal = iou.sum() - iou.diagonal().sum()
        return off_diagonal / (b * (b - 1)) if b > 1 else torch.full((), float("nan"), device=masks.device)


def embedding_stats(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """image_emb, text_emb [B, D] L2-normalised, row i of each a matched pair -> [4] on their device:
    (image std, text std, positive cosine, mean negative cosine), in STAT_NAMES order. No host sync."""
    image_emb, text_emb = image_emb.detach().float(), text_emb.detach().float()
    b = image_emb.shape[0]
    sim = image_emb @ text_emb.T  # [B, B] cosines
    pos = sim.diagonal().mean()
    neg = (sim.sum() - sim.diagonal().sum()) / max(1, b * (b - 1))
    return torch.stack([image_emb.std(dim=0).mean(), text_emb.std(dim=0).mean(), pos, neg])


def chance_vla_loss(negatives: int, reduction: str) -> float:
    """The VLA loss of a model that cannot tell pairs apart: ln(N) per direction (InfoNCE over N
    candidates with equal logits); `sum` adds the two directions, `mean` averages them."""
    return math.log(negatives) * (2.0 if reduction == "sum" else 1.0)


@dataclass
class HealthCheck:
    chance_loss: float  # chance_vla_loss(global negatives, reduction)
    after_step: int  # checks only from this step on (past warm-up)
    loss_margin: float  # "still at chance": vla >= (1 - margin) * chance_loss
    min_spread: float  # collapse: std < min_spread / sqrt(D), a fraction of isotropic spread
    dim: int  # embedding size D
    max_mask_iou: float = MASK_COLLAPSE_IOU  # pseudo-mask collapse: window mean pairwise IoU above this

    def problems(
        self, step: int, vla_loss: float, img_std: float, txt_std: float, mask_iou: float | None = None
    ) -> list[str]:
        """Human-readable reasons the run looks unhealthy at `step`; [] when it looks fine or is still
        warming up. mask_iou: the log window's mean pairwise pseudo-mask IoU (None: not measured)."""
        if step < self.after_step:
            return []
        found = []
        if vla_loss >= (1.0 - self.loss_margin) * self.chance_loss:
            found.append(
                f"VLA loss {vla_loss:.4f} is not {100 * self.loss_margin:.0f}% below chance "
                f"{self.chance_loss:.4f} (ln of the negatives) after {step} steps: the model is not "
                "learning (try a larger batch, a lower lr, or check the data)"
            )
        floor = self.min_spread / math.sqrt(self.dim)
        for name, std in (("image", img_std), ("text", txt_std)):
            if std < floor:
                found.append(
                    f"{name} embeddings collapsed: per-dimension std {std:.4g} < {floor:.4g} "
                    f"({self.min_spread:g} of the isotropic 1/sqrt({self.dim}))"
                )
        if mask_iou is not None and mask_iou > self.max_mask_iou:
            found.append(
                f"pseudo masks collapsed: mean IoU between different images' masks {mask_iou:.3f} > "
                f"{self.max_mask_iou:g} over the last log window: the masks sit in the same place on every "
                "image, so a decoder trained on them learns a position, not findings"
            )
        return found


def build_health_check(cfg, world_size: int, max_steps: int) -> HealthCheck:
    """The HealthCheck a run of PretrainConfig `cfg` uses. Chance is measured against the negatives
    one loss actually sees (all ranks' with model.gather_negatives). Default start: past the lr
    warm-up and a third of the run (capped at 2,000 steps): the documented demo (batch 32, 176 steps)
    is still within 1% of ln(32) at step 40 and learns all the same."""
    run = cfg.train
    negatives = run.batch_size_per_gpu * (world_size if cfg.model.gather_negatives else 1)
    after = run.health_after_steps or max(warmup_length(cfg.optim, max_steps), min(max_steps // 3, 2000))
    return HealthCheck(
        chance_vla_loss(negatives, cfg.model.vla_reduction),
        after,
        run.health_loss_margin,
        run.health_min_spread,
        cfg.model.proj_dim,
    )
