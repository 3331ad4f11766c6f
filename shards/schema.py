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
     "rejected": [{"key", "source", "reason", "shard"}],   # each once; "shard": where the item was
                                           # to go (absent for rows rejected before packing)
     "filtered": {rule: count},            # rows removed by a documented rule, not errors
     "counts": {"input_rows", "packed", "rejected", "filtered"}  # MIMIC: rows = packed + rejected + filtered
     "report_problems": [{"key", "source", "reason"}]           # MIMIC: unusable report files
     "subsets": {split: {fraction: [keys]}}  # downstream data-efficiency subsets (optional)
     "config": {...}}                       # the packing config that produced it
"""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path

from common.cli import UserError

FORMAT_VERSION = "g2d-shards/1"
MANIFEST_NAME = "manifest.json"

# Order of the 14 labels in mimic-cxr-2.0.0-chexpert.csv.
CHEXPERT_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
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


# USTAR: every member is one 512-byte header block, then its data (padded to 512). The writer's
# names are short, so the header sits exactly one block before the offset the index records.
TAR_BLOCK = 512


def check_member_header(header: bytes, member: str, size: int) -> str | None:
    """Compare the USTAR header block just before an indexed offset with the member the index names
    there. None when name and size match, else what the header says instead (a stale index: the tar
    was rewritten after its index, or the index belongs to another packing)."""
    if len(header) != TAR_BLOCK:
        return f"no tar header before {member} (file too short)"
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    field = header[124:136].split(b"\0", 1)[0].strip()
    try:
        found = int(field, 8) if field else -1
    except ValueError:
        found = -1
    if name == member and found == size:
        return None
    return f"the tar has {name!r} ({found} bytes) where the index puts {member!r} ({size} bytes)"


STALE_INDEX = "stale index for "


def stale_index_message(shard: str, detail: str) -> str:
    """The one wording of a stale index, whoever detects it (index load, torch reader, DALI unpacking)."""
    return f"{STALE_INDEX}{shard}: run make verify-shards / repack ({detail})"


# DALI's wds2idx index, "v1.2": a header `v1.2 <count>`, then one line per sample listing each member as
# `ext offset size name` (offset of the member's data in the tar). Written by the packer, rebuilt by
# verify-shards, parsed by the pipeline: this is the one definition of it.
DALI_INDEX_VERSION = "v1.2"
IndexEntry = tuple[str, int, int, str]  # (ext, data offset, size, member name)


def format_dali_index(samples: list[list[IndexEntry]]) -> str:
    """The index text of a shard whose samples have these members, in tar order."""
    lines = (" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members) for members in samples)
    return f"{DALI_INDEX_VERSION} {len(samples)}\n" + "".join(line + "\n" for line in lines)


def parse_dali_index(text: str, where: str) -> list[list[IndexEntry]]:
    """Inverse of `format_dali_index`; a malformed index is a ManifestError naming `where` and the line."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != DALI_INDEX_VERSION or not head[1].isdigit():
        raise ManifestError(f"{where}: not a {DALI_INDEX_VERSION} DALI index (first line {lines[:1]})")
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) != int(head[1]):
        raise ManifestError(f"{where}: header says {head[1]} samples, found {len(body)} lines")
    samples = []
    for row, line in enumerate(body):
        fields = line.split()
        if not fields or len(fields) % 4 or not all(f.isdigit() for f in fields[1::4] + fields[2::4]):
            raise ManifestError(f"{where}:{row + 2}: expected 'ext offset size name' groups")
        samples.append(
            [(fields[g], int(fields[g + 1]), int(fields[g + 2]), fields[g + 3]) for g in range(0, len(fields), 4)]
        )
    return samples


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


class ManifestError(UserError, RuntimeError):
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
        item["path"] = _inside_root(root, entry["name"], split)
        item["index_path"] = _inside_root(root, entry.get("index", index_name(entry["name"])), split)
        out.append(item)
    return out


def _inside_root(root: str | Path, name: str, split: str) -> str:
    """`root / name`, refused when the manifest's name leaves the root ("../", an absolute path): a
    manifest must not make the loader read arbitrary files. Checked lexically, so a shard the user
    symlinked in from another disk is still read."""
    base = os.path.normpath(os.path.abspath(root))
    path = os.path.normpath(os.path.join(base, name))
    if os.path.commonpath([base, path]) != base or path == base:
        raise ManifestError(
            f"{Path(root) / MANIFEST_NAME}: split {split!r} names {name!r}, which resolves to "
            f"{path}, outside the shard root {base}"
        )
    return path
