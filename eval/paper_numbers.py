"""The G2D paper's published numbers (NeurIPS 2024 camera-ready, as transcribed in
/work/shared/reference/g2d-method.md section 6), in percent, for the tables `--task all` prints.

These were measured on the REAL datasets (and real-data splits) with the real ResNet-50 model; our
numbers next to them come from whatever DATA points at (by default the small synthetic shards), so
the columns are shown side by side for orientation only, never as a reproduction claim.
Keys: (task, variant) -> {fraction: value}; variant is the segmentation variant or "" for the rest.
None = the paper prints "-" (mAP < 1%) or "/" (not applicable).
"""

from __future__ import annotations

# Table 3's per-class columns follow the dataset's 14 findings in its csv order (the converter's list).
from shards.downstream.chestxray14 import LABELS as CXR14_ORDER

FRACTIONS = ("0.01", "0.1", "1.0")


def _by_fraction(values: tuple) -> dict[str, float | None]:
    return dict(zip(FRACTIONS, values))


# Table 1: segmentation Dice and detection mAP at 1% / 10% / 100% of the training data.
TABLE1_G2D = {
    ("siim_segmentation", "encoder"): _by_fraction((62.6, 63.1, 66.8)),
    ("siim_segmentation", "encoder_decoder"): _by_fraction((65.6, 66.9, 68.4)),
    ("rsna_segmentation", "encoder"): _by_fraction((70.9, 72.6, 75.1)),
    ("rsna_segmentation", "encoder_decoder"): _by_fraction((72.8, 73.4, 76.9)),
    ("rsna_detection", ""): _by_fraction((15.9, 21.7, 27.2)),
    ("object_cxr_detection", ""): _by_fraction((3.8, 13.1, 20.4)),
}
TABLE1_RANDOM = {
    ("siim_segmentation", "encoder"): _by_fraction((9.0, 28.6, 54.3)),
    ("rsna_segmentation", "encoder"): _by_fraction((6.9, 10.6, 18.5)),
    ("rsna_detection", ""): _by_fraction((1.0, 4.0, 8.9)),
    ("object_cxr_detection", ""): _by_fraction((None, 0.5, 4.4)),
}

# Table 4: linear classification (CheXpert AUC, RSNA AUC, COVIDx accuracy).
TABLE4_G2D = {
    ("chexpert_linear", ""): _by_fraction((89.7, 90.4, 91.1)),
    ("rsna_linear", ""): _by_fraction((92.2, 92.9, 93.6)),
    ("covidx_linear", ""): _by_fraction((76.6, 88.2, 93.4)),
}
TABLE4_RANDOM = {
    ("chexpert_linear", ""): _by_fraction((56.1, 62.6, 65.7)),
    ("rsna_linear", ""): _by_fraction((58.9, 69.4, 74.1)),
    ("covidx_linear", ""): _by_fraction((50.5, 60.3, 70.0)),
}

# Table 3: ChestX-ray14 fine-tuning, mean AUC (+ G2D per class).
TABLE3_G2D = {("chestxray14_finetune", ""): _by_fraction((79.1, 81.1, 83.1))}
TABLE3_RANDOM = {("chestxray14_finetune", ""): _by_fraction((58.1, 69.1, 79.0))}
TABLE3_G2D_PER_CLASS = {
    fraction: dict(zip(CXR14_ORDER, values))
    for fraction, values in (
        ("0.01", (78.1, 88.3, 83.1, 70.2, 75.4, 69.7, 74.0, 86.5, 72.9, 81.6, 90.2, 74.4, 69.5, 94.1)),
        ("0.1", (78.4, 89.3, 83.7, 72.2, 78.8, 72.3, 74.1, 87.8, 75.3, 84.0, 90.4, 80.8, 72.5, 95.4)),
        ("1.0", (79.9, 90.2, 84.5, 71.8, 84.2, 78.0, 74.2, 87.7, 75.6, 86.9, 92.0, 83.1, 78.2, 96.5)),
    )
}

# Table 2a: zero-shot grounding (Recall, IoU, Dice) and 2b: zero-shot classification (AUC, F1, ACC).
# No training data is involved, so there is one value per metric (no fraction).
TABLE2_G2D = {
    "grounding_siim": {"pointing": 37.7, "iou": 3.9, "dice": 5.1},
    "grounding_rsna": {"pointing": 88.4, "iou": 33.5, "dice": 47.7},
    "zeroshot_rsna": {"auc": 87.6, "f1": 64.8, "acc": 81.5},
    "zeroshot_siim": {"auc": 89.7, "f1": 69.3, "acc": 85.4},
    "zeroshot_chestxray14": {"auc": 79.4, "f1": 33.1, "acc": 82.3},
    "zeroshot_chexpert": {"auc": 91.2, "f1": 65.6, "acc": None},  # the paper reports AUC/F1 only
}
