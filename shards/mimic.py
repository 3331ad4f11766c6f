"""MIMIC-CXR-JPG -> WebDataset shards (the pretraining corpus).

    rows   = master rows (shards.master: MGCA's filters + the empty-text rule), or an MGCA master.csv
    splits = rows grouped by split, each shuffled with np.random.default_rng(seed).permutation
    shards = shards.writer.pack_splits(build_sample) in parallel; see shards/schema.py for a sample

Accounting: every metadata (or master.csv) row ends in exactly one of
    packed | rejected (manifest "rejected": key, source file, reason) | filtered (manifest "filtered")
and the manifest's "counts" records input_rows = packed + rejected + filtered.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import ImageFile, UnidentifiedImageError

from common.io import atomic_write_json
from shards.image import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    ImageLimits,
    ImageRejected,
    encode_jpeg,
    reduce_image_bytes,
)
from shards.master import (
    CHEXPERT_CSV,
    MasterResult,
    build_master,
    check_columns,
    check_root,
    find_csv,
    image_path,
    read_chexpert_labels,
    read_master_csv,
    write_master_csv,
)
from shards.paths import is_inside, outside_root
from shards.schema import CHEXPERT_LABELS, FRONTAL_VIEWS, MANIFEST_NAME, check_key
from shards.sections import DEFAULT_MAX_REPORT_BYTES, clean_section
from shards.writer import PackedSample, Rejected, check_pack_params, output_lock, pack_splits

# ~2000 reduced (512 px, q95) radiographs of ~60-100 KB make ~120-200 MB shards on real data.
DEFAULT_SAMPLES_PER_SHARD = 2000
# Stored pretraining images: G2D trains at 256 px (its npy holds 256x256), so nothing larger is ever
# read; at JPEG q90 a whole sample (image + report + labels) is ~1/5.6 of the npy's 64 KB image
# (docs/performance.md). `--max-side 512 --quality 95` keeps more for other recipes.
DEFAULT_MAX_SIDE = 256
DEFAULT_QUALITY = 90
# The synthetic corpus (400 studies by default) has ~400 usable images, ~10% of them in valid:
# 16 per shard still gives valid several shards (and train ~20).
SYNTHETIC_SAMPLES_PER_SHARD = 16


def _option(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class PackOptions:
    """How pack_mimic packs, in one place (the manifest's `config` records each; output bytes depend on
    the inputs and these, not on `workers`). `help` is the option's text in `make shards` /
    tools/pack_shards.py, which builds its `--<name>` options from these fields. Ranges are checked by
    pack_mimic (shards.writer.check_pack_params)."""

    max_side: int = _option(DEFAULT_MAX_SIDE, "stored images' longer side")
    quality: int = _option(DEFAULT_QUALITY, "JPEG quality of stored images")
    workers: int = _option(1, "packing processes")
    seed: int = _option(42, "shuffle seed (also the synthetic corpus seed)")
    samples_per_shard: int = _option(DEFAULT_SAMPLES_PER_SHARD, "samples per tar shard")
    keep_test: bool = _option(False, "keep `test` as its own split (MGCA merges it into valid)")
    crop_threshold: int = _option(0, "pixels <= this count as black border")
    min_side: int = _option(DEFAULT_MIN_SIDE, "reject source images with a side shorter than this (pixels)")
    max_pixels: int = _option(
        DEFAULT_MAX_PIXELS, "reject source images with more pixels than this (checked before decoding)"
    )
    max_report_bytes: int = _option(DEFAULT_MAX_REPORT_BYTES, "reject reports (and training texts) larger than this")


MASTER_CSV_NAME = "master.csv"
SECTIONED_CSV_NAME = "mimic_cxr_sectioned.csv"


@dataclass(frozen=True)
class MimicItem:
    """One master row, as shipped to a packing worker (picklable, JSON-able)."""

    key: str  # dicom_id
    image: str  # source jpg path
    subject_id: str  # digits
    study_id: str  # digits, no "s"
    view: str
    split: str
    impression: str  # cleaned section
    findings: str  # cleaned section
    text: str  # training text
    labels: dict  # CHEXPERT_LABELS -> 1.0 | 0.0 | -1.0 | None
    reject: str = ""  # decided before packing (bad report, duplicate, view)
    reject_source: str = ""


def _image_error(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "corrupt image: not a decodable image format"
    # PIL messages may quote an object address; the writer strips it (clean_reason) from every reason.
    return f"corrupt image: {type(exc).__name__}: {exc}"


def build_sample(
    item: MimicItem,
    max_side: int,
    quality: int,
    crop_threshold: int,
    limits: ImageLimits = ImageLimits(),
    image_roots: tuple[str, ...] = (),
    max_report_bytes: int = DEFAULT_MAX_REPORT_BYTES,
) -> PackedSample | Rejected:
    """Read, check and reduce one image; the full decode catches truncated or corrupt JPEGs
    (PIL raises on truncation while ImageFile.LOAD_TRUNCATED_IMAGES is False, its default).
    `image_roots`: the image must resolve inside one of them (symlinks out are refused)."""
    if item.reject:
        return Rejected(item.key, item.reject_source, item.reject)
    try:
        key = check_key(item.key)
    except ValueError as exc:
        return Rejected(item.key, item.image, str(exc))
    if item.view not in FRONTAL_VIEWS:
        return Rejected(key, item.image, f"unknown view {item.view!r} (expected PA or AP)")
    text_bytes = len(item.text.encode("utf-8"))
    if text_bytes > max_report_bytes:
        return Rejected(
            key, item.image, f"report too large: training text {text_bytes} bytes > max_report_bytes {max_report_bytes}"
        )
    if image_roots:
        # pack_mimic passes roots already resolved, so the common case resolves only the image's own
        # path (~0.1 ms less per image); outside_root, which resolves everything, words the refusal.
        try:
            real = Path(item.image).resolve()
            inside = any(is_inside(real, Path(root)) for root in image_roots)
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop on Python 3.11
            inside = False
        outside = "" if inside else outside_root(Path(item.image), *map(Path, image_roots))
        if outside:
            return Rejected(key, item.image, outside)
    if Path(item.image).exists() and not Path(item.image).is_file():
        # A folder, FIFO or device named like an image: reading a FIFO would block the packer forever.
        return Rejected(key, item.image, "image path is not a regular file")
    try:
        data = Path(item.image).read_bytes()
    except FileNotFoundError:
        return Rejected(key, item.image, "image file missing")
    except OSError as exc:
        return Rejected(key, item.image, f"image unreadable: {exc.strerror or exc}")
    if not data:
        return Rejected(key, item.image, "image file is empty (0 bytes)")
    try:
        red = reduce_image_bytes(data, max_side, crop_threshold, limits)
    except ImageRejected as exc:
        return Rejected(key, item.image, str(exc))
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return Rejected(key, item.image, _image_error(exc))
    meta = {
        "dataset": "mimic_cxr",
        "dicom_id": key,
        "subject_id": item.subject_id,
        "study_id": item.study_id,
        "view": item.view,
        "split": item.split,
        "labels": item.labels,
        "impression": item.impression,
        "findings": item.findings,
        **red.geometry(),
    }
    return PackedSample(
        key,
        {
            "jpg": encode_jpeg(red.image, quality),
            "txt": item.text.encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
        },
    )


def _items(master: MasterResult, root: Path, labels: dict) -> list[MimicItem]:
    empty = {name: None for name in CHEXPERT_LABELS}
    items = []
    for row in master.rows:
        study = row.study_id[1:]
        items.append(
            MimicItem(
                key=row.dicom_id,
                image=str(image_path(root, row.Path)),
                subject_id=row.subject_id,
                study_id=study,
                view=row.ViewPosition,
                split=row.split,
                impression=clean_section(row.impression),
                findings=clean_section(row.findings),
                text=row.text,
                labels=labels.get((row.subject_id, study), empty),
                reject=row.reject,
                reject_source=row.reject_source,
            )
        )
    return items


def shuffle_splits(items: list[MimicItem], seed: int, keep_test: bool) -> dict[str, list[MimicItem]]:
    """Group by split (master order kept) then permute each split with its own default_rng(seed)."""
    names = ("train", "valid", "test") if keep_test else ("train", "valid")
    out: dict[str, list[MimicItem]] = {}
    for split in names:
        group = [it for it in items if it.split == split]
        order = np.random.default_rng(seed).permutation(len(group))
        out[split] = [group[i] for i in order]
    return out


def _fingerprint(split_items: dict[str, list[MimicItem]]) -> str:
    """Hash of every item (ids, paths, text, labels): a rerun reuses shards only if it matches."""
    h = hashlib.sha256()
    for split, items in split_items.items():
        for it in items:
            h.update(json.dumps([split, asdict(it)], sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def pack_mimic(
    root: str | Path,
    out: str | Path,
    options: PackOptions = PackOptions(),
    *,
    reports_dir: str | Path | None = None,
    master_csv: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Pack a MIMIC-CXR-JPG root into `out` with `options` and return the manifest (also at
    `out/manifest.json`).

    root         MIMIC-CXR-JPG 2.0.0 root (csvs, plain or .gz, and `files/`)
    reports_dir  report tree (`s<study>.txt` files); default `<root>/files` as MGCA expects
    master_csv   use this MGCA master.csv instead of metadata + split csvs + reports
    options.min_side, max_pixels, max_report_bytes   bounds: sources outside them are recorded rejections
    Writes `out/master.csv` and `out/mimic_cxr_sectioned.csv` when built from the reports.
    Holds `out`'s packer lock for the whole run (a second packer on `out` fails at once).
    """
    check_pack_params(**{k: v for k, v in asdict(options).items() if k not in ("seed", "keep_test")})
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated JPEGs would be packed "
            "instead of rejected; leave it False while packing"
        )
    root = check_root(root)
    out = Path(out)
    with output_lock(out):
        return _pack_mimic_locked(root, out, reports_dir, master_csv, options, progress)


def _pack_mimic_locked(
    root: Path,
    out: Path,
    reports_dir: str | Path | None,
    master_csv: str | Path | None,
    o: PackOptions,
    progress: bool,
) -> dict:
    chexpert_path = find_csv(root, CHEXPERT_CSV)
    check_columns(chexpert_path, ("subject_id", "study_id") + CHEXPERT_LABELS)
    if master_csv is not None:
        master = read_master_csv(master_csv, o.keep_test)
    else:
        master = build_master(
            root, reports_dir, o.keep_test, sectioned_csv=out / SECTIONED_CSV_NAME, max_report_bytes=o.max_report_bytes
        )
        write_master_csv(master.rows, out / MASTER_CSV_NAME)
    labels = read_chexpert_labels(chexpert_path)
    split_items = shuffle_splits(_items(master, root, labels), o.seed, o.keep_test)

    config = {
        "dataset": "mimic_cxr",
        "root": str(root),
        "reports_dir": None if reports_dir is None else str(reports_dir),
        "master_csv": None if master_csv is None else str(master_csv),
        "max_side": o.max_side,
        "quality": o.quality,
        "samples_per_shard": o.samples_per_shard,
        "seed": o.seed,
        "keep_test": o.keep_test,
        "crop_threshold": o.crop_threshold,
        "min_side": o.min_side,
        "max_pixels": o.max_pixels,
        "max_report_bytes": o.max_report_bytes,
        "inputs_sha256": _fingerprint(split_items),
    }
    builder = functools.partial(
        build_sample,
        max_side=o.max_side,
        quality=o.quality,
        crop_threshold=o.crop_threshold,
        limits=ImageLimits(o.min_side, o.max_pixels),
        image_roots=(str(root.resolve()), str((root / "files").resolve())),
        max_report_bytes=o.max_report_bytes,
    )
    extra = {"filtered": master.filtered, "report_problems": master.report_problems}
    manifest = pack_splits(
        out, split_items, builder, o.samples_per_shard, o.workers, config, extra_manifest=extra, progress=progress
    )

    counts = {
        "input_rows": master.input_rows,
        "packed": manifest["num_samples"],
        "rejected": len(manifest["rejected"]),
        "filtered": sum(master.filtered.values()),
    }
    if counts["packed"] + counts["rejected"] + counts["filtered"] != counts["input_rows"]:
        raise RuntimeError(f"row accounting does not add up: {counts}")
    manifest["counts"] = counts
    atomic_write_json(out / MANIFEST_NAME, manifest)
    if progress:
        print(format_summary(manifest))
    return manifest


def format_summary(manifest: dict) -> str:
    """Human-readable end-of-run summary: per-split sizes, where every input row went."""
    lines = []
    for split, rec in manifest["splits"].items():
        lines.append(f"  {split:<6} {rec['num_samples']:>8} samples in {len(rec['shards'])} shards")
    counts = manifest.get("counts", {})
    if counts:
        lines.append(
            f"  input rows {counts['input_rows']} = packed {counts['packed']} "
            f"+ rejected {counts['rejected']} + filtered {counts['filtered']}"
        )
    for rule, n in manifest.get("filtered", {}).items():
        lines.append(f"    filtered {rule}: {n}")
    reasons: dict[str, int] = {}
    for rej in manifest.get("rejected", []):
        kind = rej["reason"].split(":")[0].split(" (")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    for kind, n in sorted(reasons.items()):
        lines.append(f"    rejected {kind}: {n}")
    return "\n".join(lines)
