"""Training augmentations that MGCA's downstream tasks use beyond the pipeline's named transforms,
applied to a loaded batch (torch ops, any device), with their randomness from a seeded generator.

    shift_scale_rotate(image [B,C,H,W], mask [B,1,H,W] | None, fill [C], generator) -> (image, mask)
        albumentations' ShiftScaleRotate(shift_limit=0, scale_limit=0.1, rotate_limit=10, p=0.5,
        constant border) as MGCA's segmentation training uses it, about OpenCV's centre (w/2, h/2);
        the mask warps with nearest (`rotate_scale_shift` does the warp for given parameters).
    moco_v2_colour(image [B,C,H,W], mean [C], std [C], generator) -> image
        the colour/blur/flip part of MoCo-v2's transform (MGCA's CheXpert linear probe); the random
        224 crop is the pipeline's `mgca_train` transform.

Both work on the normalised batch: they undo the normalisation where a value is defined in [0, 1]
units (border fill 0 = black, colour jitter, clamping) and redo it after. Cost: one grid_sample per
batch for the warp; the MoCo part loops over the images (a few small kernels each), negligible next
to the frozen encoder's forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def shift_scale_rotate(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    fill: torch.Tensor,
    generator: torch.Generator,
    p: float = 0.5,
    scale_limit: float = 0.1,
    rotate_limit: float = 10.0,
    shift_limit: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each image, with probability p: rotate by U(-rotate_limit, rotate_limit) degrees and scale by
    U(1 - scale_limit, 1 + scale_limit) about OpenCV's centre, shift by U(-shift_limit, shift_limit)
    of the side (`rotate_scale_shift`); pixels from outside the image take `fill` (the normalised
    value of black, per channel [C]). Image bilinear, mask nearest. Returns new tensors; the inputs
    are not modified."""
    b = image.shape[0]
    apply = torch.rand(b, generator=generator) < p  # [B]
    angle = _uniform(b, -rotate_limit, rotate_limit, generator)
    scale = _uniform(b, 1 - scale_limit, 1 + scale_limit, generator)
    shift = torch.stack(
        [_uniform(b, -shift_limit, shift_limit, generator), _uniform(b, -shift_limit, shift_limit, generator)], dim=1
    )  # [B, 2] fraction of side
    warped, warped_mask = rotate_scale_shift(image, mask, angle, scale, shift, fill)
    keep = ~apply.to(image.device).view(-1, 1, 1, 1)
    warped = torch.where(keep, image, warped)
    if mask is None:
        return warped, None
    return warped, torch.where(keep, mask.float(), warped_mask).to(mask.dtype)


def opencv_theta(angle_deg: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B] degrees, [B] scales, [B, 2] (dx, dy) fractions of the side -> affine_grid's theta [B, 2, 3]
    (float64) for albumentations' ShiftScaleRotate: cv2.getRotationMatrix2D((w / 2, h / 2), angle,
    scale) plus (dx * w, dy * h), applied by cv2.warpAffine.

    OpenCV puts pixel i's centre at coordinate i, so its centre (w/2, h/2) is half a pixel right of
    and below the image's middle ((w-1)/2, (h-1)/2): at 10 degrees that half pixel moved up to 32
    mask pixels per image. affine_grid (align_corners=False) maps OUTPUT coordinates normalised to
    [-1, 1] (pixel i at (2i + 1)/w - 1, so OpenCV's centre at (1/w, 1/h)) to INPUT ones: the inverse
    of OpenCV's forward map x' = L (x - c) + c + shift, L = scale * [[cos, sin], [-sin, cos]], with the
    rotation in pixel units (x in units of w/2, y of h/2)."""
    angle = torch.deg2rad(angle_deg.double())
    cos, sin = torch.cos(angle) / scale.double(), torch.sin(angle) / scale.double()
    aspect = h / w
    theta = torch.zeros(angle.shape[0], 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * aspect  # L^-1 in normalised units
    theta[:, 1, 0], theta[:, 1, 1] = sin / aspect, cos
    centre = torch.tensor([1.0 / w, 1.0 / h], dtype=torch.float64)
    offset = -centre - 2 * shift.double()  # [B, 2]: input = L^-1 (output - centre - shift) + centre
    theta[:, :, 2] = torch.einsum("bij,bj->bi", theta[:, :, :2], offset) + centre
    return theta


def rotate_scale_shift(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    angle_deg: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    fill: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every image warped by `opencv_theta` (image [B,C,H,W] bilinear, mask [B,1,H,W] nearest; outside
    pixels take `fill` [C], the mask 0). Returns (image, mask as float or None)."""
    b, _, h, w = image.shape
    theta = opencv_theta(angle_deg, scale, shift, h, w)
    grid = F.affine_grid(theta.to(image.device, torch.float32), [b, 1, h, w], align_corners=False)
    fill = fill.to(image.device, image.dtype).view(1, -1, 1, 1)
    # Zero padding of (image - fill) + fill = padding with `fill`.
    warped = F.grid_sample(image - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    if mask is None:
        return warped, None
    return warped, F.grid_sample(mask.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)


def moco_v2_colour(image: torch.Tensor, mean, std, generator: torch.Generator) -> torch.Tensor:
    """MoCo-v2's colour and geometry after the crop, per image: ColorJitter(0.4, 0.4, 0.4, 0.1) with
    p=0.8 (the four factors in a random order, as torchvision), RandomGrayscale p=0.2, Gaussian
    blur with sigma ~ U(0.1, 2.0) and p=0.5 (kernel covering +-3 sigma, PIL's GaussianBlur radius
    = sigma), horizontal flip p=0.5. Saturation, hue and grayscale leave a grey (one-channel or
    equal-channel) radiograph unchanged, but are drawn anyway so the random stream matches the
    transform's. image: [B, C, H, W] normalised with mean/std ([C] or scalar)."""
    mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(1, -1, 1, 1)
    x = (image * std + mean).clamp(0, 1)  # [B, C, H, W] in [0, 1]
    out = []
    for img in x:
        u = torch.rand(10, generator=generator, dtype=torch.float64).tolist()
        order = torch.randperm(4, generator=generator).tolist()
        if u[0] < 0.8:
            factors = (
                1 + 0.4 * (2 * u[1] - 1),
                1 + 0.4 * (2 * u[2] - 1),
                1 + 0.4 * (2 * u[3] - 1),
                0.1 * (2 * u[4] - 1),
            )
            for op in order:
                if op == 0:
                    img = TF.adjust_brightness(img, factors[0])
                elif op == 1:
                    img = TF.adjust_contrast(img, factors[1])
                elif op == 2 and img.shape[0] == 3:
                    img = TF.adjust_saturation(img, factors[2])
                elif op == 3 and img.shape[0] == 3:
                    img = TF.adjust_hue(img, factors[3])
        if u[5] < 0.2 and img.shape[0] == 3:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if u[6] < 0.5:
            sigma = 0.1 + 1.9 * u[7]
            size = 2 * math.ceil(3 * sigma) + 1
            img = TF.gaussian_blur(img, [size, size], [sigma, sigma])
        if u[8] < 0.5:
            img = img.flip(-1)
        out.append(img)
    return (torch.stack(out) - mean) / std
