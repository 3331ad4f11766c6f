"""DICOM -> 8-bit grayscale, and the run-length mask encoding used on the DICOM grid (SIIM).

Reading (`read_dicom`), in DICOM's own order of pixel transformations (PS3.3 C.11):
  1. stored values, decoded by pydicom (uncompressed, or a compressed transfer syntax through
     whichever pydicom pixel handler is installed; with none, a `DicomError` names the syntax);
  2. modality LUT: RescaleSlope/RescaleIntercept (or a Modality LUT Sequence);
  3. VOI window to [0, 1], first match wins:
       "voi_lut"     VOI LUT Sequence item 0, its output scaled by the min..max of the LUT data
                     (LUT descriptors often claim 16 bits for 12-bit data, the data do not lie);
       "window"      WindowCenter/WindowWidth (first value when multi-valued), the linear function
                     of PS3.3 C.11.2.1.2.1;
       "identity"    8-bit stored data with no rescale and no window: values are used as they are
                     (RSNA's and SIIM's 8-bit images are already display-ready; stretching them
                     would change every image's contrast for nothing);
       "percentile"  otherwise (12-16-bit without a window): the 0.5th..99.5th percentile of the
                     image, so a few hot or dead pixels do not compress the whole range;
  4. presentation: MONOCHROME1 is inverted so that air is dark, like MONOCHROME2 and MIMIC-CXR-JPG;
  5. [0, 1] -> uint8 by rounding.

RLE (`rle_decode`/`rle_encode`): SIIM-ACR's format. Space-separated integer pairs
(offset, length): `offset` counts pixels from the end of the previous run (from pixel 0 for the first
run), `length` the run of foreground pixels. Pixels are numbered over the image in COLUMN-MAJOR order:
flat index = x * height + y (fill a flat array, reshape to [width, height], transpose).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder
from pydicom.uid import UID

LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5


class DicomError(ValueError):
    """A DICOM file that cannot be turned into an image; the message names the file and why."""


@dataclass
class DicomImage:
    gray: np.ndarray  # [H, W] uint8, air dark
    photometric: str  # "MONOCHROME1" | "MONOCHROME2"
    bits_stored: int
    transfer_syntax: str  # UID name, e.g. "Explicit VR Little Endian"
    window: str  # "voi_lut" | "window" | "identity" | "percentile"
    patient_id: str  # (0010,0020) PatientID, "" when absent


def _check_decodable(path: Path, ts: UID) -> None:
    """Fail early, naming the transfer syntax, when pydicom has no working handler for it."""
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise DicomError(f"{path}: unsupported transfer syntax {ts.name} ({ts}): {exc}") from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise DicomError(
            f"{path}: unsupported transfer syntax {ts.name} ({ts}): no installed pixel "
            f"handler can decode it (would need: {missing})"
        )


def percentile_window(values: np.ndarray) -> np.ndarray:
    """High-bit-depth values [H, W] -> [0, 1] between their 0.5th and 99.5th percentiles, so a few
    hot or dead pixels do not compress the whole range. The one rescale for every source without a
    display window: 12-16-bit DICOMs and 16-bit PNG/TIFF files (shards.image.decode_gray); never a
    clip to 0..255, which saturates most of a 16-bit image."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = np.percentile(values, [LOW_PERCENTILE, HIGH_PERCENTILE])
    return np.clip((values - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def unit_to_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 by rounding (values outside are clipped first)."""
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def _window_linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 linear VOI function, output in [0, 1]."""
    # width 1 is legal and means a hard threshold at center - 0.5
    out = (values - (center - 0.5)) / max(float(width) - 1.0, 1e-6) + 0.5
    return np.clip(out, 0.0, 1.0)


def _first(value) -> float:
    """WindowCenter/Width may be multi-valued; the first pair is the default view."""
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0]
    return float(value)


def read_dicom(path: str | Path, limits=None) -> DicomImage:
    """Read one single-frame grayscale DICOM as [H, W] uint8 (see module docstring for the window).
    `limits` (a `shards.image.ImageLimits`) is checked on Rows x Columns before pixels are decoded."""
    path = Path(path)
    if not path.is_file():
        raise DicomError(f"{path}: DICOM file not found")
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise DicomError(f"{path}: unreadable DICOM ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds:
        raise DicomError(f"{path}: no PixelData element")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None:
        raise DicomError(f"{path}: no TransferSyntaxUID in the file meta")
    ts = UID(ts)
    _check_decodable(path, ts)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(f"{path}: PhotometricInterpretation {photometric!r} is not grayscale")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise DicomError(f"{path}: multi-frame DICOM ({ds.NumberOfFrames} frames)")
    if limits is not None:
        try:
            limits.check(int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0))
        except ValueError as exc:
            raise DicomError(f"{path}: {exc}") from exc
    try:
        stored = ds.pixel_array  # [H, W] int
    except Exception as exc:  # pydicom raises many types from its handlers; all mean "cannot decode"
        raise DicomError(
            f"{path}: pixel data of transfer syntax {ts.name} ({ts}) could not be decoded ({type(exc).__name__}: {exc})"
        ) from exc
    if stored.ndim != 2:
        raise DicomError(f"{path}: expected one 2-D frame, pixel array has shape {stored.shape}")

    bits = int(ds.get("BitsStored", stored.dtype.itemsize * 8))
    has_rescale = (
        ("RescaleSlope" in ds and float(ds.RescaleSlope) != 1.0)
        or ("RescaleIntercept" in ds and float(ds.RescaleIntercept) != 0.0)
        or "ModalityLUTSequence" in ds
    )
    modality = apply_modality_lut(stored, ds) if has_rescale else stored
    if ds.get("VOILUTSequence"):
        entries, first_mapped = (
            int(ds.VOILUTSequence[0].LUTDescriptor[0] or 65536),
            int(ds.VOILUTSequence[0].LUTDescriptor[1]),
        )
        # The LUT's own outputs (pydicom unpacks US or OW LUT data): their range is the scale.
        lut = apply_voi(np.arange(first_mapped, first_mapped + entries), ds).astype(np.float64)
        out = apply_voi(np.rint(modality).astype(np.int64), ds).astype(np.float64)
        lo, hi = float(lut.min()), float(lut.max())
        unit, window = (out - lo) / max(hi - lo, 1.0), "voi_lut"
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        unit = _window_linear(np.asarray(modality, dtype=np.float64), _first(ds.WindowCenter), _first(ds.WindowWidth))
        window = "window"
    elif bits <= 8 and not has_rescale:
        unit, window = stored.astype(np.float64) / 255.0, "identity"
    else:
        unit, window = percentile_window(modality), "percentile"
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    gray = unit_to_uint8(unit)
    return DicomImage(gray, photometric, bits, ts.name, window, str(ds.get("PatientID", "")))


def read_patient_id(path: str | Path) -> str:
    """(0010,0020) PatientID from the header only (no pixel data read); "" if absent or unreadable
    (the full read in `read_dicom` then reports the actual problem)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
        return ""
    return str(ds.get("PatientID", "")).strip()


# ---------------------------------------------------------------------------------------------
# Run-length encoding on the DICOM grid (SIIM-ACR train-rle.csv)


def rle_decode(rle: str, width: int, height: int) -> np.ndarray:
    """SIIM relative column-major RLE -> bool mask [height, width]. Raises ValueError on bad input:
    non-integers, an odd count, negative offsets, non-positive lengths, runs past the image end."""
    text = rle.strip()
    if not text:
        raise ValueError("empty RLE string")
    try:
        numbers = [int(tok) for tok in text.split()]
    except ValueError as exc:
        raise ValueError(f"RLE has a non-integer token ({exc})") from exc
    if len(numbers) % 2:
        raise ValueError(f"RLE has an odd number of values ({len(numbers)})")
    total = width * height
    flat = np.zeros(total, dtype=bool)
    pos = 0
    for i in range(0, len(numbers), 2):
        offset, length = numbers[i], numbers[i + 1]
        if offset < 0 or length <= 0:
            raise ValueError(f"RLE pair {i // 2} ({offset} {length}): offset must be >= 0 and length > 0")
        pos += offset
        if pos + length > total:
            raise ValueError(
                f"RLE pair {i // 2} runs to pixel {pos + length}, past the {width}x{height} image ({total} pixels)"
            )
        flat[pos : pos + length] = True
        pos += length
    return flat.reshape(width, height).T  # [H, W]


def rle_encode(mask: np.ndarray) -> str:
    """bool/0-1 mask [H, W] -> SIIM relative column-major RLE ("" for an empty mask)."""
    flat = np.asarray(mask, dtype=bool).T.ravel()  # column-major order
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])  # run starts and ends
    starts, ends = edges[0::2], edges[1::2]
    parts, prev_end = [], 0
    for start, end in zip(starts.tolist(), ends.tolist()):
        parts.append(f"{start - prev_end} {end - start}")
        prev_end = end
    return " ".join(parts)
