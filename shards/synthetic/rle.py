"""Mask run-length coding, the format of the synthetic corpora's region sidecars.

RLE: the mask flattened in row-major (C) order, as run lengths that alternate False, True, False, ...
starting with a (possibly 0-long) False run; sum(counts) == H * W.
"""

from __future__ import annotations

import numpy as np


def encode_mask_rle(mask: np.ndarray) -> dict:
    """Row-major run lengths of a 2-D boolean mask, alternating False/True from a False run."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"encode_mask_rle: expected a 2-D mask, got shape {mask.shape}")
    flat = mask.ravel()
    if flat.size == 0:
        return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def decode_mask_rle(rle: dict) -> np.ndarray:
    """Inverse of `encode_mask_rle`: bool [H, W]. Raises ValueError on inconsistent counts."""
    try:
        height, width = (int(v) for v in rle["size"])
        counts = np.asarray(rle["counts"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"decode_mask_rle: malformed RLE ({exc})") from exc
    if counts.ndim != 1 or (counts < 0).any() or int(counts.sum()) != height * width:
        raise ValueError(
            f"decode_mask_rle: counts sum to {int(counts.sum()) if counts.ndim == 1 else '?'}, "
            f"expected {height}x{width}={height * width} non-negative"
        )
    values = (np.arange(counts.size) % 2).astype(bool)
    return np.repeat(values, counts).reshape(height, width)
