"""Object-CXR (foreign objects, MIDL 2020 challenge) -> shards (detection).

Native layout under SRC:
    train.csv, dev.csv     image_name,annotation
    train/<image_name>, dev/<image_name>     JPEGs of varied sizes

annotation: objects separated by ";", each "T c1 c2 ...": T=0 rectangle (x1 y1 x2 y2), T=1 ellipse
(its bounding box x1 y1 x2 y2), T=2 polygon (x1 y1 x2 y2 x3 y3 ...). Every object's box is the min/max
of its coordinates. An empty annotation means no foreign object.
Labels {"Foreign object": 1.0 if any object}; json "box_shapes" names each box's annotation type.
Splits: dev.csv = test; train.csv split 80/20 into train/valid (6,400 / 1,600 on the full data).
There are no patient ids: every image is its own group.
"""

from __future__ import annotations

from pathlib import Path

from shards.downstream.common import (
    DatasetIndex,
    Item,
    image_folder,
    official_test_splits,
    plain_file_name,
    read_csv_rows,
    reject,
    safe_key,
)

NAME = "object_cxr"
LABEL = "Foreign object"
SHAPES = {"0": "rectangle", "1": "ellipse", "2": "polygon"}
SPLIT_WEIGHTS = {"train": 6400, "valid": 1600}
CSVS = {"train": "train.csv", "dev": "dev.csv"}


def parse_annotation(text: str) -> tuple[list[list[float]], list[str]]:
    """Annotation string -> (boxes [[x1, y1, x2, y2]], shapes). Raises ValueError on bad syntax."""
    boxes, shapes = [], []
    for j, obj in enumerate(o.strip() for o in text.split(";")):
        if not obj:
            continue
        tokens = obj.split()
        kind = tokens[0]
        if kind not in SHAPES:
            raise ValueError(f"object {j}: unknown type {kind!r} (0 rectangle, 1 ellipse, 2 polygon)")
        try:
            coords = [float(t) for t in tokens[1:]]
        except ValueError:
            raise ValueError(f"object {j}: non-numeric coordinate in {obj!r}") from None
        need = 6 if kind == "2" else 4
        if len(coords) % 2 or len(coords) < need or (kind != "2" and len(coords) != 4):
            raise ValueError(
                f"object {j}: {SHAPES[kind]} needs {'>= 3 points' if kind == '2' else '4 values'}, "
                f"got {len(coords)} values"
            )
        xs, ys = coords[0::2], coords[1::2]
        boxes.append([min(xs), min(ys), max(xs), max(ys)])
        shapes.append(SHAPES[kind])
    return boxes, shapes


def _items(src: Path, which: str, order0: int, rejected: list) -> tuple[list[Item], int]:
    csv_name = CSVS[which]
    rows = read_csv_rows(src / csv_name, ("image_name", "annotation"))
    image_dir = image_folder(src / which)
    items = []
    for i, row in enumerate(rows):
        name = row["image_name"].strip()
        key = safe_key(f"{which}_{name}")
        if not plain_file_name(name):
            rejected.append(reject(key, csv_name, f"row {i + 2}: image_name {name!r} is not a plain file name"))
            continue
        try:
            boxes, shapes = parse_annotation(row["annotation"])
        except ValueError as exc:
            rejected.append(reject(key, csv_name, f"row {i + 2} ({name}): annotation: {exc}"))
            continue
        items.append(
            Item(
                key=key,
                source=str(image_dir / name),
                rel=f"{which}/{name}",
                reader="image",
                order=order0 + i,
                patient_id=key,
                labels={LABEL: float(bool(boxes))},
                boxes=boxes,
                positive=bool(boxes),
                extra={"box_shapes": shapes},
            )
        )
    return items, len(rows)


def index_dataset(src: Path, seed: int) -> DatasetIndex:
    src = Path(src)
    rejected: list[dict] = []
    train_items, n_train = _items(src, "train", 0, rejected)
    test_items, n_dev = _items(src, "dev", n_train, rejected)
    return DatasetIndex(
        dataset=NAME,
        splits=official_test_splits(train_items, test_items, SPLIT_WEIGHTS, seed, NAME),
        label_names=[LABEL],
        label_type="binary",
        tasks=["detection"],
        subset_style={"detection": "choice"},
        has_masks=False,
        has_boxes=True,
        split_policy="dev.csv = test; train.csv seeded 6400/1600 proportions into train/valid (per image)",
        input_rows=n_train + n_dev,
        input_images=n_train + n_dev,
        rejected=rejected,
    )
