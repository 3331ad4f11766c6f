"""Image reduction shared by every packer: crop to the non-zero bounding box, shrink, encode.

Stored images are pre-reduced (longer side `max_side`, default 512) because decoding is the
loader's bottleneck: a 2500x3000 MIMIC JPEG costs ~25x more to decode than a 512-px one, and the
model never sees more than 256 px. Geometry is recorded so boxes and masks can follow the image:
    stored = (source - crop_box[:2]) * scale        (per axis; scale = [sx, sy])
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

JPEG_SUBSAMPLING_GRAY = 0  # ignored for "L" images, kept explicit for reproducibility


@dataclass
class Reduced:
    image: np.ndarray          # [h, w] uint8, the stored image
    crop_box: list[int]        # [x0, y0, x1, y1] in source pixels (x1, y1 exclusive)
    scale: list[float]         # [sx, sy]: stored pixels per source pixel
    orig_size: list[int]       # [W, H] of the source

    @property
    def stored_size(self) -> list[int]:
        return [int(self.image.shape[1]), int(self.image.shape[0])]

    def geometry(self) -> dict:
        return {"orig_size": self.orig_size, "crop_box": self.crop_box, "scale": self.scale,
                "stored_size": self.stored_size}


def nonzero_box(gray: np.ndarray, threshold: int = 0) -> list[int]:
    """[x0, y0, x1, y1] of pixels > threshold; the whole image if none are (x1, y1 exclusive)."""
    rows = np.flatnonzero((gray > threshold).any(axis=1))
    cols = np.flatnonzero((gray > threshold).any(axis=0))
    if rows.size == 0:
        return [0, 0, int(gray.shape[1]), int(gray.shape[0])]
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the longer side = max_side (never upscaled), aspect ratio kept."""
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    s = max_side / longer
    return max(1, round(width * s)), max(1, round(height * s))


def reduce_array(gray: np.ndarray, max_side: int, crop_threshold: int = 0) -> Reduced:
    """Crop `gray` [H, W] uint8 to its non-zero box and shrink so the longer side is `max_side`."""
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {gray.dtype} {gray.shape}")
    x0, y0, x1, y1 = nonzero_box(gray, crop_threshold)
    crop = gray[y0:y1, x0:x1]
    w, h = x1 - x0, y1 - y0
    tw, th = target_size(w, h, max_side)
    img = Image.fromarray(crop)
    if (tw, th) != (w, h):
        img = img.resize((tw, th), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return Reduced(np.asarray(img), [x0, y0, x1, y1], [tw / w, th / h],
                   [int(gray.shape[1]), int(gray.shape[0])])


def decode_gray(data: bytes, max_side: int | None = None) -> tuple[np.ndarray, float]:
    """Decode image bytes to [H, W] uint8 gray. With `max_side`, JPEG DCT-domain downscaling
    (`Image.draft`) shrinks by 2/4/8 while keeping the longer side >= max_side (the antialiased resize
    that follows does the rest): a 3000-px MIMIC image decodes at 1/4 scale, ~10x less IDCT work than
    a full decode. Returns (array, factor) with factor = decoded pixels per source pixel."""
    img = Image.open(io.BytesIO(data))
    full_w, _ = img.size
    if max_side is not None and img.format == "JPEG":
        w, h = img.size
        img.draft("L", (max(1, -(-w * max_side // max(w, h))), max(1, -(-h * max_side // max(w, h)))))
    img.load()
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img), img.size[0] / full_w


def reduce_image_bytes(data: bytes, max_side: int, crop_threshold: int = 0) -> Reduced:
    """Decode (with draft when much larger than needed), crop, shrink. Geometry in source pixels."""
    gray, factor = decode_gray(data, max_side)
    red = reduce_array(gray, max_side, crop_threshold)
    if factor != 1.0:
        # Express the geometry in the source image's pixels, not the drafted ones.
        red.crop_box = [round(v / factor) for v in red.crop_box]
        red.orig_size = [round(v / factor) for v in red.orig_size]
        red.scale = [s * factor for s in red.scale]
    return red


def encode_jpeg(gray: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def encode_png(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def transform_boxes(boxes: np.ndarray, red: Reduced) -> np.ndarray:
    """Source-pixel boxes [N, 4] (x1, y1, x2, y2) -> stored-image pixels, clipped to the image."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0 = red.crop_box[:2]
    sx, sy = red.scale
    out = (boxes - [x0, y0, x0, y0]) * [sx, sy, sx, sy]
    w, h = red.stored_size
    return np.clip(out, 0, [w, h, w, h])


def transform_mask(mask: np.ndarray, red: Reduced) -> np.ndarray:
    """Source-grid boolean mask -> stored-image grid uint8 0/255 (area-weighted, >= 50% coverage)."""
    x0, y0, x1, y1 = red.crop_box
    crop = (np.asarray(mask, dtype=bool)[y0:y1, x0:x1].astype(np.uint8) * 255)
    w, h = red.stored_size
    if crop.shape[::-1] != (w, h):
        crop = np.asarray(Image.fromarray(crop).resize((w, h), Image.Resampling.BOX))
    return np.where(crop >= 128, 255, 0).astype(np.uint8)
