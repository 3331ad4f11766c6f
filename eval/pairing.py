"""Can two evaluation runs be compared image by image (`make compare`, tools/compare.py)?

    check_predictions(path, predictions, family)   raises UserError: the file cannot be scored as it is
    first_difference(pred_a, pred_b, same_geometry) -> ""   or one phrase naming the first difference

A paired bootstrap is only meaningful on one test set: the same keys, and per key the same patient and
the same labels. predictions.npz holds the labels too (targets, positivity, ground-truth boxes), so a
run on relabelled or truncated data is caught here, before any resampling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.cli import UserError

# What each family's predictions.npz must hold (eval/bootstrap.py reads them; grounding's per-image
# arrays vary with the run's age, so only the keys are required there).
REQUIRED = {
    "linear": ("keys", "names", "kind", "targets", "scores"),
    "finetune": ("keys", "names", "kind", "targets", "scores"),
    "zeroshot_cls": ("keys", "names", "targets", "scores"),
    "segmentation": ("keys", "dice", "iou", "positive"),
    "grounding": ("keys",),
    "detection": ("keys", "pred_boxes", "pred_scores", "pred_image", "gt_boxes", "gt_image", "iou_thresholds"),
}
# Arrays with one row per test image (the rest: label names, flat box lists, thresholds).
PER_IMAGE = (
    "patient_ids",
    "targets",
    "scores",
    "dice",
    "dice_raw",
    "iou",
    "positive",
    "gt_area",
    "pred_area",
    "pointing",
    "pointing_cell",
    "pointing_chance",
    "pointing_attn_value",
    "pointing_projector",
    "medklip_iou",
    "medklip_dice",
)
# Detection's flat arrays: (box rows, the array naming each row's image).
BOX_LISTS = (("pred_boxes", "pred_image", ("pred_scores",)), ("gt_boxes", "gt_image", ()))


def check_predictions(path: Path, p: dict, family: str) -> None:
    """A predictions.npz that the bootstrap can score as it is: the family's arrays present, keys
    unique strings, every per-image array one row per key, detection's boxes naming existing images.
    Raises UserError naming the file and the first problem."""
    missing = [k for k in REQUIRED.get(family, ("keys",)) if k not in p]
    if missing:
        raise UserError(f"{path}: lacks the array(s) {missing} of a {family} run")
    keys = p["keys"]
    if keys.ndim != 1 or keys.dtype.kind != "U":
        raise UserError(f"{path}: keys is not a list of strings (dtype {keys.dtype}, shape {keys.shape})")
    n = len(keys)
    if len(set(keys.tolist())) != n:
        dup = next(k for i, k in enumerate(keys.tolist()) if k in keys.tolist()[:i])
        raise UserError(f"{path}: key {dup!r} appears more than once")
    for name in PER_IMAGE:
        if name in p and (p[name].ndim == 0 or len(p[name]) != n):
            rows = "a scalar" if p[name].ndim == 0 else f"{len(p[name])} rows"
            raise UserError(f"{path}: {name} has {rows} for {n} keys")
    if "scores" in p and "names" in p and (p["scores"].ndim != 2 or p["scores"].shape[1] != len(p["names"])):
        raise UserError(f"{path}: scores has shape {p['scores'].shape}, not [{n}, {len(p['names'])}] (one per name)")
    for rows, image, others in BOX_LISTS if family == "detection" else ():
        for name in (rows, *others):
            if len(p[name]) != len(p[image]):
                raise UserError(f"{path}: {name} has {len(p[name])} rows, {image} {len(p[image])}")
        index = p[image]
        if index.size and (index.dtype.kind not in "iu" or index.min() < 0 or index.max() >= n):
            raise UserError(f"{path}: {image} names images outside 0..{n - 1}")
    for name, value in p.items():
        if name not in ("keys", "patient_ids", "names", "kind") and value.dtype.kind not in "biuf":
            raise UserError(f"{path}: {name} is not numeric (dtype {value.dtype})")


def _rows_by_key(p: dict, name: str) -> dict[str, np.ndarray]:
    return dict(zip(p["keys"].tolist(), p[name]))


def _gt_boxes_by_key(p: dict) -> dict[str, np.ndarray]:
    """Detection ground truth per image key, rows sorted (the order boxes were listed is not a label)."""
    boxes, image = np.asarray(p["gt_boxes"]).reshape(-1, 4), p["gt_image"]
    return {k: np.array(sorted(map(tuple, boxes[image == i]))) for i, k in enumerate(p["keys"].tolist())}


def first_difference(pred_a: dict, pred_b: dict, same_geometry: bool) -> str:
    """ "" when A and B scored the same test set (same keys, patients and labels per key; label names
    and kind); else one phrase naming the first difference. Ground-truth areas and boxes are in the
    evaluated image's pixels, so they are compared only when both runs used the same image size
    (`same_geometry`); box counts and positivity always."""
    for name in ("names", "kind"):
        if name in pred_a and name in pred_b and pred_a[name].tolist() != pred_b[name].tolist():
            return f"label {name} differ: {pred_a[name].tolist()} in A, {pred_b[name].tolist()} in B"
    keys_a, keys_b = pred_a["keys"].tolist(), pred_b["keys"].tolist()
    if len(keys_a) != len(keys_b):
        return f"A scored {len(keys_a)} test images, B {len(keys_b)}"
    set_a, set_b = set(keys_a), set(keys_b)
    for key in keys_a:
        if key not in set_b:
            return f"key {key!r} is in A but not in B"
    for key in keys_b:
        if key not in set_a:
            return f"key {key!r} is in B but not in A"
    labels = ["patient_ids", "targets", "positive"] + (["gt_area"] if same_geometry else [])
    for name in labels:
        if (name in pred_a) != (name in pred_b):
            return f"{name} is recorded in {'A' if name in pred_a else 'B'} only"
        if name not in pred_a:
            continue
        rows_a, rows_b = _rows_by_key(pred_a, name), _rows_by_key(pred_b, name)
        for key in keys_a:
            if not np.array_equal(rows_a[key], rows_b[key]):
                return f"key {key!r} has {name} {rows_a[key].tolist()} in A, {rows_b[key].tolist()} in B"
    if "gt_boxes" in pred_a and "gt_boxes" in pred_b:
        boxes_a, boxes_b = _gt_boxes_by_key(pred_a), _gt_boxes_by_key(pred_b)
        for key in keys_a:
            a, b = boxes_a[key], boxes_b[key]
            if len(a) != len(b):
                return f"key {key!r} has {len(a)} ground-truth boxes in A, {len(b)} in B"
            if same_geometry and not np.allclose(a, b, atol=1e-3):
                return f"key {key!r} has ground-truth boxes {a.tolist()} in A, {b.tolist()} in B"
    return ""
