"""The shard contract: what a packed sample and a manifest look like. Pipeline and eval read this.

Layout of a packed dataset root `<OUT>`:

    <OUT>/manifest.json
    <OUT>/<split>/<split>-000000.tar      WebDataset tar (members `<key>.<ext>`)
    <OUT>/<split>/<split>-000000.idx      DALI index (wds2idx format) for that tar

A sample is one frontal image. Members, always in this order inside the tar:
    <key>.jpg    8-bit grayscale JPEG, cropped to the non-zero bounding box and resized so that the
                 longer side is `max_side` (never upscaled)
    <key>.txt    UTF-8 training text (pretraining: impression followed by findings, cleaned;
                 downstream: empty unless the dataset has text)
    <key>.json   UTF-8 JSON metadata (see `SampleMeta` keys below)
    <key>.png    optional 8-bit single-channel mask (0/255), same size as the stored jpg
                 (segmentation datasets only)

Keys contain only [A-Za-z0-9_-] (no dots: WebDataset splits a member name at the first dot).

JSON metadata keys (pretraining samples):
    dataset        "mimic_cxr"
    dicom_id, subject_id (str, 8 digits), study_id (str, 8 digits, no "s"), view ("PA"|"AP"), split
    labels         {CheXpert label name: 1.0 | 0.0 | -1.0 | null} for the 14 `CHEXPERT_LABELS`
    impression, findings   the cleaned sections (either may be "")
    orig_size      [width, height] of the source image
    crop_box       [x0, y0, x1, y1] non-zero bounding box in source pixels (x1, y1 exclusive)
    scale          [sx, sy] stored pixels per source pixel (<= 1.0), stored = (src - crop_box[:2]) * scale
    stored_size    [width, height] of the stored jpg
    crc32          {ext: CRC-32 of that member's bytes} for every other member of the sample (jpg, txt,
                   png): written by the shard writer, checked on read so that damage inside a JPEG's
                   scan data (which decoders accept) is caught. Shards packed before it have no field.
Downstream samples add: "boxes" [[x1, y1, x2, y2], ...] in stored-image pixels, "labels" as the
dataset defines them, "patient_id" where the dataset has one.

Manifest (`manifest.json`):
    {"format": "g2d-shards/1", "num_samples": N,
     "splits": {split: {"num_samples": n, "shards": [{"name": "<split>/<split>-000000.tar",
                                                      "index": "<split>/<split>-000000.idx",
                                                      "num_samples", "bytes", "sha256"}]}},
     "rejected": [{"key", "source", "reason"}],
     "filtered": {rule: count},            # rows removed by a documented rule, not errors
     "counts": {"input_rows", "packed", "rejected", "filtered"}  # MIMIC: rows = packed + rejected + filtered
     "report_problems": [{"key", "source", "reason"}]           # MIMIC: unusable report files
     "subsets": {split: {fraction: [keys]}}  # downstream data-efficiency subsets (optional)
     "config": {...}}                       # the packing config that produced it
"""
from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

FORMAT_VERSION = "g2d-shards/1"
MANIFEST_NAME = "manifest.json"

# Order of the 14 labels in mimic-cxr-2.0.0-chexpert.csv.
CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
    "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)

FRONTAL_VIEWS = ("PA", "AP")
SPLITS = ("train", "valid", "test")

# Member extensions, in the order they are written for each sample.
MEMBER_ORDER = ("jpg", "txt", "json", "png")

KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


# Sample-json field with the CRC-32 of every other member of the sample (see the module docstring).
MEMBER_CRC_FIELD = "crc32"


def member_crc32(data: bytes) -> int:
    """CRC-32 of one member's bytes (zlib: ~1 GB/s, i.e. ~10 us for a 256-px JPEG)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def check_member_crcs(meta: dict, members: dict[str, bytes]) -> str | None:
    """Compare `members` (ext -> bytes, json excluded) with the CRCs recorded in `meta`.

    Returns None when every recorded CRC matches (or the sample predates CRCs), else a reason naming
    the member, e.g. "jpg: crc32 mismatch (damaged bytes)". Recorded members the caller did not read
    (DALI may read only some) are not checked.
    """
    recorded = meta.get(MEMBER_CRC_FIELD)
    if recorded is None:
        return None
    if not isinstance(recorded, dict):
        return f"json: {MEMBER_CRC_FIELD} is not a mapping"
    for ext, crc in recorded.items():
        if ext not in members:
            continue
        if member_crc32(members[ext]) != crc:
            return f"{ext}: crc32 mismatch (damaged bytes)"
    return None


def shard_name(split: str, index: int) -> str:
    """Relative path of shard `index` of `split` under the dataset root."""
    return f"{split}/{split}-{index:06d}.tar"


def index_name(tar_name: str) -> str:
    """DALI index path that belongs to a shard path (`.tar` -> `.idx`)."""
    if not tar_name.endswith(".tar"):
        raise ValueError(f"not a shard name: {tar_name}")
    return tar_name[: -len(".tar")] + ".idx"


def check_key(key: str) -> str:
    if not KEY_RE.match(key):
        raise ValueError(f"invalid sample key {key!r}: only letters, digits, '_' and '-' allowed")
    return key


class ManifestError(RuntimeError):
    """The manifest or a shard it names is missing or inconsistent."""


def read_manifest(root: str | Path) -> dict:
    """Load `<root>/manifest.json`, failing with the path if it is absent or malformed."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no shard manifest at {path} (run `make shards` first)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT_VERSION or "splits" not in manifest:
        raise ManifestError(f"{path}: not a {FORMAT_VERSION} manifest")
    return manifest


def split_shards(root: str | Path, manifest: dict, split: str) -> list[dict]:
    """The shard entries of `split`, with absolute `path`/`index_path` added; errors name the split."""
    splits = manifest["splits"]
    if split not in splits:
        raise ManifestError(f"split {split!r} not in {Path(root) / MANIFEST_NAME}; have {sorted(splits)}")
    out = []
    for entry in splits[split]["shards"]:
        item = dict(entry)
        item["path"] = str(Path(root) / entry["name"])
        item["index_path"] = str(Path(root) / entry.get("index", index_name(entry["name"])))
        out.append(item)
    return out
