"""CheXpert v1.0 (small) -> shards (linear classification, 5 competition labels).

Native layout: SRC is the `CheXpert-v1.0-small` directory (or a directory holding exactly that one):
    train.csv, valid.csv   Path,Sex,Age,Frontal/Lateral,AP/PA,<14 observations>
    Path = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", relative to SRC's parent
    (if the directory was renamed, the first path component is replaced by SRC itself).

Rows: frontal only (lateral rows are counted in filtered["lateral_view"]); blanks -> 0 (fillna(0));
uncertain -1 mapped per label (U-Ones for Atelectasis, Edema, Pleural Effusion; U-Zeros for
Cardiomegaly, Consolidation). Labels {name: 0/1} for the 5 labels in `LABELS` order.
Splits: official valid.csv = test; train.csv split by patient into train/valid in 186,027 / 5,000
proportions (5,000 validation images on the full data, proportional on small data).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from shards.downstream.common import DatasetIndex, Item, SourceError, official_test_splits, read_csv_rows, reject

NAME = "chexpert"
LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
UNCERTAIN_TO = {"Atelectasis": 1.0, "Cardiomegaly": 0.0, "Consolidation": 0.0, "Edema": 1.0, "Pleural Effusion": 1.0}
COLUMNS = ("Path", "Frontal/Lateral", *LABELS)
SPLIT_WEIGHTS = {"train": 186027, "valid": 5000}
DIR_NAME = "CheXpert-v1.0-small"


def dataset_dir(src: Path) -> Path:
    """The directory that holds train.csv: SRC itself, or its single `CheXpert-v1.0*` child."""
    if (src / "train.csv").is_file():
        return src
    nested = sorted(p.parent for p in src.glob("CheXpert-v1.0*/train.csv"))
    if len(nested) == 1:
        return nested[0]
    raise SourceError(f"{src}: no train.csv here or in a single CheXpert-v1.0*/ subdirectory")


def resolve(root: Path, path_text: str) -> Path | None:
    """Path column -> file. None when the path escapes the dataset (absolute or '..')."""
    rel = PurePosixPath(path_text)
    if rel.is_absolute() or ".." in rel.parts or len(rel.parts) < 2:
        return None
    if rel.parts[0] == root.name:
        return root.parent / Path(*rel.parts)
    return root / Path(*rel.parts[1:])


def parse_label(text: str, name: str) -> float:
    """CheXpert cell -> 0/1 after fillna(0) and the per-label uncertainty policy."""
    text = text.strip()
    if text == "":
        return 0.0
    value = float(text)  # ValueError names the bad cell to the caller
    if value == -1.0:
        return UNCERTAIN_TO[name]
    if value not in (0.0, 1.0):
        raise ValueError(f"value {text!r} is not 1, 0, -1 or blank")
    return value


def _items(root: Path, csv_name: str, order0: int, rejected: list, filtered: dict) -> tuple[list[Item], int]:
    rows = read_csv_rows(root / csv_name, COLUMNS)
    items = []
    for i, row in enumerate(rows):
        path_text = row["Path"].strip()
        key = path_text.split("/", 1)[-1]
        key = "_".join(PurePosixPath(key).with_suffix("").parts)
        key = "".join(c if c.isalnum() or c in "_-" else "_" for c in key) or f"{csv_name}_row{i}"
        view = row["Frontal/Lateral"].strip()
        if view == "Lateral":
            filtered["lateral_view"] = filtered.get("lateral_view", 0) + 1
            continue
        if view != "Frontal":
            rejected.append(reject(key, csv_name, f"row {i + 2}: Frontal/Lateral {view!r} unknown"))
            continue
        path = resolve(root, path_text)
        if path is None:
            rejected.append(reject(key, csv_name, f"row {i + 2}: Path {path_text!r} is not inside the dataset"))
            continue
        labels, err = {}, ""
        for name in LABELS:
            try:
                labels[name] = parse_label(row[name], name)
            except ValueError as exc:
                err = f"row {i + 2}: column {name!r}: {exc}"
                break
        if err:
            rejected.append(reject(key, csv_name, err))
            continue
        parts = PurePosixPath(path_text).parts
        patient = next((p for p in parts if p.startswith("patient")), key)
        items.append(
            Item(
                key=key,
                source=str(path),
                rel=str(path.relative_to(root.parent)),
                reader="image",
                order=order0 + i,
                patient_id=patient,
                labels=labels,
                positive=any(labels.values()),
                extra={"view": row.get("AP/PA", "").strip()},
            )
        )
    return items, len(rows)


def index_dataset(src: Path, seed: int) -> DatasetIndex:
    root = dataset_dir(Path(src))
    rejected: list[dict] = []
    filtered: dict[str, int] = {}
    train_items, n_train = _items(root, "train.csv", 0, rejected, filtered)
    test_items, n_valid = _items(root, "valid.csv", n_train, rejected, filtered)
    return DatasetIndex(
        dataset=NAME,
        splits=official_test_splits(train_items, test_items, SPLIT_WEIGHTS, seed, NAME),
        label_names=list(LABELS),
        label_type="multilabel",
        tasks=["classification"],
        subset_style={"classification": "frac"},
        has_masks=False,
        has_boxes=False,
        split_policy="official valid.csv = test; train.csv by patient into 186027/5000 proportions",
        input_rows=n_train + n_valid,
        input_images=n_train + n_valid,
        rejected=rejected,
        filtered=filtered,
    )
