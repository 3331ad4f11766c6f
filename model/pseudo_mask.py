"""Pseudo segmentation targets from the attention pool's CLS->pixel attention (G2D Sec. 3.2).

    attention [B,heads,h,w] -> head mean -> upsample to HxW -> (paper) zero outside the body
      -> per-image q-quantile threshold -> (paper) bilateral smoothing -> target [B,1,H,W] in {0,1}

Everything runs batched on the attention's device under no_grad: the target is a stop-gradient,
rebuilt every step from the current model. Two modes:
  paper: bilinear upsampling, Otsu body mask, `>=` threshold, bilateral smoothing.
  code:  what the released code does: nearest upsampling, strict `>`, no body mask, no smoothing
         (an 8x8 map then yields exactly its top cells: 9/64 foreground at q=0.85).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from common.config import check_field
from model.config import ModelConfig

_BINS = 256


def per_image_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """[B,...] -> [B,1,...,1]: the q-quantile of each image, linear interpolation (numpy's default).

    Sort-based: torch.quantile refuses inputs above 16M elements, which a 256x256 batch of 256 hits.
    """
    flat = x.flatten(1)
    n = flat.shape[1]
    pos = q * (n - 1)
    lo, frac = int(math.floor(pos)), pos - math.floor(pos)
    ordered = flat.sort(dim=1).values
    value = ordered[:, lo] + frac * (ordered[:, min(lo + 1, n - 1)] - ordered[:, lo])
    return value.reshape(-1, *([1] * (x.dim() - 1)))


def otsu_body_mask(image: torch.Tensor) -> torch.Tensor:
    """image [B,C,H,W] (any normalisation) -> body mask [B,1,H,W] bool.

    Histogram thresholding as the paper cites (Otsu on a 256-bin per-image histogram of the grey
    image after per-image min-max scaling), then hole filling in the spirit of nnU-Net's
    binary_fill_holes: the lungs are as dark as the air around the body, so Otsu alone would cut
    them out. A pixel counts as inside when body pixels enclose it both along its row and along its
    column (an orthogonal fill: exact for the chest's convex-ish outline, batched with cumsums).
    A lung that touches the image border is not enclosed along that axis and stays outside.
    """
    grey = image.float().mean(dim=1)  # [B,H,W]
    lo = grey.amin(dim=(1, 2), keepdim=True)
    hi = grey.amax(dim=(1, 2), keepdim=True)
    scaled = (grey - lo) / (hi - lo).clamp_min(1e-12)
    bins = (scaled * (_BINS - 1)).round().long().clamp_(0, _BINS - 1)  # [B,H,W]
    b = grey.shape[0]
    hist = torch.zeros(b, _BINS, device=grey.device).scatter_add_(
        1, bins.flatten(1), torch.ones_like(bins.flatten(1), dtype=torch.float32)
    )
    p = hist / hist.sum(dim=1, keepdim=True)  # [B,256]
    levels = torch.arange(_BINS, device=grey.device, dtype=torch.float32)
    omega = p.cumsum(dim=1)  # class-0 weight for threshold t
    mu = (p * levels).cumsum(dim=1)
    between = (mu[:, -1:] * omega - mu) ** 2 / (omega * (1 - omega)).clamp_min(1e-12)
    threshold = between.argmax(dim=1)  # [B] bin index; class 1 = bins > t
    fg = bins > threshold[:, None, None]
    fg |= hi - lo <= 1e-12  # a flat image is all body
    f = fg.to(torch.int32)
    row = (f.cumsum(2) > 0) & (f.flip(2).cumsum(2).flip(2) > 0)  # enclosed left and right
    col = (f.cumsum(1) > 0) & (f.flip(1).cumsum(1).flip(1) > 0)  # enclosed above and below
    return (row & col)[:, None]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian (radius 3 sigma), zero padding. [B,1,H,W] -> [B,1,H,W]."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(x, k.view(1, 1, 1, -1), padding=(0, radius))
    return F.conv2d(x, k.view(1, 1, -1, 1), padding=(radius, 0))


def bilateral_binary(mask: torch.Tensor, sigma_space: float, sigma_range: float) -> torch.Tensor:
    """Bilateral filter (Tomasi & Manduchi) of a {0,1} map, re-binarised at 0.5. [B,1,H,W] bool -> bool.

    For a two-valued signal the filter has a closed form: with S1/S0 the Gaussian-weighted amounts
    of 1s/0s around a pixel and c = exp(-1/(2 sigma_range^2)) the range weight across the step,
        pixel 1 -> S1 / (S1 + c*S0),   pixel 0 -> c*S1 / (c*S1 + S0).
    So two separable Gaussian convolutions compute it exactly, with no per-neighbour loop.
    Thresholded at 0.5 it is a hysteresis majority vote: a 1 survives unless 0s outweigh it by
    1/c, a 0 flips only if 1s outweigh it by 1/c. Straight edges stay put; convex corners, thin
    spurs and specks go; notches and pinholes fill: the blocky upsampling steps are rounded off.
    """
    m = mask.float()
    s1 = _gaussian_blur(m, sigma_space)
    total = _gaussian_blur(torch.ones_like(m), sigma_space)  # < 1 near the border: only in-image neighbours count
    s0 = total - s1
    c = math.exp(-1.0 / (2.0 * sigma_range**2))
    return torch.where(mask, s1 >= c * s0, c * s1 >= s0)


@torch.no_grad()
def pseudo_mask(
    attention: torch.Tensor,
    image: torch.Tensor,
    *,
    mode: Literal["paper", "code"] = "paper",
    quantile: float = 0.85,
    body_mask: bool = True,
    smoothing: bool = True,
    sigma_space: float = 0.25,
    sigma_range: float = 1.0,
) -> torch.Tensor:
    """attention [B,heads,h,w] + image [B,C,H,W] -> binary target [B,1,H,W] float32 (no gradient).

    sigma_space is in attention cells (H/h pixels each); body_mask/smoothing apply in paper mode only.
    """
    # Called without a config too (tests, the quality harness): the ModelConfig fields' own declarations.
    check_field(ModelConfig, "pseudo_mask_mode", mode, "model")
    check_field(ModelConfig, "pseudo_mask_quantile", quantile, "model")
    att = attention.detach().float().mean(dim=1, keepdim=True)  # [B,1,h,w] head mean
    size = tuple(image.shape[-2:])
    if mode == "code":
        up = F.interpolate(att, size=size, mode="nearest")
        return (up > per_image_quantile(up, quantile)).float()
    up = F.interpolate(att, size=size, mode="bilinear", align_corners=False)
    body = otsu_body_mask(image) if body_mask else None
    if body is not None:
        up = up * body
    mask = up >= per_image_quantile(up, quantile)
    if smoothing:
        cell = size[0] / att.shape[-2]
        mask = bilateral_binary(mask, sigma_space * cell, sigma_range)
    if body is not None:
        # `>=` would admit the zeroed outside if the body covers less than 1-q of the image,
        # and smoothing may spill over the outline: neither may leave the body.
        mask = mask & body
    return mask.float()


def derange(masks: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,...] -> ([B,...] row i = masks[source[i]], source [B] long): every image gets another image's
    mask (model.decoder_target=shuffled_pseudo_mask, paper Tab. 8).

    A uniformly random B-cycle: the images are put in a random order and each takes the mask of the next
    one (the last takes the first's), so for B >= 2 no image keeps its own. One randperm on the masks'
    device from `generator` (default: the device's global generator, seeded by the run and saved in
    checkpoints), so the permutation is deterministic given the step's RNG state and needs no host sync.
    """
    b = masks.shape[0]
    if b < 2:
        raise ValueError(f"shuffled pseudo masks need at least 2 images per batch on each rank, got {b}")
    order = torch.randperm(b, device=masks.device, generator=generator)
    source = torch.empty_like(order)
    source[order] = order.roll(-1)
    return masks[source], source
