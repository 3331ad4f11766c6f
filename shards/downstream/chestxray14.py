"""NIH ChestX-ray14 -> shards (fine-tuned classification, 14 labels).

Native layout under SRC:
    Data_Entry_2017_v2020.csv (the current download's name) or Data_Entry_2017.csv (older copies;
                           the v2020 file wins when both are there)
                           Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,
                           Patient Gender/Sex,View Position,...
                           Finding Labels pipe-separated ("Effusion|Mass") or "No Finding"
    train_val_list.txt, test_list.txt      one image name per line (official split)
    images*/**/<Image Index>   PNGs (the download nests them as images_001/images/...; folders
                           symlinked into SRC are followed while they resolve inside SRC)

Labels {name: 0/1} for the 14 `LABELS`. Splits: test_list = test; train_val_list split by
Patient ID into train/valid in 77,872 / 8,652 proportions. The split is drawn from the label files
alone (every listed image with a valid row, PNG present or not) and the missing PNGs are removed
afterwards, so a partial download keeps each present image in the split the full download gives it.
Data_Entry rows in neither list are counted in filtered["not_in_split_lists"]; a listed image without
a Data_Entry row, with an unknown finding name, or without its PNG is a recorded rejection (the last
names any image folder symlinked out of SRC, which is refused).
"""

from __future__ import annotations

from pathlib import Path

from shards.downstream.common import (
    DatasetIndex,
    Item,
    SourceError,
    file_map,
    links_out_of,
    official_test_splits,
    read_csv_rows,
    read_lines,
    reject,
    safe_key,
)

NAME = "chestxray14"
LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
ENTRY_CSVS = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # first found is read
LISTS = {"train_val": "train_val_list.txt", "test": "test_list.txt"}
SPLIT_WEIGHTS = {"train": 77872, "valid": 8652}


def parse_findings(text: str) -> dict[str, float]:
    names = [n.strip() for n in text.split("|") if n.strip()]
    unknown = [n for n in names if n not in LABELS and n != NO_FINDING]
    if unknown or not names:
        raise ValueError(f"unknown finding name(s) {unknown}" if unknown else "empty Finding Labels")
    if NO_FINDING in names and len(names) > 1:
        raise ValueError(f"'No Finding' combined with findings {names}")
    return {label: float(label in names) for label in LABELS}


def entry_csv(src: Path) -> str:
    """The Data_Entry file name present in `src` (the v2020 name first)."""
    for name in ENTRY_CSVS:
        if (src / name).is_file():
            return name
    raise SourceError(f"{src}: no {' or '.join(ENTRY_CSVS)} (the label file of the NIH download)")


def index_dataset(src: Path, seed: int) -> DatasetIndex:
    src = Path(src)
    entry = entry_csv(src)
    rows = read_csv_rows(src / entry, ("Image Index", "Finding Labels", "Patient ID"))
    listed = {which: read_lines(src / name) for which, name in LISTS.items()}
    entries: dict[str, tuple[int, dict]] = {}
    rejected: list[dict] = []
    for i, row in enumerate(rows):
        name = row["Image Index"].strip()
        if name in entries:
            rejected.append(reject(safe_key(name), entry, f"row {i + 2}: duplicate Image Index {name}"))
            continue
        entries[name] = (i, row)
    images = file_map(src, "*.png")
    membership: dict[str, str] = {}
    for which, names in listed.items():
        for name in names:
            membership.setdefault(name, which)
    filtered = {"not_in_split_lists": sum(1 for name in entries if name not in membership)}

    # Accounting unit: a Data_Entry row, plus every list line that matches no (first) row.
    items: dict[str, list[Item]] = {"train_val": [], "test": []}
    unmatched_lines = 0
    seen: set[str] = set()
    missing: set[str] = set()  # keys of listed images whose PNG is not in the tree
    for which, names in listed.items():
        for name in names:
            key = safe_key(name)
            if name in seen:
                unmatched_lines += 1
                rejected.append(reject(key, LISTS[which], f"{name} listed more than once in the split lists"))
                continue
            seen.add(name)
            if name not in entries:
                unmatched_lines += 1
                rejected.append(reject(key, LISTS[which], f"{name} has no row in {entry}"))
                continue
            if "/" in name or "\\" in name:
                rejected.append(reject(key, LISTS[which], f"{name!r} is not a plain file name"))
                continue
            order, row = entries[name]
            try:
                labels = parse_findings(row["Finding Labels"])
            except ValueError as exc:
                rejected.append(reject(key, entry, f"row {order + 2} ({name}): Finding Labels: {exc}"))
                continue
            path = images.get(name)
            if path is None:
                missing.add(key)
                path = src / name  # a placeholder: the item takes part in the split draw only
            items[which].append(
                Item(
                    key=key,
                    source=str(path),
                    rel=str(path.relative_to(src)),
                    reader="image",
                    order=order,
                    patient_id=row["Patient ID"].strip(),
                    labels=labels,
                    positive=any(labels.values()),
                    extra={
                        "view": row.get("View Position", "").strip(),
                        "follow_up": row.get("Follow-up #", "").strip(),
                    },
                )
            )
    # Drawn over every labelled image, then the absent ones leave: the split depends on the label files only.
    splits = official_test_splits(items["train_val"], items["test"], SPLIT_WEIGHTS, seed, NAME)
    if missing:
        refused = links_out_of(src)
        why = f"no such PNG under {src} (looked in every folder, symlinked folders inside it too)"
        if refused:
            shown = "; ".join(f"{link} is a symlink out of {src}; refused" for link in refused[:3])
            why += f"; {shown}{f' (and {len(refused) - 3} more)' if len(refused) > 3 else ''}"
        for split, members in splits.items():
            for it in members:
                if it.key in missing:
                    rejected.append(reject(it.key, f"**/{Path(it.source).name}", f"{Path(it.source).name}: {why}"))
            splits[split] = [it for it in members if it.key not in missing]
    return DatasetIndex(
        dataset=NAME,
        splits=splits,
        label_names=list(LABELS),
        label_type="multilabel",
        tasks=["classification"],
        subset_style={"classification": "frac"},
        has_masks=False,
        has_boxes=False,
        split_policy=f"labels from {entry}; official test_list = test; train_val_list by Patient ID into "
        "77872/8652 proportions, drawn over every labelled image (present or not)",
        input_rows=len(rows),
        input_images=len(rows) + unmatched_lines,
        rejected=rejected,
        filtered=filtered,
    )
