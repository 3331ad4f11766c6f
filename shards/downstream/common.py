"""Glue shared by the six downstream converters: items, splits, subsets, sample building, packing.

A converter's `index_dataset(src, seed)` reads the native label files and returns a `DatasetIndex`:
one `Item` per source image, already assigned to a split, plus the rows it rejected or filtered.
`convert_index` then packs it with `shards.writer.pack_splits` and writes the manifest extras:

    manifest["dataset"]        registry name
    manifest["label_names"]    order of the named labels in every sample's json "labels"
    manifest["label_type"]     "binary" | "multilabel" | "multiclass" (multiclass json adds "class_index")
    manifest["tasks"]          protocols this dataset serves, e.g. ["classification", "detection"]
    manifest["has_masks"], manifest["has_boxes"]
    manifest["subsets"]        {"train": {"0.01"|"0.1"|"1.0": [keys]}} for the dataset's first task
    manifest["task_subsets"]   {task: {"train": {fraction: [keys]}}} for every task (they differ:
                               classification samples like pandas `frac`, detection/segmentation
                               like `np.random.choice`)
    manifest["balanced"]       SIIM only: {"train": [keys]} all positives + as many random negatives
    manifest["positives"]      {split: number of positive samples}
    manifest["split_policy"], manifest["split_seed"], manifest["subset_seed"]
    manifest["patient_overlap"] {"a|b": n} patients present in two splits (0 expected; real official
                               test lists are not re-checked by their publishers)
    manifest["summary"]        {"input_rows", "input_images", "packed", "rejected", "filtered"};
                               input_images == packed + rejected + sum(filtered)
    manifest["rejected"]       index-stage rejections (bad rows) + build-stage ones (bad files)
    manifest["filtered"]       {rule: count} rows removed by a documented rule (e.g. lateral views)

Data-efficiency subsets (MGCA protocol, seed 42 whatever the split seed):
  - "frac" (classification): pandas `df.sample(frac=p, random_state=42)` draws
    `RandomState(42).choice(n, round(p * n), replace=False)` over the rows in file order; reimplemented
    here with numpy, so the same rows are drawn as pandas would draw from the same train table.
  - "choice" (detection/segmentation): `int(p * n)` indices from `RandomState(42)`. MGCA calls
    `np.random.choice(n, int(p*n))`, which samples WITH replacement (a 10% subset then holds ~5% repeats);
    we draw without replacement so a subset holds int(p*n) distinct images.
  - "1.0" is the whole training list, never resampled.
  - Tiny data: a subset holds at least 1 sample, and if the drawn subset has no positive sample while
    the training split has one, its last draw is replaced by the first positive further along the same
    seeded permutation (so a 1% subset of a 30-image fixture is still trainable). On the real datasets
    (hundreds of positives per 1%) this never triggers.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError

from common.cli import UserError
from common.io import atomic_write_json
from shards.dicom import DicomError, read_dicom, rle_decode
from shards.image import (
    ImageLimits,
    ImageRejected,
    decode_gray,
    encode_jpeg,
    encode_png,
    reduce_array,
    transform_boxes,
    transform_mask,
)
from shards.paths import find_files, is_inside, outside_root, walk_inside
from shards.writer import PackedSample, Rejected, clean_reason, output_lock, pack_splits

FRACTIONS = ("0.01", "0.1", "1.0")
SUBSET_SEED = 42
# A box may poke out of the image by this fraction of the image side (annotation tools put polygon
# vertices a pixel past the border); it is then clipped. Further out, the sample is rejected.
BOX_TOLERANCE = 0.01


class SourceError(UserError, ValueError):
    """A structural problem with a dataset's label files (missing file or column): stop, name it."""


@dataclass
class Item:
    """One source image. Geometry (boxes, RLE) is in source-image pixels."""

    key: str
    source: str  # absolute path of the image file
    rel: str  # path relative to the dataset root (reported and stored)
    reader: str  # "dicom" | "image"
    order: int  # position in the label files: subsets draw in this order
    patient_id: str
    labels: dict[str, float]
    boxes: list[list[float]] = field(default_factory=list)  # [[x1, y1, x2, y2], ...]
    mask: str = "none"  # "none" | "boxes" (rasterise the boxes) | "rle"
    rle: list[str] = field(default_factory=list)  # SIIM: runs to union
    positive: bool = False  # for subsets' "at least one positive" and SIIM balancing
    extra: dict = field(default_factory=dict)  # extra json fields (class_index, ...)


@dataclass
class DatasetIndex:
    dataset: str
    splits: dict[str, list[Item]]  # split -> items, in packing order
    label_names: list[str]
    label_type: str  # "binary" | "multilabel" | "multiclass"
    tasks: list[str]  # first task gives manifest["subsets"]
    subset_style: dict[str, str]  # task -> "frac" | "choice"
    has_masks: bool
    has_boxes: bool
    split_policy: str
    input_rows: int  # label-file rows read
    input_images: int  # distinct images those rows describe
    rejected: list[dict] = field(default_factory=list)
    filtered: dict[str, int] = field(default_factory=dict)
    balanced: bool = False  # SIIM: train subsets come from positives + equal negatives
    classes: list[str] = field(default_factory=list)  # multiclass class names by index


# ---------------------------------------------------------------------------------------------
# Reading label files


def read_csv_rows(path: Path, required: Sequence[str], strip: bool = False) -> list[dict[str, str]]:
    """Rows of a csv as dicts. A missing file or column is a `SourceError` naming it.
    `strip` removes surrounding spaces from header names and values (SIIM's ", EncodedPixels")."""
    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            table = list(csv.reader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"{path}: not a readable UTF-8 csv ({exc})") from exc
    if not table:
        raise SourceError(f"{path}: empty file (no header)")
    header = [h.strip() for h in table[0]] if strip else table[0]
    missing = [c for c in required if c not in header]
    if missing:
        raise SourceError(f"{path}: missing column(s) {missing}; header is {header}")
    rows = []
    for values in table[1:]:
        if not values:
            continue
        if strip:
            values = [v.strip() for v in values]
        rows.append(dict(zip(header, values + [""] * (len(header) - len(values)))))
    return rows


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not UTF-8 text ({exc})") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def image_folder(path: Path) -> Path:
    """`path`, a dataset's image directory; a SourceError naming it when it is not there."""
    if not path.is_dir():
        raise SourceError(f"{path}: image directory not found")
    return path


def plain_file_name(name: str) -> bool:
    """True for a bare file name a list or csv may name (no folder part, not empty, not . or ..),
    so that joining it to the image folder cannot leave that folder."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def safe_key(raw: str) -> str:
    """A shard key from a file name/id: extension dropped, other characters than [A-Za-z0-9_-]
    replaced by '_'; when anything was replaced a short hash of `raw` keeps keys distinct."""
    stem = re.sub(r"\.(dcm|png|jpe?g|tiff?)$", "", raw, flags=re.IGNORECASE)
    key = re.sub(r"[^A-Za-z0-9_-]", "_", stem)
    if key != stem and not re.fullmatch(r"[0-9.]+", stem):  # DICOM UIDs: '.'->'_' is injective
        key += "-" + hashlib.sha1(raw.encode("utf-8")).hexdigest()[:8]
    return key


def file_map(root: Path, pattern: str) -> dict[str, Path]:
    """file name -> path for every file under `root` matching `pattern` (first in sorted order wins;
    the real SIIM/NIH trees nest images a few levels down). Symlinked folders inside `root` are
    followed (shards.paths.find_files)."""
    out: dict[str, Path] = {}
    for path in find_files(root, pattern):
        out.setdefault(path.name, path)
    return out


def links_out_of(root: Path) -> list[str]:
    """'<link> -> <where it leads>' (link relative to `root`) for every symlinked folder under `root`
    that resolves outside it, sorted. `file_map` does not enter such folders, so an image missing from
    the map may sit behind one: the converters name the link in that image's rejection."""
    real_root = root.resolve()
    out: list[str] = []
    for folder, dirnames, _ in walk_inside(root):
        for name in dirnames:
            path = folder / name
            if path.is_symlink() and not is_inside(path.resolve(), real_root):
                out.append(f"{path.relative_to(root)} -> {path.resolve()}")
    return sorted(out)


def reject(key: str, source: str, reason: str) -> dict:
    return {"key": key, "source": source, "reason": reason}


# ---------------------------------------------------------------------------------------------
# Splits


def split_counts(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Largest-remainder allocation of n items to splits in proportion to `weights`; every split
    gets at least one item when n allows (tiny fixtures still have a validation set)."""
    names = list(weights)
    total = float(sum(weights.values()))
    raw = {s: n * weights[s] / total for s in names}
    counts = {s: int(raw[s]) for s in names}
    for s in sorted(names, key=lambda s: raw[s] - counts[s], reverse=True)[: n - sum(counts.values())]:
        counts[s] += 1
    if n >= len(names):
        for s in names:
            while counts[s] == 0:
                donor = max(names, key=lambda d: counts[d])
                counts[donor] -= 1
                counts[s] += 1
    return counts


def split_by_patient(items: Sequence[Item], weights: dict[str, float], seed: int, salt: str) -> dict[str, list[Item]]:
    """Assign whole patients to splits so each split's image count is close to its share.

    Patients are shuffled with `seed` (and `salt`, the dataset name, so datasets do not share an
    order), then the held-out splits (every split but the first key of `weights`, which takes the
    rest) are filled in turn until each reaches its target. With one image per patient the counts are
    exact; otherwise a split overshoots by less than one patient's images."""
    groups: dict[str, list[Item]] = {}
    for item in sorted(items, key=lambda it: it.order):
        groups.setdefault(item.patient_id, []).append(item)
    patients = sorted(groups)
    rng = np.random.default_rng([seed, zlib.crc32(salt.encode())])
    patients = [patients[i] for i in rng.permutation(len(patients))]
    targets = split_counts(len(items), weights)
    names = list(weights)
    fill_order = names[1:] + names[:1]  # held-out splits first; the first split takes the rest
    out: dict[str, list[Item]] = {s: [] for s in names}
    s = 0
    for pid in patients:
        while s < len(fill_order) - 1 and len(out[fill_order[s]]) >= targets[fill_order[s]]:
            s += 1
        out[fill_order[s]].extend(groups[pid])
    return out


def shuffled(items: Sequence[Item], seed: int, salt: str) -> list[Item]:
    """Seeded order for packing (mixes classes across shards); input order does not matter."""
    ordered = sorted(items, key=lambda it: it.order)
    rng = np.random.default_rng([seed, zlib.crc32(salt.encode())])
    return [ordered[i] for i in rng.permutation(len(ordered))]


def shuffled_splits(splits: dict[str, list[Item]], seed: int, name: str) -> dict[str, list[Item]]:
    """Each split in its seeded packing order (salted with the dataset and split name)."""
    return {s: shuffled(v, seed, name + s) for s, v in splits.items()}


def patient_splits(items: Sequence[Item], weights: dict[str, float], seed: int, name: str) -> dict[str, list[Item]]:
    """The datasets without an official test list: every split drawn by patient, each shuffled."""
    return shuffled_splits(split_by_patient(items, weights, seed, name), seed, name)


# ---------------------------------------------------------------------------------------------
# Subsets


def official_test_splits(
    train_items: Sequence[Item], test_items: Sequence[Item], weights: dict[str, float], seed: int, name: str
) -> dict[str, list[Item]]:
    """The datasets whose official held-out list is our test split: the training list is split by
    patient into `weights` (train/valid), the official list becomes `test`, each split shuffled."""
    splits = split_by_patient(train_items, weights, seed, name)
    splits["test"] = list(test_items)
    return shuffled_splits(splits, seed, name)


def subset_indices(n: int, fraction: float, style: str, positive: Sequence[bool], seed: int = SUBSET_SEED) -> list[int]:
    """Indices (into a list in file order) of one data-efficiency subset; see module docstring."""
    if fraction >= 1.0:
        return list(range(n))
    if n == 0:
        return []
    size = round(fraction * n) if style == "frac" else int(fraction * n)
    size = max(1, size)
    perm = np.random.RandomState(seed).permutation(n).tolist()  # == choice(n, size, replace=False)
    chosen = perm[:size]
    if not any(positive[i] for i in chosen):
        spare = next((i for i in perm[size:] if positive[i]), None)
        if spare is not None:
            chosen[-1] = spare
    return chosen


def balanced_keys(keys: Sequence[str], positive: Sequence[bool], seed: int = SUBSET_SEED) -> list[str]:
    """All positives + an equal number of seeded random negatives (all if fewer), in file order."""
    pos = [i for i, p in enumerate(positive) if p]
    neg = [i for i, p in enumerate(positive) if not p]
    take = min(len(pos), len(neg))
    picked = np.random.RandomState(seed).choice(len(neg), take, replace=False).tolist() if take else []
    return [keys[i] for i in sorted(pos + [neg[j] for j in picked])]


# ---------------------------------------------------------------------------------------------
# Building one sample (runs in worker processes)


def read_image_file(path: Path, limits: ImageLimits | None = None) -> tuple[np.ndarray, dict]:
    """A PNG/JPEG file as [H, W] uint8 (shards.image.decode_gray: RGB(A) -> luminance, 16-bit ->
    percentile window, size bounds checked on the header)."""
    decoded = decode_gray(path.read_bytes(), None, limits)
    return decoded.gray, ({"window": decoded.window} if decoded.window else {})


def validate_boxes(boxes: Sequence[Sequence[float]], width: int, height: int) -> tuple[np.ndarray, str]:
    """Boxes [N, 4] clipped to the image, or an error string (non-positive size, outside the image)."""
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    for i, (x1, y1, x2, y2) in enumerate(arr.tolist()):
        if not (x2 > x1 and y2 > y1):
            return arr, f"box {i} {[x1, y1, x2, y2]} has non-positive size"
        tx, ty = BOX_TOLERANCE * width, BOX_TOLERANCE * height
        if x1 < -tx or y1 < -ty or x2 > width + tx or y2 > height + ty:
            return arr, f"box {i} {[x1, y1, x2, y2]} lies outside the {width}x{height} image"
    return np.clip(arr, 0, [width, height, width, height]), ""


def rasterise_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """bool [H, W]: pixel (x, y) is inside when its centre (x + 0.5, y + 0.5) is inside a box."""
    mask = np.zeros((height, width), dtype=bool)
    for x1, y1, x2, y2 in boxes.tolist():
        c0, c1 = int(np.ceil(x1 - 0.5)), int(np.ceil(x2 - 0.5))
        r0, r1 = int(np.ceil(y1 - 0.5)), int(np.ceil(y2 - 0.5))
        mask[max(r0, 0) : max(r1, 0), max(c0, 0) : max(c1, 0)] = True
    return mask


@dataclass
class SampleBuilder:
    """Picklable `build_sample` for pack_splits: read, check, reduce, encode one `Item`."""

    dataset: str
    max_side: int
    quality: int
    with_mask: bool
    src_root: str = ""  # images must resolve inside it ("" = not checked)
    limits: ImageLimits = field(default_factory=ImageLimits)

    def __call__(self, item: Item) -> PackedSample | Rejected:
        if self.src_root:
            outside = outside_root(Path(item.source), Path(self.src_root))
            if outside:
                return Rejected(item.key, item.rel, outside)
        source = Path(item.source)
        if source.exists() and not source.is_file():
            # A folder, FIFO or device named like an image: reading a FIFO would block forever.
            return Rejected(item.key, item.rel, f"{item.source}: not a regular file")
        try:
            if item.reader == "dicom":
                dcm = read_dicom(item.source, self.limits)
                gray = dcm.gray
                info = {
                    "dicom": {
                        "photometric": dcm.photometric,
                        "bits_stored": dcm.bits_stored,
                        "transfer_syntax": dcm.transfer_syntax,
                        "window": dcm.window,
                    }
                }
            else:
                gray, info = read_image_file(Path(item.source), self.limits)
        except DicomError as exc:
            return Rejected(item.key, item.rel, str(exc))
        except FileNotFoundError:
            return Rejected(item.key, item.rel, f"image file not found: looked for {item.source}")
        except ImageRejected as exc:
            return Rejected(item.key, item.rel, f"{item.source}: {exc}")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
            return Rejected(item.key, item.rel, f"{item.source}: unreadable image ({exc})")
        height, width = gray.shape
        boxes, err = validate_boxes(item.boxes, width, height)
        if err:
            return Rejected(item.key, item.rel, err)
        mask = None
        if self.with_mask:
            if item.mask == "rle":
                mask = np.zeros((height, width), dtype=bool)
                for i, rle in enumerate(item.rle):
                    try:
                        mask |= rle_decode(rle, width, height)
                    except ValueError as exc:
                        return Rejected(item.key, item.rel, f"malformed RLE (row {i} of this image): {exc}")
            else:
                mask = rasterise_boxes(boxes, width, height)

        red = reduce_array(gray, self.max_side)
        try:
            self.limits.check_content(red.crop_box)
        except ImageRejected as exc:
            return Rejected(item.key, item.rel, f"{item.source}: {exc}")
        stored_boxes = transform_boxes(boxes, red) if len(boxes) else np.zeros((0, 4))
        if (
            len(stored_boxes)
            and not ((stored_boxes[:, 2] > stored_boxes[:, 0]) & (stored_boxes[:, 3] > stored_boxes[:, 1])).all()
        ):
            return Rejected(
                item.key, item.rel, "a box lies entirely in the zero border that the crop to non-zero pixels removes"
            )
        meta = {
            "dataset": self.dataset,
            "key": item.key,
            "source": item.rel,
            "patient_id": item.patient_id,
            "labels": item.labels,
            "boxes": [[round(v, 2) for v in box] for box in stored_boxes.tolist()],
            **red.geometry(),
            **item.extra,
            **info,
        }
        members = {
            "jpg": encode_jpeg(red.image, self.quality),
            "txt": b"",
            "json": json.dumps(meta).encode("utf-8"),
        }  # label order = label_names
        if mask is not None:
            members["png"] = encode_png(transform_mask(mask, red))  # [h, w] 0/255
        return PackedSample(item.key, members)


# ---------------------------------------------------------------------------------------------
# Packing + manifest


def _index_fingerprint(index: DatasetIndex) -> str:
    """Hash of everything that decides the output, so a rerun on changed sources rebuilds."""
    h = hashlib.sha256()
    for split, items in index.splits.items():
        for it in items:
            h.update(json.dumps([split, asdict(it)], sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def _packed_keys(manifest: dict, split: str) -> list[str]:
    keys: list[str] = []
    for rec in manifest["_shard_records"]:
        if rec["name"].startswith(f"{split}/"):
            keys.extend(rec["keys"])
    return keys


def _patient_overlap(index: DatasetIndex) -> dict[str, int]:
    patients = {s: {it.patient_id for it in items} for s, items in index.splits.items()}
    names = list(patients)
    return {f"{a}|{b}": len(patients[a] & patients[b]) for i, a in enumerate(names) for b in names[i + 1 :]}


def drop_duplicate_keys(index: DatasetIndex) -> None:
    """A key listed twice (the same image in two rows/lists) keeps its first entry; later ones are
    rejected, so the tar never holds two samples with one key."""
    seen: set[str] = set()
    for split, items in index.splits.items():
        kept = []
        for it in sorted(items, key=lambda it: it.order):
            if it.key in seen:
                index.rejected.append(
                    reject(it.key, it.rel, f"duplicate entry for {it.rel} (row {it.order}, {split} split)")
                )
            else:
                seen.add(it.key)
                kept.append(it.order)
        keep = set(kept)
        index.splits[split] = [it for it in items if it.order in keep]


def convert_index(
    index: DatasetIndex,
    out: str | Path,
    max_side: int,
    quality: int,
    workers: int,
    seed: int,
    samples_per_shard: int,
    progress: bool = True,
    src_root: str | Path | None = None,
    limits: ImageLimits = ImageLimits(),
) -> dict:
    """Pack `index` into `<out>/<dataset>/` and return the final manifest. With `src_root`, an
    image resolving outside it (a symlink out of the dataset) is a recorded rejection. Holds the
    output directory's packer lock throughout."""
    root = Path(out) / index.dataset
    with output_lock(root):
        return _convert_index_locked(
            index, root, max_side, quality, workers, seed, samples_per_shard, progress, src_root, limits
        )


def _convert_index_locked(
    index: DatasetIndex,
    root: Path,
    max_side: int,
    quality: int,
    workers: int,
    seed: int,
    samples_per_shard: int,
    progress: bool,
    src_root: str | Path | None,
    limits: ImageLimits,
) -> dict:
    drop_duplicate_keys(index)
    index.rejected = [{**rej, "reason": clean_reason(rej["reason"])} for rej in index.rejected]
    config = {
        "dataset": index.dataset,
        "max_side": max_side,
        "quality": quality,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "min_side": limits.min_side,
        "max_pixels": limits.max_pixels,
        "index_sha256": _index_fingerprint(index),
    }
    builder = SampleBuilder(
        index.dataset, max_side, quality, index.has_masks, "" if src_root is None else str(src_root), limits
    )
    manifest = pack_splits(root, index.splits, builder, samples_per_shard, workers, config, progress=progress)

    by_key = {it.key: it for items in index.splits.values() for it in items}
    train_keys = sorted(_packed_keys(manifest, "train"), key=lambda k: by_key[k].order)
    train_pos = [by_key[k].positive for k in train_keys]
    extra: dict = {}
    pool_keys, pool_pos = train_keys, train_pos
    if index.balanced:
        pool_keys = balanced_keys(train_keys, train_pos)
        pool_pos = [by_key[k].positive for k in pool_keys]
        extra["balanced"] = {"train": pool_keys}
    task_subsets = {}
    for task in index.tasks:
        style = index.subset_style[task]
        task_subsets[task] = {
            "train": {
                frac: [pool_keys[i] for i in subset_indices(len(pool_keys), float(frac), style, pool_pos)]
                for frac in FRACTIONS
            }
        }
    positives = {s: sum(by_key[k].positive for k in _packed_keys(manifest, s)) for s in index.splits}

    rejected = index.rejected + manifest["rejected"]
    packed = manifest["num_samples"]
    summary = {
        "input_rows": index.input_rows,
        "input_images": index.input_images,
        "packed": packed,
        "rejected": len(rejected),
        "filtered": sum(index.filtered.values()),
    }
    if packed + summary["rejected"] + summary["filtered"] != index.input_images:
        raise RuntimeError(f"{index.dataset}: accounting error, {summary}")
    manifest.update(
        {
            "dataset": index.dataset,
            "label_names": index.label_names,
            "label_type": index.label_type,
            "classes": index.classes,
            "tasks": index.tasks,
            "has_masks": index.has_masks,
            "has_boxes": index.has_boxes,
            "subsets": task_subsets[index.tasks[0]],
            "task_subsets": task_subsets,
            "positives": positives,
            "split_policy": index.split_policy,
            "split_seed": seed,
            "subset_seed": SUBSET_SEED,
            "patient_overlap": _patient_overlap(index),
            "summary": summary,
            "rejected": rejected,
            "filtered": dict(index.filtered),
            **extra,
        }
    )
    # Keep the writer's bookkeeping last, as pack_splits does.
    manifest["_shard_records"] = manifest.pop("_shard_records")
    atomic_write_json(root / "manifest.json", manifest)
    return manifest


def format_summary(manifest: dict) -> str:
    s = manifest["summary"]
    splits = ", ".join(f"{k} {v['num_samples']}" for k, v in manifest["splits"].items())
    lines = [
        f"{manifest['dataset']}: {s['input_rows']} label rows -> {s['input_images']} images = "
        f"packed {s['packed']} + rejected {s['rejected']} + filtered {s['filtered']}",
        f"  splits: {splits}; positives: {manifest['positives']}",
        "  subsets: " + ", ".join(f"{f}: {len(k)}" for f, k in manifest["subsets"]["train"].items()),
    ]
    for rule, n in manifest["filtered"].items():
        lines.append(f"  filtered {rule}: {n}")
    for rec in manifest["rejected"][:8]:
        lines.append(f"  rejected {rec['key']}: {rec['reason']}")
    if len(manifest["rejected"]) > 8:
        lines.append(f"  ... {len(manifest['rejected']) - 8} more rejections in the manifest")
    if any(manifest["patient_overlap"].values()):
        lines.append(f"  WARNING patients in two splits: {manifest['patient_overlap']}")
    return "\n".join(lines)


def merge_groups(rows: Iterable[tuple[str, dict]]) -> dict[str, list[dict]]:
    """Group label rows by image id, keeping first-seen order (RSNA/SIIM have several rows per image)."""
    groups: dict[str, list[dict]] = {}
    for image_id, row in rows:
        groups.setdefault(image_id, []).append(row)
    return groups
