"""Every evaluation metric of the project, each implemented once.

- Classification (numpy, float64): `roc_auc`, `macro_auroc`, `roc_curve`, `precision_recall_f1_curve`,
  `best_f1`, `accuracy_at_threshold` (strict >, MedKLIP's), `zero_shot_metrics` (MedKLIP-style
  summary), `multiclass_accuracy`.
- Segmentation (torch, any device): `dice_score`, `dice_positive_only`, `iou_score`, `segmentation_summary`.
- Zero-shot grounding (torch): `pointing_game` (full-resolution maps), `grid_peak_hits` (the peak of
  the feature-grid map scored at its cell centre), `grounding_summary` (+ `MEDKLIP_GROUNDING` rule).
- Detection (torch for boxes, numpy for the ranking): `box_iou`, `nms` (torchvision.ops, with MGCA's
  "+1 pixel" IoU by a corner shift), `average_precision`,
  `map_over_thresholds` (VOC all-point), `coco_matches` + `coco_map` (COCO 101-point, numpy, with
  per-image weights for the bootstrap), `map_torchmetrics` (MGCA's exact metric call).

Conventions: a score s predicts positive when s >= threshold for the classification curves (the
threshold is one of the observed scores), while probability maps and heatmaps are binarised with
p > threshold (MGCA's and MedKLIP's rule). Inputs may be numpy arrays or torch tensors. Bad input
raises ValueError naming the argument. Undefined values (AUROC of a one-label class, Dice of an empty
set of images) come back as nan, never as a silent 0 or 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision

# ----------------------------------------------------------------------------------------------------
# input checks


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _binary_labels(y, name: str) -> np.ndarray:
    y = _numpy(y)
    if y.size and not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"{name}: labels must be 0/1, found {bad.tolist()}")
    return y.astype(np.int64)


def _scores(s, name: str) -> np.ndarray:
    s = _numpy(s).astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError(f"{name}: scores contain nan or inf")
    return s


def _binary_pair(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y, s = _binary_labels(y_true, "y_true"), _scores(scores, "scores")
    if y.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"y_true {y.shape} and scores {s.shape} must be matching 1-d arrays")
    if y.size == 0:
        raise ValueError("y_true is empty")
    return y, s


def _matrix_pair(Y, S) -> tuple[np.ndarray, np.ndarray]:
    Y, S = _binary_labels(Y, "Y"), _scores(S, "S")
    if Y.ndim != 2 or Y.shape != S.shape:
        raise ValueError(f"Y {Y.shape} and S {S.shape} must be matching [N, C] arrays")
    return Y, S


# ----------------------------------------------------------------------------------------------------
# classification


# Hand-written on purpose: scikit-learn is only a dev/test oracle here, and torchmetrics'
# binary_auroc/binary_roc count positives in float32 (~1e-8 off sklearn on 1k samples) and apply a
# sigmoid to scores outside [0, 1] (large logits become ties); the bootstrap's vectorised AUROC
# and this one must agree to 1e-12 (tests/test_eval_bootstrap.py), which needs exact float64.
def roc_auc(y_true, scores) -> float:
    """Binary AUROC as the Mann-Whitney statistic: the probability that a random positive scores
    above a random negative, ties counting one half (average ranks). Equals the trapezoidal area under
    `roc_curve`. Raises ValueError when only one label value is present (AUROC is undefined)."""
    y, s = _binary_pair(y_true, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc: needs both labels, got {n_pos} positives and {n_neg} negatives")
    # Average 1-based ranks: every member of a run of equal scores gets the mean rank of the run.
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    run_start = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # [R]
    run_end = np.r_[run_start[1:], s.size]  # [R], exclusive
    run_rank = (run_start + run_end + 1) / 2.0
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(run_rank, run_end - run_start)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def macro_auroc(Y, S) -> tuple[float, list[float]]:
    """Y, S: [N, C]. Returns (mean AUROC over the classes where it is defined, per-class AUROCs).
    A class whose column of Y holds a single label value has no AUROC: its entry is nan and it is
    left out of the mean (the mean itself is nan if no class is defined)."""
    Y, S = _matrix_pair(Y, S)
    per_class = []
    for c in range(Y.shape[1]):
        n_pos = int(Y[:, c].sum())
        defined = 0 < n_pos < Y.shape[0]
        per_class.append(roc_auc(Y[:, c], S[:, c]) if defined else math.nan)
    return _nanmean(per_class), per_class


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _counts_at_thresholds(y: np.ndarray, s: np.ndarray):
    """For each distinct score t in decreasing order, the true and false positives of s >= t."""
    order = np.argsort(-s, kind="stable")
    s_desc, y_desc = s[order], y[order]
    last_of_run = np.flatnonzero(np.r_[s_desc[1:] != s_desc[:-1], True])  # [T]
    tps = np.cumsum(y_desc)[last_of_run]
    fps = (last_of_run + 1) - tps
    return s_desc[last_of_run], tps, fps


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points for plotting: (fpr, tpr, thresholds), thresholds decreasing, one point per distinct
    score (s >= t is positive) plus a first point (0, 0) at threshold +inf. No points are dropped.
    A rate whose denominator is zero (no positives, or no negatives) is nan."""
    y, s = _binary_pair(y_true, scores)
    thresholds, tps, fps = _counts_at_thresholds(y, s)
    n_pos, n_neg = tps[-1], fps[-1]
    tpr = np.r_[0, tps] / n_pos if n_pos else np.full(tps.size + 1, math.nan)
    fpr = np.r_[0, fps] / n_neg if n_neg else np.full(fps.size + 1, math.nan)
    return fpr, tpr, np.r_[np.inf, thresholds]


def precision_recall_f1_curve(y_true, scores):
    """(precision, recall, f1, thresholds) at every distinct score t (s >= t is positive), thresholds
    decreasing. F1 is MedKLIP's float formula 2 * recall * precision / (recall + precision), 0 where
    both are 0, evaluated in that order on scikit-learn's float precision and recall: two thresholds
    whose F1 is equal in exact arithmetic can differ in the last bit, and that bit decides which one
    `best_f1` picks, as in MedKLIP. Recall is 0 when there are no positives (MedKLIP: nan)."""
    y, s = _binary_pair(y_true, scores)
    thresholds, tps, fps = _counts_at_thresholds(y, s)
    n_pos = tps[-1]
    precision = tps / (tps + fps)  # tps + fps >= 1: every threshold is some sample's score
    recall = tps / n_pos if n_pos else np.zeros(tps.size)
    denominator = recall + precision
    f1 = np.divide(2 * recall * precision, denominator, out=np.zeros(tps.size), where=denominator != 0)
    return precision, recall, f1, thresholds


def best_f1(y_true, scores) -> tuple[float, float]:
    """(max F1 over all thresholds, that threshold): numpy's argmax (first maximum) over the F1 of
    scikit-learn's ASCENDING precision_recall_curve, i.e. MedKLIP's choice. Among float-equal F1
    values the lowest threshold wins; an exact-arithmetic tie is decided by the float rounding of
    `precision_recall_f1_curve`'s formula (tests/test_metrics.py::test_best_f1_exact_tie_...)."""
    _, _, f1, thresholds = precision_recall_f1_curve(y_true, scores)
    best = f1.size - 1 - int(np.argmax(f1[::-1]))  # first maximum in ascending-threshold order
    return float(f1[best]), float(thresholds[best])


def accuracy_at_threshold(y_true, scores, threshold: float) -> float:
    """Fraction of samples with (s > threshold) == label. STRICT `>`: MedKLIP/KAD take the best-F1
    threshold from the precision-recall curve (where s >= t is positive) and then call positive only
    the scores above it, so the samples AT the threshold count as negative (a 1/n bias against `>=`)."""
    y, s = _binary_pair(y_true, scores)
    return float(np.mean((s > threshold) == (y == 1)))


def zero_shot_metrics(Y, S) -> dict:
    """MedKLIP-style zero-shot summary. Y: [N, C] 0/1 labels, S: [N, C] scores. Per class: AUROC
    (nan for a single-label class), best F1 over thresholds, accuracy at that F1 threshold; then the
    macro mean of each (nan AUROCs left out). Returns
    {auc, f1, acc: macro floats; auc_per_class, f1_per_class, acc_per_class, threshold_per_class: lists}."""
    Y, S = _matrix_pair(Y, S)
    auc, per_auc = macro_auroc(Y, S)
    per_f1, per_acc, per_t = [], [], []
    for c in range(Y.shape[1]):
        f1, t = best_f1(Y[:, c], S[:, c])
        per_f1.append(f1)
        per_t.append(t)
        per_acc.append(accuracy_at_threshold(Y[:, c], S[:, c], t))
    return {
        "auc": auc,
        "f1": float(np.mean(per_f1)),
        "acc": float(np.mean(per_acc)),
        "auc_per_class": per_auc,
        "f1_per_class": per_f1,
        "acc_per_class": per_acc,
        "threshold_per_class": per_t,
    }


def multiclass_accuracy(labels, logits) -> float:
    """labels: [N] class indices, logits: [N, C]. Fraction where argmax (first on ties) == label."""
    labels, logits = _numpy(labels), _scores(logits, "logits")
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"labels {labels.shape} must be [N] for logits {logits.shape} [N, C]")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels: class indices must lie in [0, {logits.shape[1]})")
    return float(np.mean(logits.argmax(axis=1) == labels))


# ----------------------------------------------------------------------------------------------------
# segmentation and grounding (torch: masks can be large and may already live on the GPU)


def _flat_mask(m: torch.Tensor, name: str) -> torch.Tensor:
    """[N, H, W] (trailing dims are flattened per image) bool or 0/1 -> bool [N, H*W]."""
    if m.dtype != torch.bool and not ((m == 0) | (m == 1)).all():
        raise ValueError(f"{name}: masks must be binary (bool or 0/1); threshold probabilities first")
    return m.reshape(m.shape[0], -1).bool()


def _same_shape(a, b, names: str) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(
            f"{names} must be matching [N, H, W] maps, got {tuple(a.shape)} and "
            f"{tuple(b.shape)} (resize heatmaps to the mask first)"
        )
    return a, b


def _per_image_masks(pred_bin, target) -> tuple[torch.Tensor, torch.Tensor]:
    pred_bin, target = _same_shape(pred_bin, target, "pred_bin and target")
    return _flat_mask(pred_bin, "pred_bin"), _flat_mask(target, "target")


def _overlap_counts(pred_bin, target):
    p, t = _per_image_masks(pred_bin, target)
    inter = (p & t).sum(1).double()  # [N]
    return inter, p.sum(1).double(), t.sum(1).double()


def dice_score(pred_bin, target, empty_rule: bool = True) -> torch.Tensor:
    """Per-image Dice 2|P&T| / (|P| + |T|), float64 [N]. With empty_rule (MGCA's metric) an empty
    ground truth scores 1 if the prediction is empty too and 0 otherwise; without it, an image where
    both are empty is nan (0/0) and an empty ground truth with a non-empty prediction still scores 0."""
    inter, p_sum, t_sum = _overlap_counts(pred_bin, target)
    dice = 2 * inter / (p_sum + t_sum)  # nan exactly where both are empty
    if empty_rule:
        dice = torch.where(t_sum == 0, (p_sum == 0).double(), dice)
    return dice


def iou_score(pred_bin, target, empty_rule: bool = True) -> torch.Tensor:
    """Per-image IoU |P&T| / |P|T|, float64 [N], with the same empty-ground-truth rule as `dice_score`."""
    inter, p_sum, t_sum = _overlap_counts(pred_bin, target)
    iou = inter / (p_sum + t_sum - inter)
    if empty_rule:
        iou = torch.where(t_sum == 0, (p_sum == 0).double(), iou)
    return iou


def dice_positive_only(pred_bin, target) -> float:
    """Mean Dice over the images whose ground truth is non-empty (nan if there are none)."""
    _, t = _per_image_masks(pred_bin, target)
    positive = t.any(1)
    if not positive.any():
        return math.nan
    return float(dice_score(pred_bin, target)[positive].mean())


def segmentation_summary(probs, targets, threshold: float = 0.5) -> dict:
    """probs, targets: [N, H, W]; prediction = probs > threshold. Returns {dice (empty rule, mean over
    all images), dice_positive (mean over non-empty ground truths), iou (empty rule), n_images,
    n_positive}. MGCA averages per-batch means instead of per-image Dice, which differs when the last
    batch is smaller. For big test sets, call `dice_score` per batch and concatenate."""
    pred = torch.as_tensor(probs) > threshold
    targets = torch.as_tensor(targets)
    return {
        "dice": float(dice_score(pred, targets).mean()),
        "dice_positive": dice_positive_only(pred, targets),
        "iou": float(iou_score(pred, targets).mean()),
        "n_images": int(pred.shape[0]),
        "n_positive": int(_flat_mask(targets, "targets").any(1).sum()),
    }


def pointing_game(heatmaps, masks) -> float:
    """heatmaps: [N, H, W] scores, masks: [N, H, W] ground truth. Hit rate of the argmax pixel (first
    one in row-major order on ties) falling inside the mask. An empty mask is always a miss; use
    `grounding_summary` for the positive-images-only protocol."""
    heatmaps, masks = _same_shape(heatmaps, masks, "heatmaps and masks")
    if torch.isnan(heatmaps).any():
        raise ValueError("heatmaps contain nan")
    n = heatmaps.shape[0]
    if n == 0:
        return math.nan
    target = _flat_mask(masks, "masks")
    peak = heatmaps.reshape(n, -1).argmax(1, keepdim=True)  # [N, 1]; torch.argmax takes the first maximum
    hit = target.gather(1, peak)
    return float(hit.double().mean())


def grid_peak_hits(grid_maps, masks) -> torch.Tensor:
    """grid_maps: [N, h, w] scores on the feature grid, masks: [N, H, W] ground truth -> bool [N].

    The pointing game scored where the peak really is: the first argmax CELL of the low-resolution
    map, mapped to the image pixel under that cell's centre ((j + 0.5) * W / w, same for rows).
    Why not the argmax of the upsampled map: bilinear upsampling (align_corners=False) spreads a
    border cell's value flat out to the image edge, and the first argmax of that plateau is the edge
    pixel, not the cell, so a peak in a border cell used to be scored at the image border."""
    grid_maps, masks = torch.as_tensor(grid_maps), torch.as_tensor(masks)
    if grid_maps.dim() != 3 or masks.dim() != 3 or grid_maps.shape[0] != masks.shape[0]:
        raise ValueError(
            f"grid_maps {tuple(grid_maps.shape)} and masks {tuple(masks.shape)} must be [N, h, w] "
            "and [N, H, W] with the same N"
        )
    if torch.isnan(grid_maps).any():
        raise ValueError("grid_maps contain nan")
    n, h, w = grid_maps.shape
    big_h, big_w = masks.shape[1:]
    peak = grid_maps.reshape(n, -1).argmax(1)  # [N], first maximum
    rows, cols = _cell_centres(h, w, big_h, big_w)
    target = _flat_mask(masks, "masks").reshape(n, big_h, big_w)
    return target[torch.arange(n), rows[peak // w], cols[peak % w]]


def _cell_centres(h: int, w: int, big_h: int, big_w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image pixel under each feature-grid cell's centre: rows [h], cols [w] (long)."""
    rows = ((torch.arange(h, dtype=torch.float64) + 0.5) * big_h / h).floor().long().clamp(0, big_h - 1)
    cols = ((torch.arange(w, dtype=torch.float64) + 0.5) * big_w / w).floor().long().clamp(0, big_w - 1)
    return rows, cols


def grid_chance(masks, h: int, w: int) -> torch.Tensor:
    """masks [N, H, W] -> float64 [N]: the pointing game (`grid_peak_hits`) of a map whose peak is a
    uniformly random cell of an h x w grid, i.e. the fraction of cell centres inside the mask. Its
    mean over the scored images is the chance level a model's pointing game must beat."""
    masks = torch.as_tensor(masks)
    if masks.dim() != 3:
        raise ValueError(f"masks {tuple(masks.shape)} must be [N, H, W]")
    n, big_h, big_w = masks.shape
    rows, cols = _cell_centres(h, w, big_h, big_w)
    target = _flat_mask(masks, "masks").reshape(n, big_h, big_w)
    return target[:, rows][:, :, cols].double().mean(dim=(1, 2))


def grid_peak_cell_overlaps(grid_maps, masks) -> torch.Tensor:
    """bool [N]: the first argmax CELL of the feature-grid map [N, h, w] contains any pixel of the mask
    [N, H, W] (cell j spans pixels floor(j * W / w) .. floor((j + 1) * W / w) - 1). A lenient
    diagnostic at the map's own resolution, not the pointing game: a region smaller than a cell can
    be found by the right cell and still miss its centre pixel."""
    grid_maps, masks = torch.as_tensor(grid_maps), torch.as_tensor(masks)
    n, h, w = grid_maps.shape
    big_h, big_w = masks.shape[1:]
    target = _flat_mask(masks, "masks").reshape(n, big_h, big_w)
    peak = grid_maps.reshape(n, -1).argmax(1)
    out = torch.zeros(n, dtype=torch.bool)
    for i, (r, c) in enumerate(zip((peak // w).tolist(), (peak % w).tolist())):
        out[i] = target[i, r * big_h // h : (r + 1) * big_h // h, c * big_w // w : (c + 1) * big_w // w].any()
    return out


# MedKLIP's grounding rule: the raw similarity map thresholded at > 0.008, no normalisation.
MEDKLIP_GROUNDING = {"threshold": 0.008, "normalize": False}


def grounding_per_image(
    heatmaps, masks, grid_maps=None, threshold: float = 0.5, normalize: bool = True
) -> dict[str, torch.Tensor]:
    """Per image (float64 [N]; nan on images with an empty mask, which grounding does not score):
    pointing (1/0: `grid_peak_hits` when the feature-grid maps are given, else the argmax pixel of
    the full map), iou and dice of the map thresholded at > threshold (after a per-image min-max
    scaling to [0, 1] with `normalize`; a constant map becomes all 0). heatmaps, masks: [N, H, W];
    grid_maps: [N, h, w]. Also `positive` (bool [N]) and, with grid maps, `pointing_cell`
    (`grid_peak_cell_overlaps`) and `pointing_chance` (`grid_chance`: a random peak cell's hit rate)."""
    heatmaps, masks = _same_shape(heatmaps, masks, "heatmaps and masks")
    if torch.isnan(heatmaps).any():
        raise ValueError("heatmaps contain nan")
    n = heatmaps.shape[0]
    positive = _flat_mask(masks, "masks").any(1)
    maps = heatmaps.double()
    if normalize and n:
        flat = maps.reshape(n, -1)
        lo, hi = flat.min(1).values, flat.max(1).values
        span = (hi - lo).clamp_min(torch.finfo(torch.float64).tiny)
        maps = ((flat - lo[:, None]) / span[:, None]).reshape(maps.shape)
    extra = {}
    if grid_maps is not None:
        hits = grid_peak_hits(grid_maps, masks)
        nan = torch.full((n,), math.nan, dtype=torch.float64)
        extra["pointing_cell"] = torch.where(positive, grid_peak_cell_overlaps(grid_maps, masks).double(), nan)
        extra["pointing_chance"] = torch.where(positive, grid_chance(masks, *grid_maps.shape[1:]), nan)
    else:
        peak = heatmaps.reshape(n, -1).argmax(1, keepdim=True)
        hits = _flat_mask(masks, "masks").gather(1, peak)[:, 0]
    nan = torch.full((n,), math.nan, dtype=torch.float64)
    pred = maps > threshold
    return {
        "pointing": torch.where(positive, hits.double(), nan),
        "iou": torch.where(positive, iou_score(pred, masks), nan),
        "dice": torch.where(positive, dice_score(pred, masks), nan),
        "positive": positive,
        **extra,
    }


def grounding_summary(heatmaps, masks, threshold: float = 0.5, normalize: bool = True, grid_maps=None) -> dict:
    """Zero-shot grounding scored on positive images only (non-empty mask; the others are dropped):
    the means of `grounding_per_image`. `grounding_summary(h, m, **MEDKLIP_GROUNDING)` is MedKLIP's
    threshold rule. Returns {pointing, iou, dice, n_images} (nan metrics when no image is positive)."""
    per = grounding_per_image(heatmaps, masks, grid_maps, threshold, normalize)
    n = int(per["positive"].sum())
    if n == 0:
        return {"pointing": math.nan, "iou": math.nan, "dice": math.nan, "n_images": 0}
    keep = per["positive"]
    return {
        "pointing": float(per["pointing"][keep].mean()),
        "iou": float(per["iou"][keep].mean()),
        "dice": float(per["dice"][keep].mean()),
        "n_images": n,
    }


# ----------------------------------------------------------------------------------------------------
# detection: boxes are (x1, y1, x2, y2) in pixels, one class


def _boxes(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2 or x.shape[1] != 4:
        raise ValueError(f"{name}: boxes must be [N, 4] (x1, y1, x2, y2), got {tuple(x.shape)}")
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _plus_one(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes whose torchvision widths are the "+1 pixel" ones: with (x2 + 1, y2 + 1) as the corners,
    torchvision's (x2 - x1) area and overlap become (x2 - x1 + 1), the pixel-inclusive convention of
    the YOLOv3 code MGCA's NMS uses, which torchvision has no switch for."""
    return torch.cat([boxes[:, :2], boxes[:, 2:] + 1], dim=1)


def box_iou(a, b, plus_one: bool = False) -> torch.Tensor:
    """[N, 4] x [M, 4] (x1, y1, x2, y2) -> [N, M] IoU via torchvision.ops.box_iou. Area is
    (x2 - x1) * (y2 - y1) (as torchvision and pycocotools), or with `plus_one` (x2 - x1 + 1) *
    (y2 - y1 + 1) (`_plus_one`). Two zero-area boxes have IoU 0 (torchvision: 0/0 = nan)."""
    a, b = _boxes(a, "box_iou a"), _boxes(b, "box_iou b")
    if plus_one:
        a, b = _plus_one(a), _plus_one(b)
    return torchvision.ops.box_iou(a, b).nan_to_num(nan=0.0)


def nms(boxes, scores, iou_threshold: float, plus_one: bool = False) -> torch.Tensor:
    """Greedy non-maximum suppression (torchvision.ops.nms): visit boxes by decreasing score, keep one
    unless it overlaps an already kept box with IoU > iou_threshold (`box_iou`'s `plus_one`
    convention). Returns int64 indices of the kept boxes, by decreasing score."""
    boxes, scores = _boxes(boxes, "nms"), torch.as_tensor(scores)
    if scores.shape != (boxes.shape[0],):
        raise ValueError(f"nms: boxes {tuple(boxes.shape)} must be [N, 4] and scores {tuple(scores.shape)} [N]")
    return torchvision.ops.nms(_plus_one(boxes) if plus_one else boxes, scores.to(boxes.dtype), iou_threshold)


DEFAULT_IOU_THRESHOLDS = (0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75)
# COCO's 101 recall points as torchmetrics hands them to pycocotools: torch.linspace in float32, then
# float64. 0.3 becomes 0.30000001192..., so a recall of exactly 3/10 falls just below it; with numpy's
# float64 grid the bootstrap's mAP differed from the headline by up to 0.002 on random sets.
COCO_RECALLS = np.asarray(torch.linspace(0.0, 1.0, 101).tolist(), dtype=np.float64)
COCO_MAX_DETECTIONS = 100  # per image: torchmetrics' largest max_detection_threshold


def keep_image(n_pred: int, n_gt: int, skip: str) -> bool:
    """skip="mgca": an image enters mAP only if the detector returned a box AND it has ground truth
    (MGCA's evaluation loop skips the others); skip="none": every image enters."""
    if skip not in ("mgca", "none"):
        raise ValueError(f"skip={skip!r}; choose 'mgca' or 'none'")
    return skip == "none" or (n_pred > 0 and n_gt > 0)


def _detection_lists(pred_boxes_per_image, pred_scores_per_image, gt_boxes_per_image):
    n = len(gt_boxes_per_image)
    if len(pred_boxes_per_image) != n or len(pred_scores_per_image) != n:
        raise ValueError(
            f"detection: {len(pred_boxes_per_image)} pred box lists, {len(pred_scores_per_image)} "
            f"score lists and {n} ground-truth lists must have one entry per image"
        )
    out = []
    for i, (boxes, scores, gt) in enumerate(zip(pred_boxes_per_image, pred_scores_per_image, gt_boxes_per_image)):
        boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
        gt = torch.as_tensor(gt, dtype=torch.float64).reshape(-1, 4)
        scores = _scores(scores, f"pred_scores_per_image[{i}]").reshape(-1)
        if scores.size != boxes.shape[0]:
            raise ValueError(f"image {i}: {boxes.shape[0]} predicted boxes but {scores.size} scores")
        out.append((boxes, scores, gt))
    return out


def map_torchmetrics(
    pred_boxes_per_image,
    pred_scores_per_image,
    gt_boxes_per_image,
    thresholds=DEFAULT_IOU_THRESHOLDS,
    skip: str = "mgca",
) -> dict:
    """mAP exactly as MGCA computes it: torchmetrics' MeanAveragePrecision (pycocotools backend; xyxy
    boxes, COCO 101-point interpolation, <= 100 detections per image, all areas) over IoU `thresholds`,
    one class, fed only the images `keep_image(.., skip)` admits. Pass the OBJECTNESS as scores (MGCA).

    Returns {map, per_threshold {t: AP}, n_images_scored, n_images_over_max_detections}. `map` is
    pycocotools' own number (the mean of its precision table) in float64; torchmetrics rounds that
    same number to float32 (~1e-8 off). nan when no image is scored or no ground truth is left
    (torchmetrics' -1). An image with more than 100 boxes keeps its 100 highest-scored ones (COCO's
    rule, part of MGCA's metric): torchmetrics warns about it on every such image, so the warning is
    off here and the count is returned instead."""
    from torchmetrics.detection import MeanAveragePrecision  # imported here: ~2 s, detection only

    metric = MeanAveragePrecision(
        iou_thresholds=[float(t) for t in thresholds], backend="pycocotools", extended_summary=True
    )
    metric.warn_on_many_detections = False
    n_scored = n_over = 0
    for boxes, scores, gt in _detection_lists(pred_boxes_per_image, pred_scores_per_image, gt_boxes_per_image):
        if not keep_image(scores.size, gt.shape[0], skip):
            continue
        n_scored += 1
        n_over += int(scores.size > COCO_MAX_DETECTIONS)
        metric.update(
            [
                {
                    "boxes": boxes.float(),
                    "scores": torch.from_numpy(scores).float(),
                    "labels": torch.zeros(scores.size, dtype=torch.long),
                }
            ],
            [{"boxes": gt.float(), "labels": torch.zeros(gt.shape[0], dtype=torch.long)}],
        )
    per_threshold = {round(float(t), 4): math.nan for t in thresholds}
    out = {"map": math.nan, "per_threshold": per_threshold, "n_images_scored": n_scored}
    out["n_images_over_max_detections"] = n_over
    if n_scored == 0:
        return out
    precision = metric.compute()["precision"].double()  # [T, R=101, K=1 class, A=4 areas, M=3 max-dets]
    table = precision[:, :, 0, 0, -1]  # [T, R]: area "all", 100 detections
    for i, t in enumerate(per_threshold):
        per_threshold[t] = float(table[i].mean()) if (table[i] > -1).all() else math.nan
    defined = table[table > -1]  # pycocotools' summarize: the mean over the defined entries
    out["map"] = float(defined.mean()) if defined.numel() else math.nan
    return out


def _coco_iou(dt: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    """[k, 4] x [G, 4] xyxy -> [k, G] IoU as torchmetrics + pycocotools compute it: boxes to float32,
    xywh in float32 (torchvision's box_convert), then pycocotools' bbIou in float64 (overlap from
    x + w, area w * h). Bit-identical IoUs make the matches identical, not just within ~1e-7."""

    def xywh(b):
        b = b.float()
        return torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], dim=1).double().numpy()  # [n, 4]

    d, g = xywh(dt), xywh(gt)
    w = np.minimum(d[:, None, 0] + d[:, None, 2], g[None, :, 0] + g[None, :, 2]) - np.maximum(
        d[:, None, 0], g[None, :, 0]
    )
    h = np.minimum(d[:, None, 1] + d[:, None, 3], g[None, :, 1] + g[None, :, 3]) - np.maximum(
        d[:, None, 1], g[None, :, 1]
    )
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    union = (d[:, 2] * d[:, 3])[:, None] + (g[:, 2] * g[:, 3])[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(inter > 0, inter / union, 0.0)


def coco_matches(
    pred_boxes_per_image,
    pred_scores_per_image,
    gt_boxes_per_image,
    thresholds=DEFAULT_IOU_THRESHOLDS,
    skip: str = "mgca",
    max_detections: int = COCO_MAX_DETECTIONS,
) -> dict[str, np.ndarray]:
    """Per-detection true/false positive flags under COCO's matching, computed once so that mAP can be
    recomputed for any reweighting of the images (`coco_map`, the bootstrap). Per image: the
    `max_detections` highest scores (stable order), each in turn takes the unmatched ground truth of
    highest IoU >= t (ties: the later box, as pycocotools). Images not admitted by `skip` are dropped
    (n_gt 0, no detections). Returns {score [K], image [K], tp [T, K] bool, n_gt [N]} (K = all kept
    detections in image order)."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    scores, images, tps, n_gt = [], [], [], []
    for i, (boxes, s, gt) in enumerate(
        _detection_lists(pred_boxes_per_image, pred_scores_per_image, gt_boxes_per_image)
    ):
        if not keep_image(s.size, gt.shape[0], skip):
            n_gt.append(0)
            continue
        n_gt.append(gt.shape[0])
        order = np.argsort(-s, kind="stable")[:max_detections]
        ious = _coco_iou(boxes[order], gt)  # [k, G]
        tp = np.zeros((thresholds.size, order.size), dtype=bool)
        for ti, t in enumerate(thresholds):
            free = np.ones(gt.shape[0], dtype=bool)
            for k in range(order.size):
                candidates = np.where(free & (ious[k] >= min(t, 1 - 1e-10)), ious[k], -1.0)
                if candidates.size and candidates.max() >= 0:
                    g = candidates.size - 1 - int(np.argmax(candidates[::-1]))  # last of equal IoUs
                    tp[ti, k], free[g] = True, False
        scores.append(s[order])
        images.append(np.full(order.size, i))
        tps.append(tp)

    def cat(xs, empty):
        return np.concatenate(xs, axis=-1) if xs else empty

    return {
        "score": cat(scores, np.zeros(0)),
        "image": cat(images, np.zeros(0, dtype=np.int64)),
        "tp": cat(tps, np.zeros((thresholds.size, 0), dtype=bool)),
        "n_gt": np.asarray(n_gt, dtype=np.int64),
    }


def coco_map(matches: dict[str, np.ndarray], weights: np.ndarray | None = None, chunk: int = 64) -> np.ndarray:
    """COCO 101-point AP per IoU threshold from `coco_matches`, for each row of image weights.

    weights: [B, N] non-negative counts per image (a bootstrap resample repeats an image w times:
    its detections and ground truth count w times); None = every image once (B = 1).
    Returns [B, T] AP (nan where a row has no ground truth). The mAP is the mean over T.
    Vectorised over the rows (`chunk` rows at a time bound the [rows, K] work arrays)."""
    n_img = matches["n_gt"].size
    weights = np.ones((1, n_img)) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(-matches["score"], kind="stable")  # pycocotools: mergesort over image order
    image, tp = matches["image"][order], matches["tp"][:, order]  # [K], [T, K]
    out = np.full((weights.shape[0], tp.shape[0]), math.nan)
    for start in range(0, weights.shape[0], chunk):
        w = weights[start : start + chunk]  # [b, N]
        n_gt = w @ matches["n_gt"]  # [b]
        w_det = w[:, image]  # [b, K]
        for t in range(tp.shape[0]):
            ctp = np.cumsum(w_det * tp[t], axis=1)
            cfp = np.cumsum(w_det * ~tp[t], axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                precision = np.where(ctp + cfp > 0, ctp / (ctp + cfp), 0.0)
                recall = ctp / n_gt[:, None]
            envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
            for r in range(w.shape[0]):
                if n_gt[r] == 0:
                    continue
                if envelope.shape[1] == 0:  # ground truth but no detection anywhere: pycocotools' 0
                    out[start + r, t] = 0.0
                    continue
                idx = np.searchsorted(recall[r], COCO_RECALLS, side="left")
                hit = idx < envelope.shape[1]
                out[start + r, t] = np.where(hit, envelope[r, np.minimum(idx, envelope.shape[1] - 1)], 0.0).mean()
    return out
