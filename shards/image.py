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
from PIL import Image, ImageFile

from shards.dicom import percentile_window, unit_to_uint8

JPEG_SUBSAMPLING_GRAY = 0  # ignored for "L" images, kept explicit for reproducibility


@dataclass
class Reduced:
    image: np.ndarray  # [h, w] uint8, the stored image
    crop_box: list[int]  # [x0, y0, x1, y1] in source pixels (x1, y1 exclusive)
    scale: list[float]  # [sx, sy]: stored pixels per source pixel
    orig_size: list[int]  # [W, H] of the source

    @property
    def stored_size(self) -> list[int]:
        return [int(self.image.shape[1]), int(self.image.shape[0])]

    def geometry(self) -> dict:
        return {
            "orig_size": self.orig_size,
            "crop_box": self.crop_box,
            "scale": self.scale,
            "stored_size": self.stored_size,
        }


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
    return Reduced(np.asarray(img), [x0, y0, x1, y1], [tw / w, th / h], [int(gray.shape[1]), int(gray.shape[0])])


# Sources smaller than this on either side are rejected (a 1x1 or 10x4000 "radiograph" is a broken
# export, and the model crops 224 px); larger than `DEFAULT_MAX_PIXELS` are rejected from the header,
# before any pixel is decoded (a few-KB PNG can claim 60000x60000 and ask for 3.6 GB). 50 M pixels
# is ~3x the largest MIMIC/CheXpert radiograph (4280x3520) and below PIL's own 89 M warning.
DEFAULT_MIN_SIDE = 32
DEFAULT_MAX_PIXELS = 50_000_000
# PIL modes of sources with more than 8 bits per pixel: rescaled by the percentile window, never
# `convert("L")`, which clips 16-bit values to 255 (two thirds of a 16-bit radiograph saturate).
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageRejected(ValueError):
    """A decodable image outside the configured bounds; the message is the rejection reason."""


@dataclass(frozen=True)
class ImageLimits:
    min_side: int = DEFAULT_MIN_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS

    def check(self, width: int, height: int) -> None:
        """Raise `ImageRejected` when a `width` x `height` source is out of bounds."""
        if width * height > self.max_pixels:
            raise ImageRejected(
                f"image too large: {width}x{height} = {width * height} pixels > max_pixels {self.max_pixels}"
            )
        if min(width, height) < self.min_side:
            raise ImageRejected(f"image too small: {width}x{height}, a side < min_side {self.min_side}")

    def check_content(self, crop_box: list[int]) -> None:
        """Raise `ImageRejected` when the non-black area (the crop) is below `min_side`: a black
        frame with a few bright pixels would otherwise be stored as a 1-3 px image."""
        width, height = crop_box[2] - crop_box[0], crop_box[3] - crop_box[1]
        if min(width, height) < self.min_side:
            raise ImageRejected(
                f"image content too small: the non-black area is {width}x{height}, a side < min_side {self.min_side}"
            )


def add_image_limit_arguments(parser) -> None:
    """`--min-side` / `--max-pixels` (the `ImageLimits` bounds) for every packing command."""
    parser.add_argument(
        "--min-side",
        type=int,
        default=DEFAULT_MIN_SIDE,
        help="reject source images with a side shorter than this (pixels)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="reject source images with more pixels than this (checked before decoding)",
    )


@dataclass
class Decoded:
    gray: np.ndarray  # [h, w] uint8, possibly DCT-downscaled (see decode_gray)
    orig_size: tuple[int, int]  # (W, H) of the source image
    window: str  # "" (8-bit source, values kept) | "percentile" (high-bit source)

    @property
    def factors(self) -> tuple[float, float]:
        """(fx, fy): decoded pixels per source pixel on each axis (a draft rounds each axis up on
        its own, so one ratio for both would misplace the geometry by a few pixels)."""
        return self.gray.shape[1] / self.orig_size[0], self.gray.shape[0] / self.orig_size[1]


def _draft_request(width: int, height: int, side: int) -> tuple[int, int]:
    """The size to ask `Image.draft` for: the longer side `side`, rounded up on each axis (draft
    then picks the largest 1/2, 1/4, 1/8 scale that is still at least this large)."""
    longer = max(width, height)
    return max(1, -(-width * side // longer)), max(1, -(-height * side // longer))


def decode_gray(data: bytes, max_side: int | None = None, limits: ImageLimits | None = None) -> Decoded:
    """Decode image bytes to [H, W] uint8 gray. With `max_side`, JPEG DCT-domain downscaling
    (`Image.draft`) shrinks by 2/4/8 while keeping the longer side >= max_side (the antialiased resize
    that follows does the rest): a 3000-px MIMIC image decodes at 1/8 scale, whose cost is then almost
    all libjpeg's Huffman decoding of the file (every coefficient is still entropy-decoded).
    High-bit-depth sources go through `shards.dicom.percentile_window`; `limits` are checked on the
    header's size before decoding."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own cap (2x MAX_IMAGE_PIXELS), same cause
        raise ImageRejected(f"image too large: {exc}") from exc
    full_w, full_h = img.size
    (limits or ImageLimits()).check(full_w, full_h)
    if max_side is not None and img.format == "JPEG":
        img.draft("L", _draft_request(full_w, full_h, max_side))
    # The whole file in one decoder call: PIL's default 64 KB chunks make libjpeg suspend ~20 times
    # per MIMIC file, leave its fast Huffman path near every chunk end and copy each chunk's tail
    # (~0.5 ms of 12 per 1.4 MB file). The pixels are the same; a truncated file still raises.
    img.decodermaxblock = max(len(data), ImageFile.MAXBLOCK)
    img.load()
    if img.mode in HIGH_BIT_MODES:
        return Decoded(unit_to_uint8(percentile_window(np.asarray(img))), (full_w, full_h), "percentile")
    if img.mode != "L":
        img = img.convert("L")
    return Decoded(np.asarray(img), (full_w, full_h), "")


def _reduce_decoded(decoded: Decoded, max_side: int, crop_threshold: int) -> Reduced:
    """`reduce_array` on a (possibly drafted) decode, its geometry expressed in source pixels."""
    red = reduce_array(decoded.gray, max_side, crop_threshold)
    fx, fy = decoded.factors
    if (fx, fy) != (1.0, 1.0):
        # Express the geometry in the source image's pixels, not the drafted ones.
        x0, y0, x1, y1 = red.crop_box
        red.crop_box = [
            min(round(x0 / fx), decoded.orig_size[0]),
            min(round(y0 / fy), decoded.orig_size[1]),
            min(round(x1 / fx), decoded.orig_size[0]),
            min(round(y1 / fy), decoded.orig_size[1]),
        ]
        red.scale = [red.scale[0] * fx, red.scale[1] * fy]
    red.orig_size = list(decoded.orig_size)
    return red


def reduce_image_bytes(
    data: bytes, max_side: int, crop_threshold: int = 0, limits: ImageLimits | None = None
) -> Reduced:
    """Decode (with draft when much larger than needed), crop, shrink. Geometry in source pixels.

    The draft scale is chosen from the whole image's size, before the crop is known; when cropping a
    black frame leaves the drafted content shorter than `max_side` while the source content is not,
    the image is decoded once more at the finer scale its content needs (one extra decode, only for
    such images), so the stored longer side is `max_side` whenever the source allows it."""
    decoded = decode_gray(data, max_side, limits)
    red = _reduce_decoded(decoded, max_side, crop_threshold)
    x0, y0, x1, y1 = red.crop_box
    content = max(x1 - x0, y1 - y0)  # source pixels
    if max(red.stored_size) < min(max_side, content) and decoded.factors != (1.0, 1.0):
        side = -(-max_side * max(decoded.orig_size) // content)
        red = _reduce_decoded(decode_gray(data, side, limits), max_side, crop_threshold)
    (limits or ImageLimits()).check_content(red.crop_box)
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
    crop = np.asarray(mask, dtype=bool)[y0:y1, x0:x1].astype(np.uint8) * 255
    w, h = red.stored_size
    if crop.shape[::-1] != (w, h):
        crop = np.asarray(Image.fromarray(crop).resize((w, h), Image.Resampling.BOX))
    return np.where(crop >= 128, 255, 0).astype(np.uint8)
