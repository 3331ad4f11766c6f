"""SIIM-ACR Pneumothorax Segmentation (stage 1) -> shards (segmentation, zero-shot).

Native layout under SRC:
    train-rle.csv      header literally "ImageId, EncodedPixels": the leading space is in the header
                       AND in every value; " -1" means no pneumothorax; an image with several regions
                       has several rows (their masks are united)
    dicom-images-train/<study>/<series>/<ImageId>.dcm

Values are stripped before comparing to "-1" (MGCA compares the unstripped " -1" to "-1" and so treats
every image as positive). RLE: see shards.dicom (relative offsets, column-major, decoded on the
DICOM's own grid, 1024x1024 in the real data). Masks are stored as png, always (empty for negatives).
Split: seeded, by the DICOM header's PatientID (header-only read; the ImageId when absent), in
8,433 / 1,807 / 1,807 proportions.
Training list for segmentation: manifest["balanced"]["train"] = all positive train images + as many
seeded random negatives; the data-efficiency subsets are drawn from that list over unique ImageIds.
"""

from __future__ import annotations

from pathlib import Path

from shards.dicom import read_patient_id
from shards.downstream.common import (
    DatasetIndex,
    Item,
    file_map,
    image_folder,
    merge_groups,
    patient_splits,
    read_csv_rows,
    reject,
    safe_key,
)

NAME = "siim_pneumothorax"
LABEL_CSV = "train-rle.csv"
IMAGE_DIR = "dicom-images-train"
SPLIT_WEIGHTS = {"train": 8433, "valid": 1807, "test": 1807}
LABEL = "Pneumothorax"
NEGATIVE = "-1"


def index_dataset(src: Path, seed: int) -> DatasetIndex:
    src = Path(src)
    rows = read_csv_rows(src / LABEL_CSV, ("ImageId", "EncodedPixels"), strip=True)
    image_dir = image_folder(src / IMAGE_DIR)
    dicoms = file_map(image_dir, "*.dcm")
    groups = merge_groups((row["ImageId"], row) for row in rows)
    items, rejected = [], []
    for order, (image_id, irows) in enumerate(groups.items()):
        key = safe_key(image_id) if image_id else f"row{order}"
        if not image_id:
            rejected.append(reject(key, LABEL_CSV, "empty ImageId"))
            continue
        path = dicoms.get(f"{image_id}.dcm")
        if path is None:
            rejected.append(
                reject(
                    key, f"{IMAGE_DIR}/**/{image_id}.dcm", f"DICOM for ImageId {image_id} not found under {image_dir}"
                )
            )
            continue
        runs = [r["EncodedPixels"] for r in irows if r["EncodedPixels"] != NEGATIVE]
        if any(not r for r in runs):
            rejected.append(reject(key, LABEL_CSV, f"ImageId {image_id}: empty EncodedPixels"))
            continue
        rel = str(path.relative_to(src))
        items.append(
            Item(
                key=key,
                source=str(path),
                rel=rel,
                reader="dicom",
                order=order,
                patient_id=read_patient_id(path) or image_id,
                labels={LABEL: float(bool(runs))},
                mask="rle",
                rle=runs,
                positive=bool(runs),
            )
        )
    return DatasetIndex(
        dataset=NAME,
        splits=patient_splits(items, SPLIT_WEIGHTS, seed, NAME),
        label_names=[LABEL],
        label_type="binary",
        tasks=["segmentation"],
        subset_style={"segmentation": "choice"},
        has_masks=True,
        has_boxes=False,
        split_policy="seeded by DICOM PatientID, 8433/1807/1807 proportions; train subsets from the "
        "balanced list (all positives + equal random negatives)",
        input_rows=len(rows),
        input_images=len(groups),
        rejected=rejected,
        balanced=True,
    )
