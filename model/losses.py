"""G2D's two losses: vision-language alignment (symmetric InfoNCE) and pseudo segmentation, plus the
image-reconstruction loss of the decoder-target ablation (model.decoder_target=reconstruction).

All reductions are tensor ops (no .item()), computed in float32 whatever the autocast dtype:
logits of 1/0.07 ~ 14x cosine similarities and a Dice over 65k pixels both want the precision.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from common.dist import all_gather_with_grad, get_rank, get_world_size


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE between L2-normalised image and text embeddings.

    gather_negatives: every rank all-gathers both embedding sets with gradient, so each local
    sample is contrasted with the global batch (world*B - 1 negatives); its positive sits at
    rank*B + i. Off, negatives come from the local batch only (G2D's code).
    reduction: "mean" averages the image->text and text->image cross-entropies (the paper writes
    only image->text; the symmetric mean keeps its scale), "sum" adds them (G2D's code).
    """

    def __init__(
        self,
        temperature: float = 0.07,
        learnable: bool = False,
        gather_negatives: bool = True,
        reduction: Literal["mean", "sum"] = "mean",
    ):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"vla_reduction={reduction!r}; choose 'mean' or 'sum'")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        self.gather_negatives, self.reduction = gather_negatives, reduction
        log_t = torch.tensor(math.log(temperature))
        if learnable:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t, persistent=False)

    def temperature(self) -> torch.Tensor:
        # Floor at 0.01 (CLIP's cap of 100 on the logit scale) so a learnable one cannot collapse.
        return self.log_temperature.exp().clamp_min(0.01)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """image_emb, text_emb [B,D] (any scale) -> scalar loss."""
        img = F.normalize(image_emb.float(), dim=-1)
        txt = F.normalize(text_emb.float(), dim=-1)
        offset = 0
        all_img, all_txt = img, txt
        if self.gather_negatives and get_world_size() > 1:
            all_img, all_txt = all_gather_with_grad(img), all_gather_with_grad(txt)  # [world*B, D]
            offset = get_rank() * img.shape[0]
        labels = torch.arange(img.shape[0], device=img.device) + offset
        scale = 1.0 / self.temperature()
        loss_i2t = F.cross_entropy(img @ all_txt.T * scale, labels)
        loss_t2i = F.cross_entropy(txt @ all_img.T * scale, labels)
        total = loss_i2t + loss_t2i
        return total * 0.5 if self.reduction == "mean" else total


def _dice_per_image(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """[B,1,H,W] x2 -> [B]: (2*sum(p*t) + s) / (sum(p) + sum(t) + s)."""
    dims = tuple(range(1, pred.dim()))
    return (2 * (pred * target).sum(dims) + smooth) / (pred.sum(dims) + target.sum(dims) + smooth)


def pseudo_seg_loss(
    logits: torch.Tensor, target: torch.Tensor, variant: Literal["paper", "code"] = "paper"
) -> torch.Tensor:
    """Decoder logits [B,1,H,W] vs binary target [B,1,H,W] -> scalar.

    paper: 0.5 * ((1 - soft Dice on sigmoid probabilities) + BCE-with-logits)   (Eq. 4, nnU-Net style)
    code:  (1 - Dice computed on the RAW logits) + 0.2 * BCE-with-logits         (G2D's released loss;
           unbounded logits make that "Dice" leave [0,1], kept only to reproduce their runs)
    """
    logits, target = logits.float(), target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    if variant == "paper":
        return 0.5 * ((1 - _dice_per_image(logits.sigmoid(), target).mean()) + bce)
    if variant == "code":
        return (1 - _dice_per_image(logits, target).mean()) + 0.2 * bce
    raise ValueError(f"pa_loss={variant!r}; choose 'paper' or 'code'")


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Decoder output [B,1,H,W] vs the normalised input image [B,1,H,W] -> scalar mean squared error.

    MSE, not L1: the pixel loss of the reconstruction pretext tasks the ablation stands for
    (autoencoders, MAE on normalised pixels), so the arm asks "a decoder trained on the image itself"
    with its textbook loss rather than a tuned one. On unit-scale normalised pixels a decoder that
    outputs 0 scores about the pixels' variance (~1), the scale of the PA loss at its start."""
    return F.mse_loss(output.float(), target.float())
