"""Named image transforms, defined once and applied identically by both backends.

A transform is a fixed chain; only its parameters are random:

    stored jpg [h, w] --resize--> [rh, rw] --pad--> [S, S] --affine--> [S, S] --crop--> [c, c]
                --brightness/contrast--> --normalise--> float [C, c, c]

    resize   "squash": to S x S ignoring the aspect ratio (G2D's preprocessing, skimage resize to
             256x256); "longest_pad": longer side to S, aspect kept, zero padding centred to S x S
             (MGCA's resize_img)
    affine   rotation and x-shear about the image centre (torchvision RandomAffine(degrees, shear))
    crop     random (RandomCrop) or centred (CenterCrop) c x c window
    colour   torchvision ColorJitter(brightness, contrast): x*b, then contrast about the image mean
             (brightness and contrast commute up to clipping, so the order is fixed: one clamp)

| name            | resize       | affine        | crop          | jitter    | mean/std (default)   |
| g2d_train       | squash S     | +-15, shear 15| -             | 0.2, 0.2  | ImageNet (G2D code)  |
| g2d_paper       | squash S     | -             | random c      | -         | 0 / 1: [0, 1] (paper)|
| g2d_paper_eval  | squash S     | -             | centre c      | -         | 0 / 1                |
| mgca_train      | longest_pad S| -             | random c      | -         | 0.5 / 0.5 (MGCA)     |
| mgca_eval       | longest_pad S| -             | centre c      | -         | 0.5 / 0.5            |
| eval            | squash S     | -             | -             | -         | ImageNet             |

Randomness is drawn per sample from a hash of (seed, epoch, key) (`draw_params`), never from a
process-global generator: the same sample gets the same augmentation whichever backend, worker count, rank count or
resume point produced it. DALI receives the drawn parameters through an external source.

Geometry: without an affine, torchvision.transforms.v2.functional resize/pad/crop on PIL images (CPU
workers) or tensors (GPU decode); with one (g2d_train), a single warp by the composed matrix (see
`apply_geometry`; OpenCV's warpAffine in the CPU workers, one batched grid_sample for GPU-decoded
tensors), whose affine part reproduces torchvision's RandomAffine matrix (tested). Masks use
nearest interpolation; boxes go through the torchvision calls as tv_tensors.BoundingBoxes. DALI
applies the same steps with fn.resize / fn.crop / fn.warp_affine (the whole matrix computed by its
feed with `geometry_matrix`).
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from pipeline.config import TRANSFORM_TABLE, DataConfig

# One small warp per call, so OpenCV's thread pool buys nothing; the loader's workers are the
# parallelism. Set at import, before any warp and before DataLoader forks: a pool created in the
# parent deadlocks forked workers that touch OpenCV (seen: two workers stuck on a futex).
cv2.setNumThreads(1)


@dataclass(frozen=True)
class TransformSpec:
    name: str
    resize: str  # "squash" | "longest_pad"
    size: int  # S
    crop: int  # c; 0 = no crop
    random_crop: bool
    degrees: float  # rotation range +-degrees; 0 = no affine
    shear: float  # x-shear range +-shear (degrees)
    brightness: float  # factor range 1 +- brightness; 0 = off
    contrast: float
    mean: tuple[float, ...]  # per output channel, [0, 1] intensity units
    std: tuple[float, ...]
    channels: int

    @property
    def out_size(self) -> int:
        return self.crop or self.size

    @property
    def has_affine(self) -> bool:
        return self.degrees > 0 or self.shear > 0

    @property
    def has_jitter(self) -> bool:
        return self.brightness > 0 or self.contrast > 0


def _per_channel(values: tuple[float, ...] | list[float], channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    # A 3-channel default (ImageNet) for a 1-channel output: the grey image is equal in every
    # channel, so the mean of the three constants is the closest single normalisation.
    return (sum(values) / len(values),)


def build_spec(cfg: DataConfig, name: str) -> TransformSpec:
    if name not in TRANSFORM_TABLE:
        raise ValueError(f"unknown transform {name!r}; choose one of {sorted(TRANSFORM_TABLE)}")
    resize, crop_mode, degrees, shear, brightness, contrast, mean, std = TRANSFORM_TABLE[name]
    # An affine is applied as one warp from the decoded image (apply_geometry), which is defined for
    # the squash resize only; every named transform with an affine squashes.
    assert not (degrees or shear) or resize == "squash", name
    return TransformSpec(
        name=name,
        resize=resize,
        size=cfg.image_size,
        crop=cfg.crop_size if crop_mode else 0,
        random_crop=crop_mode == "random",
        degrees=degrees,
        shear=shear,
        brightness=brightness,
        contrast=contrast,
        mean=_per_channel(cfg.mean if cfg.mean is not None else mean, cfg.channels),
        std=_per_channel(cfg.std if cfg.std is not None else std, cfg.channels),
        channels=cfg.channels,
    )


# ---- per-sample parameters ---------------------------------------------------------------------


@dataclass(frozen=True)
class SampleParams:
    angle: float = 0.0  # degrees, torchvision's convention
    shear: float = 0.0  # x-shear, degrees
    brightness: float = 1.0
    contrast: float = 1.0
    crop_left: int = 0
    crop_top: int = 0


def _uniforms(seed: int, epoch: int, key: str) -> list[float]:
    """Six independent U[0, 1) numbers from a keyed hash of (seed, epoch, key): ~2 us, where a seeded
    numpy Generator costs ~50 us per sample (seconds per epoch for the DALI parameter feed)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=24).digest()
    return [int.from_bytes(digest[i : i + 4], "little") / 2**32 for i in range(0, 24, 4)]


def draw_params(spec: TransformSpec, seed: int, epoch: int, key: str) -> SampleParams:
    """The augmentation of sample `key` in `epoch`; deterministic, independent of everything else."""
    span = spec.size - spec.crop if spec.crop else 0
    centre = int(round(span / 2.0))  # torchvision CenterCrop's rounding
    if not (spec.has_affine or spec.has_jitter or spec.random_crop):
        return SampleParams(crop_left=centre, crop_top=centre)
    u = _uniforms(seed, epoch, key)
    # Fixed slots, so enabling one augmentation does not change the draws of the others.
    left, top = (
        (min(span, int(u[4] * (span + 1))), min(span, int(u[5] * (span + 1)))) if spec.random_crop else (centre, centre)
    )
    return SampleParams(
        angle=spec.degrees * (2 * u[0] - 1),
        shear=spec.shear * (2 * u[1] - 1),
        brightness=1 + spec.brightness * (2 * u[2] - 1),
        contrast=1 + spec.contrast * (2 * u[3] - 1),
        crop_left=left,
        crop_top=top,
    )


# ---- geometry ----------------------------------------------------------------------------------


def resized_size(spec: TransformSpec, width: int, height: int) -> tuple[int, int]:
    """(rw, rh) after the resize step."""
    if spec.resize == "squash":
        return spec.size, spec.size
    longer = max(width, height)
    return (max(1, round(width * spec.size / longer)), max(1, round(height * spec.size / longer)))


def pad_box(spec: TransformSpec, rw: int, rh: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) zero padding to S x S. The odd pixel goes left/top, which is where
    DALI's centred fn.crop(out_of_bounds_policy="pad") puts it."""
    dx, dy = spec.size - rw, spec.size - rh
    return (dx + 1) // 2, (dy + 1) // 2, dx // 2, dy // 2


def inverse_affine_matrix(size: int, angle: float, shear: float) -> np.ndarray:
    """[2, 3] destination->source map of torchvision's affine(angle, shear=[shear, 0]) about the centre
    of a size x size image (pixel (0, 0) covers [0, 1) x [0, 1), as in PIL and DALI's warp_affine)."""
    rot, sx = math.radians(angle), math.radians(shear)
    # torchvision: RSS = R(rot) * SHx(sx) (no y-shear, scale 1), inverted (det = 1).
    a = math.cos(rot)
    b = -(a * math.tan(sx) + math.sin(rot))
    c = math.sin(rot)
    d = math.cos(rot) - c * math.tan(sx)
    inv = np.array([[d, -b], [-c, a]], dtype=np.float64)
    centre = np.array([size * 0.5, size * 0.5])
    return np.concatenate([inv, (centre - inv @ centre)[:, None]], axis=1)


def warp_matrix(spec: TransformSpec, params: SampleParams) -> np.ndarray:
    """[2, 3] map from output pixels to the S x S squashed image: crop offset, then the inverse affine.
    Independent of the stored size, so DALI gets it before decoding and scales it in the graph."""
    inv = np.vstack([inverse_affine_matrix(spec.size, params.angle, params.shear), [0.0, 0.0, 1.0]])
    crop = np.array([[1.0, 0.0, params.crop_left], [0.0, 1.0, params.crop_top], [0.0, 0.0, 1.0]])
    return (inv @ crop)[:2]


def warp_tensors(images: list[torch.Tensor], matrices: np.ndarray, out: int, nearest: bool = False) -> torch.Tensor:
    """[1, h_i, w_i] uint8 images -> [B, 1, out, out] uint8, image i sampled at matrices[i] @ (output
    pixel centre), zeros outside. One grid_sample for the whole batch (on the GPU: a handful of kernels
    instead of a handful per sample): the images are zero-padded to a common canvas, which changes
    nothing, since the padding is the zeros the warp fills with anyway."""
    device = images[0].device
    hmax, wmax = max(int(x.shape[-2]) for x in images), max(int(x.shape[-1]) for x in images)
    canvas = torch.zeros(len(images), 1, hmax, wmax, dtype=torch.float32, device=device)
    for i, x in enumerate(images):
        canvas[i, :, : x.shape[-2], : x.shape[-1]] = x
    centres = torch.arange(out, device=device, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    pix = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)  # [out, out, 3]
    m = torch.as_tensor(np.asarray(matrices, dtype=np.float32), device=device)  # [B, 2, 3]
    uv = torch.einsum("bij,yxj->byxi", m, pix)  # [B, out, out, 2] source px
    scale = torch.tensor([2.0 / wmax, 2.0 / hmax], device=device)
    res = torch.nn.functional.grid_sample(
        canvas, uv * scale - 1, mode="nearest" if nearest else "bilinear", padding_mode="zeros", align_corners=False
    )
    return res.round_().clamp_(0, 255).to(torch.uint8)  # [B, 1, out, out]


def geometry_matrix(spec: TransformSpec, params: SampleParams, decoded_w: int, decoded_h: int) -> np.ndarray:
    """[2, 3] map from output pixels to the decoded image's pixels (which may be a JPEG draft smaller
    than the stored size): the resize to S x S, the affine and the crop composed (g2d_train)."""
    to_image = np.diag([decoded_w / spec.size, decoded_h / spec.size, 1.0])  # squashed image -> decoded
    return (to_image @ np.vstack([warp_matrix(spec, params), [0.0, 0.0, 1.0]]))[:2]


def _warp_array(
    img: np.ndarray, matrix: np.ndarray, out: int, nearest: bool, dst: np.ndarray | None = None
) -> np.ndarray:
    """[h, w] uint8 -> [out, out] uint8 (into `dst` when given), the same map as `warp_tensors`, by
    OpenCV's warpAffine: 5x faster than PIL's affine transform (0.26 vs 1.34 ms at 256 px), which was
    half of a g2d_train sample's CPU cost. OpenCV puts pixel centres at integer coordinates,
    PIL/DALI/torchvision at +0.5: the translation moves by A @ (0.5, 0.5) - 0.5. Bilinear weights are
    1/32-pixel fixed point."""
    cv_matrix = matrix.astype(np.float64)  # [2, 3]: output pixel -> source pixel
    cv_matrix[:, 2] += cv_matrix[:, :2].sum(axis=1) * 0.5 - 0.5
    return _warp_cv(img, cv_matrix, out, nearest, dst)


def _warp_cv(img: np.ndarray, cv_matrix: np.ndarray, out: int, nearest: bool, dst: np.ndarray | None) -> np.ndarray:
    flags = (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(
        img, cv_matrix, (out, out), dst=dst, flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


def opencv_matrix(spec: TransformSpec, params: SampleParams, decoded_w: int, decoded_h: int) -> np.ndarray:
    """`geometry_matrix` in OpenCV's pixel convention (`_warp_array`), composed in plain floats: ~2 us,
    where the numpy composition of small matrices costs ~12 us, 5% of a sample's warp."""
    rot, sx = math.radians(params.angle), math.radians(params.shear)
    cos, sin, tan = math.cos(rot), math.sin(rot), math.tan(sx)
    a, b, c, d = cos - sin * tan, cos * tan + sin, -sin, cos  # inverse_affine_matrix's linear part
    half = spec.size * 0.5  # about the centre, after the crop offset (warp_matrix)
    t0 = half - (a + b) * half + a * params.crop_left + b * params.crop_top
    t1 = half - (c + d) * half + c * params.crop_left + d * params.crop_top
    fx, fy = decoded_w / spec.size, decoded_h / spec.size  # squashed S x S image -> decoded pixels
    a, b, t0, c, d, t1 = a * fx, b * fx, t0 * fx, c * fy, d * fy, t1 * fy
    return np.array([[a, b, t0 + (a + b) * 0.5 - 0.5], [c, d, t1 + (c + d) * 0.5 - 0.5]])


def apply_geometry(
    img,
    spec: TransformSpec,
    params: SampleParams,
    width: int,
    height: int,
    nearest: bool = False,
    out: np.ndarray | None = None,
):
    """The geometry of one image (PIL image, [1, h, w] tensor, or with an affine [h, w] uint8 array)
    or mask (`nearest`). With `out` ([c, c] uint8; not for tensors): the result is written there (the
    CPU workers' batch slot: no per-sample array, no collate copy) and `out` is returned.

    With an affine, resize + affine + crop run as ONE bilinear warp straight from the decoded image:
    PIL's bilinear warp costs as much as the antialiased resize, so this halves the CPU cost of
    g2d_train. Skipping the resize's antialias filter is harmless at the <= 2x reduction of 512-px
    shards to 256 (mean difference 0.7/255 from resize-then-warp; G2D's own resize has no antialias),
    and the image may be a JPEG draft (smaller than width x height): the map targets its actual size.
    Without an affine: antialiased resize, centred zero pad, crop, as torchvision would."""
    interp = F.InterpolationMode.NEAREST if nearest else F.InterpolationMode.BILINEAR
    if spec.has_affine:
        if isinstance(img, torch.Tensor):
            matrix = geometry_matrix(spec, params, img.shape[-1], img.shape[-2])
            return warp_tensors([img], matrix[None], spec.out_size, nearest)[0]
        pixels = np.asarray(img)  # [h, w] uint8: a PIL image's copy, or the decoded array itself
        matrix = opencv_matrix(spec, params, pixels.shape[1], pixels.shape[0])
        return _warp_cv(pixels, matrix, spec.out_size, nearest, out)
    rw, rh = resized_size(spec, width, height)
    img = F.resize(img, [rh, rw], interpolation=interp, antialias=True)  # no-op for nearest (masks)
    if spec.resize == "longest_pad" and (rw, rh) != (spec.size, spec.size):
        img = F.pad(img, list(pad_box(spec, rw, rh)), fill=0)
    if spec.crop:
        img = F.crop(img, params.crop_top, params.crop_left, spec.crop, spec.crop)
    if out is not None:
        np.copyto(out, np.asarray(img))
        return out
    return img


def transform_boxes(boxes, spec: TransformSpec, params: SampleParams, width: int, height: int) -> torch.Tensor:
    """Stored-image boxes [n, 4] (x1, y1, x2, y2) -> output pixels [m, 4] float32, through the same
    steps as the image; clipped to the output, boxes left with no area dropped."""
    data = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    if data.shape[0] == 0:
        return data
    bb = tv_tensors.BoundingBoxes(data, format="XYXY", canvas_size=(height, width))
    rw, rh = resized_size(spec, width, height)
    bb = F.resize(bb, [rh, rw])
    if spec.resize == "longest_pad":
        bb = F.pad(bb, list(pad_box(spec, rw, rh)))
    if spec.has_affine:
        bb = F.affine(bb, angle=params.angle, translate=[0, 0], scale=1.0, shear=[params.shear, 0.0])
    if spec.crop:
        bb = F.crop(bb, params.crop_top, params.crop_left, spec.crop, spec.crop)
    out = F.clamp_bounding_boxes(bb).as_subclass(torch.Tensor)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep].contiguous()


# ---- colour and normalisation (torch; DALI builds the same expression in its graph) --------------


def colour_normalise(
    images: torch.Tensor, colour: torch.Tensor | None, spec: TransformSpec, out: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 [B, 1, H, W] + (brightness, contrast) [B, 2] -> normalised float32 [B, C, H, W].

    b * (c * x + (1 - c) * mean(x)) is one per-sample multiply-add, clamped once; normalisation is a
    second multiply-add that broadcasts the grey channel to C channels: two passes over the pixels.
    Runs batched wherever the images are (the GPU in training); `out` receives the result."""
    x = images.float()  # [B, 1, H, W]
    if spec.has_jitter and colour is not None:
        b = colour[:, 0].view(-1, 1, 1, 1).to(x)
        c = colour[:, 1].view(-1, 1, 1, 1).to(x)
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = torch.addcmul(b * (1 - c) * m, x, b * c).clamp_(0, 255)
    scale = 1.0 / (255.0 * torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1))
    shift = -torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1) / torch.tensor(spec.std, device=x.device).view(
        1, -1, 1, 1
    )
    return torch.addcmul(shift, x, scale, out=out)  # [B, C, H, W] by broadcasting


def colour_normalise_cpu(
    images: torch.Tensor, colour: torch.Tensor | None, spec: TransformSpec, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`colour_normalise` for a CPU device: uint8 [B, 1, H, W] + (brightness, contrast) [B, 2] ->
    float32 [B, C, H, W], the same values (float rounding aside).

    Jitter and normalisation are a function of the pixel value alone once the image mean is known, so
    they become one 256-entry table per sample and channel, applied by cv2.LUT (uint8 in, float32
    out): one read of the uint8 image and one write per output channel, where the float passes of
    `colour_normalise` read and write float images several times (0.55 -> ~0.12 ms per 256-px image
    on one core, the largest single cost of a CPU-only sample). `out` receives the result."""
    n = images.shape[0]
    if out is None:
        out = torch.empty((n, spec.channels) + tuple(images.shape[2:]), dtype=torch.float32)
    pixels, target = images.numpy(), out.numpy()
    values = np.broadcast_to(np.arange(256, dtype=np.float64), (n, 256))  # [B, 256]
    if spec.has_jitter and colour is not None:
        bc = colour.numpy().astype(np.float64)  # [B, 2]
        means = np.array([cv2.mean(pixels[i, 0])[0] for i in range(n)])[:, None]
        b, c = bc[:, :1], bc[:, 1:]
        values = np.clip(b * (c * values + (1.0 - c) * means), 0.0, 255.0)
    mean, std = np.asarray(spec.mean)[None, :, None], np.asarray(spec.std)[None, :, None]
    luts = ((values[:, None, :] / 255.0 - mean) / std).astype(np.float32)  # [B, C, 256]
    for i in range(n):
        for ch in range(spec.channels):
            cv2.LUT(pixels[i, 0], luts[i, ch], dst=target[i, ch])
    return out  # [B, C, H, W] float32


class CpuColourNormalise:
    """`colour_normalise_cpu` into recycled output buffers. A fresh float batch (25 MB at 32 x 3 x
    256 x 256) is ~6,000 new pages the kernel faults in and zeroes: 0.17 ms per image, three times
    the lookups themselves. A buffer is reused only once nothing refers to it any more (no tensor,
    view or array made from the batch it went out in: the batch is a torch.from_numpy view, so its
    numpy array's reference count says so), hence a consumer that keeps batches never sees one
    overwritten; at most `keep` buffers are held, beyond that batches get fresh memory."""

    def __init__(self, spec: TransformSpec, keep: int = 3):
        self.spec, self.keep = spec, keep
        self.buffers: list[np.ndarray] = []

    def _buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        idle = None
        for k in range(len(self.buffers)):  # (no loop variable: it would hold a reference itself)
            if sys.getrefcount(self.buffers[k]) == 2:  # idle: referenced by the list and the call only
                if self.buffers[k].shape == shape:
                    return self.buffers[k]
                idle = k
        buf = np.empty(shape, dtype=np.float32)
        if len(self.buffers) < self.keep:
            self.buffers.append(buf)
        elif idle is not None:  # an idle buffer of another batch shape (a short last batch) makes room
            self.buffers[idle] = buf
        return buf

    def __call__(self, images: torch.Tensor, colour: torch.Tensor | None) -> torch.Tensor:
        """uint8 [B, 1, H, W] + (brightness, contrast) [B, 2] -> float32 [B, C, H, W]."""
        shape = (images.shape[0], self.spec.channels) + tuple(images.shape[2:])
        return colour_normalise_cpu(images, colour, self.spec, out=torch.from_numpy(self._buffer(shape)))


def colour_params(params: list[SampleParams]) -> torch.Tensor:
    return torch.tensor([[p.brightness, p.contrast] for p in params], dtype=torch.float32).reshape(-1, 2)
