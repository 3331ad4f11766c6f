"""Every evaluation metric of the project, each implemented once.

- Classification (numpy, float64): `roc_auc`, `macro_auroc`, `roc_curve`, `precision_recall_f1_curve`,
  `best_f1`, `accuracy_at_threshold`, `zero_shot_metrics` (MedKLIP-style summary), `multiclass_accuracy`.
- Segmentation (torch, any device): `dice_score`, `dice_positive_only`, `iou_score`, `segmentation_summary`.
- Zero-shot grounding (torch): `pointing_game`, `grounding_summary` (+ `MEDKLIP_GROUNDING` rule).
- Detection (torch for boxes, numpy for the ranking): `box_iou`, `nms`, `average_precision`,
  `map_over_thresholds`.

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
    run_end = np.r_[run_start[1:], s.size]                                 # [R], exclusive
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
    decreasing. F1 is computed as 2TP / (TP + FP + n_positives), which equals the harmonic mean of
    precision and recall and is 0 where TP = 0; this integer form makes equal F1 values compare equal
    (2pr / (p + r) can differ in the last bit). Recall is 0 when there are no positives."""
    y, s = _binary_pair(y_true, scores)
    thresholds, tps, fps = _counts_at_thresholds(y, s)
    n_pos = tps[-1]
    precision = tps / (tps + fps)  # tps + fps >= 1: every threshold is some sample's score
    recall = tps / n_pos if n_pos else np.zeros(tps.size)
    f1 = 2 * tps / (tps + fps + n_pos)
    return precision, recall, f1, thresholds


def best_f1(y_true, scores) -> tuple[float, float]:
    """(max F1 over all thresholds, that threshold). Among thresholds with equal F1 the lowest one
    wins, which is what argmax over scikit-learn's ascending precision_recall_curve picks, i.e. the
    threshold MedKLIP's numbers were computed with."""
    _, _, f1, thresholds = precision_recall_f1_curve(y_true, scores)
    best = f1.size - 1 - int(np.argmax(f1[::-1]))  # last maximum in decreasing-threshold order
    return float(f1[best]), float(thresholds[best])


def accuracy_at_threshold(y_true, scores, threshold: float) -> float:
    """Fraction of samples with (s >= threshold) == label."""
    y, s = _binary_pair(y_true, scores)
    return float(np.mean((s >= threshold) == (y == 1)))


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
    return {"auc": auc, "f1": float(np.mean(per_f1)), "acc": float(np.mean(per_acc)),
            "auc_per_class": per_auc, "f1_per_class": per_f1, "acc_per_class": per_acc,
            "threshold_per_class": per_t}


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
        raise ValueError(f"{names} must be matching [N, H, W] maps, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)} (resize heatmaps to the mask first)")
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
    return {"dice": float(dice_score(pred, targets).mean()),
            "dice_positive": dice_positive_only(pred, targets),
            "iou": float(iou_score(pred, targets).mean()),
            "n_images": int(pred.shape[0]),
            "n_positive": int(_flat_mask(targets, "targets").any(1).sum())}


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


# MedKLIP's grounding rule: the raw similarity map thresholded at > 0.008, no normalisation.
MEDKLIP_GROUNDING = {"threshold": 0.008, "normalize": False}


def grounding_summary(heatmaps, masks, threshold: float = 0.5, normalize: bool = True) -> dict:
    """Zero-shot grounding scored on positive images only (non-empty mask; the others are dropped).
    heatmaps, masks: [N, H, W]. pointing = `pointing_game`; iou and dice are means over images of the
    map thresholded at heatmap > threshold. normalize=True first min-max scales each map to [0, 1]
    (a constant map becomes all 0); `grounding_summary(h, m, **MEDKLIP_GROUNDING)` is MedKLIP's rule.
    Returns {pointing, iou, dice, n_images} (nan metrics when no image is positive)."""
    heatmaps, masks = _same_shape(heatmaps, masks, "heatmaps and masks")
    positive = _flat_mask(masks, "masks").any(1)
    heatmaps, masks = heatmaps[positive], masks[positive]
    n = int(positive.sum())
    if n == 0:
        return {"pointing": math.nan, "iou": math.nan, "dice": math.nan, "n_images": 0}
    maps = heatmaps.double()
    if normalize:
        flat = maps.reshape(n, -1)
        lo, hi = flat.min(1).values, flat.max(1).values
        span = (hi - lo).clamp_min(torch.finfo(torch.float64).tiny)
        maps = ((flat - lo[:, None]) / span[:, None]).reshape(maps.shape)
    pred = maps > threshold
    return {"pointing": pointing_game(heatmaps, masks),
            "iou": float(iou_score(pred, masks).mean()),
            "dice": float(dice_score(pred, masks).mean()),
            "n_images": n}


# ----------------------------------------------------------------------------------------------------
# detection: boxes are (x1, y1, x2, y2) in pixels, one class


def box_iou(a, b) -> torch.Tensor:
    """a: [N, 4], b: [M, 4] -> [N, M] IoU. Area is (x2 - x1) * (y2 - y1) (no +1), as torchvision.
    Two zero-area boxes have IoU 0."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.dim() != 2 or a.shape[1] != 4 or b.dim() != 2 or b.shape[1] != 4:
        raise ValueError(f"box_iou: boxes must be [N, 4] and [M, 4], got {tuple(a.shape)}, {tuple(b.shape)}")
    a, b = a.to(torch.promote_types(a.dtype, torch.float32)), b.to(torch.promote_types(b.dtype, torch.float32))
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)  # [N]
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)  # [M]
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])                      # [N, M, 2]
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])                  # [N, M, 2]
    wh = (bottom_right - top_left).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(torch.finfo(union.dtype).tiny),
                       torch.zeros_like(inter))


def nms(boxes, scores, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: visit boxes by decreasing score, keep one unless it overlaps an
    already kept box with IoU > iou_threshold. Returns int64 indices of the kept boxes, by decreasing
    score (same contract as torchvision.ops.nms). Builds the full [N, N] IoU matrix, so run it after
    the confidence filter (a few hundred boxes), not on raw YOLO outputs."""
    boxes, scores = torch.as_tensor(boxes), torch.as_tensor(scores)
    if boxes.dim() != 2 or boxes.shape[1] != 4 or scores.shape != (boxes.shape[0],):
        raise ValueError(f"nms: boxes {tuple(boxes.shape)} must be [N, 4] and scores {tuple(scores.shape)} [N]")
    order = scores.argsort(descending=True, stable=True)
    overlaps = (box_iou(boxes[order], boxes[order]) > iou_threshold).cpu()  # [N, N], loop runs on CPU
    suppressed = torch.zeros(order.numel(), dtype=torch.bool)
    keep = []
    for i in range(order.numel()):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


DEFAULT_IOU_THRESHOLDS = (0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75)


def _detection_inputs(pred_boxes_per_image, pred_scores_per_image, gt_boxes_per_image,
                      skip_images_without_gt: bool, skip_images_without_predictions: bool):
    """Per image: (scores [K] float64, IoU with its ground truth [K, G] float64, G), after skipping."""
    n = len(gt_boxes_per_image)
    if len(pred_boxes_per_image) != n or len(pred_scores_per_image) != n:
        raise ValueError(f"detection: {len(pred_boxes_per_image)} pred box lists, {len(pred_scores_per_image)} "
                         f"score lists and {n} ground-truth lists must have one entry per image")
    images = []
    for i, (boxes, scores, gt) in enumerate(zip(pred_boxes_per_image, pred_scores_per_image, gt_boxes_per_image)):
        boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
        gt = torch.as_tensor(gt, dtype=torch.float64).reshape(-1, 4)
        scores = _scores(scores, f"pred_scores_per_image[{i}]").reshape(-1)
        if scores.size != boxes.shape[0]:
            raise ValueError(f"image {i}: {boxes.shape[0]} predicted boxes but {scores.size} scores")
        if (skip_images_without_gt and gt.shape[0] == 0) or (skip_images_without_predictions and scores.size == 0):
            continue
        images.append((scores, box_iou(boxes, gt).numpy(), gt.shape[0]))
    return images


def _ap_from_matches(images, iou_threshold: float) -> float:
    scores, is_tp, n_gt = [], [], 0
    for image_scores, ious, g in images:
        n_gt += g
        # Greedy matching inside the image, by decreasing score: each prediction takes the unmatched
        # ground truth it overlaps most, if that IoU >= threshold; otherwise it is a false positive.
        tp = np.zeros(image_scores.size, dtype=bool)
        free = np.ones(g, dtype=bool)
        for k in np.argsort(-image_scores, kind="stable"):
            if not free.any():
                break
            candidates = np.where(free, ious[k], -1.0)
            best = int(np.argmax(candidates))
            if candidates[best] >= iou_threshold:
                tp[k], free[best] = True, False
        scores.append(image_scores)
        is_tp.append(tp)
    if n_gt == 0:
        return math.nan
    if not scores or sum(s.size for s in scores) == 0:
        return 0.0
    order = np.argsort(-np.concatenate(scores), kind="stable")  # ties keep image order
    tp = np.concatenate(is_tp)[order]
    tp_cum = np.cumsum(tp)
    recall = tp_cum / n_gt
    precision = tp_cum / np.arange(1, tp.size + 1)
    # All-point interpolation (VOC 2010+): precision at recall r is the best precision at any
    # recall >= r; AP is the area under that step curve.
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    recall_steps = np.diff(np.r_[0.0, recall])
    return float(np.sum(recall_steps * envelope))


def average_precision(pred_boxes_per_image, pred_scores_per_image, gt_boxes_per_image,
                      iou_threshold: float, skip_images_without_gt: bool = False,
                      skip_images_without_predictions: bool = False) -> float:
    """Single-class AP over a data set, all-point interpolated (VOC style).

    pred_boxes_per_image: list of [K_i, 4]; pred_scores_per_image: list of [K_i]; gt_boxes_per_image:
    list of [G_i, 4] (G_i = 0 for a normal image). Predictions of all images are ranked together by
    score; within an image they are matched greedily by score (see `_ap_from_matches`). By default a
    prediction on an image without ground truth is a false positive and an image with ground truth but
    no prediction contributes misses. The skip flags drop such images, as MGCA's evaluation does
    (it skips both). nan when no ground-truth box is left; 0.0 when there are boxes but no predictions."""
    images = _detection_inputs(pred_boxes_per_image, pred_scores_per_image, gt_boxes_per_image,
                               skip_images_without_gt, skip_images_without_predictions)
    return _ap_from_matches(images, iou_threshold)


def map_over_thresholds(pred_boxes_per_image, pred_scores_per_image, gt_boxes_per_image,
                        thresholds=DEFAULT_IOU_THRESHOLDS, skip_images_without_gt: bool = False,
                        skip_images_without_predictions: bool = False) -> dict:
    """`average_precision` at each IoU threshold (default 0.40:0.05:0.75) and their mean.
    Returns {map: float, per_threshold: {threshold rounded to 4 places: AP}}. IoUs are computed once."""
    images = _detection_inputs(pred_boxes_per_image, pred_scores_per_image, gt_boxes_per_image,
                               skip_images_without_gt, skip_images_without_predictions)
    per_threshold = {round(float(t), 4): _ap_from_matches(images, float(t)) for t in thresholds}
    return {"map": float(np.mean(list(per_threshold.values()))), "per_threshold": per_threshold}
