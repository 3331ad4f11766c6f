"""COVIDx CXR-2 (the 9A lists MGCA reads) -> shards (linear classification, 3 classes).

Native layout under SRC:
    train_COVIDx9A.txt, test_COVIDx9A.txt   space-separated, no header: patient_id filename class source
    train/<filename>, test/<filename>       PNG/JPEG of varied sizes

Classes normal / pneumonia / COVID-19 -> class_index 0 / 1 / 2; json labels are one-hot by class name.
Splits: the test list is the test set; the train list is split 80/20 into train/valid by patient.
A line without exactly 4 fields or with an unknown class is a recorded rejection (line number given).
"""

from __future__ import annotations

from pathlib import Path

from shards.downstream.common import (
    DatasetIndex,
    Item,
    image_folder,
    official_test_splits,
    plain_file_name,
    read_lines,
    reject,
    safe_key,
)

NAME = "covidx"
CLASSES = ("normal", "pneumonia", "COVID-19")
LISTS = {"train": "train_COVIDx9A.txt", "test": "test_COVIDx9A.txt"}
SPLIT_WEIGHTS = {"train": 80, "valid": 20}


def _items(src: Path, which: str, order0: int, rejected: list) -> tuple[list[Item], int]:
    list_name = LISTS[which]
    lines = read_lines(src / list_name)
    image_dir = image_folder(src / which)
    items = []
    for i, line in enumerate(lines):
        fields = line.split()
        where = f"{list_name} line {i + 1}"
        if len(fields) != 4:
            rejected.append(
                reject(
                    f"{which}_line{i + 1}",
                    list_name,
                    f"{where}: expected 4 fields (patient_id filename class source), got {len(fields)}",
                )
            )
            continue
        patient, filename, cls, source = fields
        key = safe_key(f"{which}_{filename}")
        if cls not in CLASSES:
            rejected.append(reject(key, list_name, f"{where}: unknown class {cls!r} (expected one of {list(CLASSES)})"))
            continue
        if not plain_file_name(filename):
            rejected.append(reject(key, list_name, f"{where}: filename {filename!r} is not a plain file name"))
            continue
        index = CLASSES.index(cls)
        items.append(
            Item(
                key=key,
                source=str(image_dir / filename),
                rel=f"{which}/{filename}",
                reader="image",
                order=order0 + i,
                patient_id=patient,
                labels={c: float(c == cls) for c in CLASSES},
                positive=index != 0,
                extra={"class_index": index, "source_dataset": source},
            )
        )
    return items, len(lines)


def index_dataset(src: Path, seed: int) -> DatasetIndex:
    src = Path(src)
    rejected: list[dict] = []
    train_items, n_train = _items(src, "train", 0, rejected)
    test_items, n_test = _items(src, "test", n_train, rejected)
    return DatasetIndex(
        dataset=NAME,
        splits=official_test_splits(train_items, test_items, SPLIT_WEIGHTS, seed, NAME),
        label_names=list(CLASSES),
        label_type="multiclass",
        classes=list(CLASSES),
        tasks=["classification"],
        subset_style={"classification": "frac"},
        has_masks=False,
        has_boxes=False,
        split_policy="test list = test; train list by patient 80/20 into train/valid",
        input_rows=n_train + n_test,
        input_images=n_train + n_test,
        rejected=rejected,
    )
