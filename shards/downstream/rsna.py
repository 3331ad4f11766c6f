"""RSNA Pneumonia Detection Challenge (stage 2) -> shards (classification, detection, segmentation).

Native layout under SRC:
    stage_2_train_labels.csv     patientId,x,y,width,height,Target   (one row per box; Target=0 rows
                                 have empty coordinates; one image per patientId)
    stage_2_train_images/<patientId>.dcm

Labels: {"Pneumonia": 1.0 if the patient has any box}. Boxes [x, y, x + width, y + height] in source
pixels, transformed to the stored image. Masks: the boxes rasterised (segmentation protocol).
Split: seeded, by patient, in 16,010 / 5,337 / 5,337 proportions (exact on the full 26,684 images).
A patient whose rows disagree (Target 1 without coordinates, coordinates with Target 0, unparsable
or non-positive sizes) is rejected as a whole.
"""

from __future__ import annotations

from pathlib import Path

from shards.downstream.common import (
    DatasetIndex,
    Item,
    image_folder,
    merge_groups,
    patient_splits,
    read_csv_rows,
    reject,
    safe_key,
)

NAME = "rsna_pneumonia"
LABEL_CSV = "stage_2_train_labels.csv"
IMAGE_DIR = "stage_2_train_images"
COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
SPLIT_WEIGHTS = {"train": 16010, "valid": 5337, "test": 5337}
LABEL = "Pneumonia"


def _boxes_of(rows: list[dict]) -> tuple[list[list[float]], int, str]:
    """(boxes, target, error) from one patient's rows."""
    boxes, targets = [], set()
    for row in rows:
        target = row["Target"].strip()
        if target not in ("0", "1"):
            return [], 0, f"Target {target!r} is not 0 or 1"
        targets.add(int(target))
        coords = [row[c].strip() for c in ("x", "y", "width", "height")]
        if target == "0":
            if any(coords):
                return [], 0, f"Target 0 row has coordinates {coords}"
            continue
        try:
            x, y, w, h = (float(c) for c in coords)
        except ValueError:
            return [], 0, f"Target 1 row has unparsable coordinates {coords}"
        if w <= 0 or h <= 0:
            return [], 0, f"box {coords} has non-positive size"
        boxes.append([x, y, x + w, y + h])
    if len(targets) > 1:
        return [], 0, "rows disagree on Target (0 and 1)"
    return boxes, int(bool(boxes)), ""


def index_dataset(src: Path, seed: int) -> DatasetIndex:
    src = Path(src)
    csv_path = src / LABEL_CSV
    rows = read_csv_rows(csv_path, COLUMNS)
    image_folder(src / IMAGE_DIR)  # a missing folder fails here, not as one rejection per row
    groups = merge_groups((row["patientId"].strip(), row) for row in rows)
    items, rejected = [], []
    for order, (pid, prows) in enumerate(groups.items()):
        if not pid:
            rejected.append(reject(f"row{order}", LABEL_CSV, "empty patientId"))
            continue
        key = safe_key(pid)
        if key != pid:  # it names a file: no path characters allowed
            rejected.append(reject(key, LABEL_CSV, f"patientId {pid!r} is not a plain id"))
            continue
        rel = f"{IMAGE_DIR}/{pid}.dcm"
        boxes, target, err = _boxes_of(prows)
        if err:
            rejected.append(reject(key, LABEL_CSV, f"patient {pid}: {err}"))
            continue
        items.append(
            Item(
                key=key,
                source=str(src / rel),
                rel=rel,
                reader="dicom",
                order=order,
                patient_id=pid,
                labels={LABEL: float(target)},
                boxes=boxes,
                mask="boxes",
                positive=bool(target),
            )
        )
    return DatasetIndex(
        dataset=NAME,
        splits=patient_splits(items, SPLIT_WEIGHTS, seed, NAME),
        label_names=[LABEL],
        label_type="binary",
        tasks=["classification", "detection", "segmentation"],
        subset_style={"classification": "frac", "detection": "choice", "segmentation": "choice"},
        has_masks=True,
        has_boxes=True,
        split_policy="seeded by patient, 16010/5337/5337 proportions",
        input_rows=len(rows),
        input_images=len(groups),
        rejected=rejected,
    )
