"""Confidence intervals: every metric recomputed from predictions.npz under bootstrap resampling.

    resample_weights(n, groups, n_resamples, seed) -> W [B, n]   how often each test image is drawn
    family_metrics(family, predictions, W) -> {metric: [B]}      the task's metrics for each row of W
    confidence_intervals(family, predictions, seed) -> {metric: [low, high]}   95% percentile CIs
    paired_difference(family, pred_a, pred_b, seed) -> {metric: {a, b, diff, ci95}}   (tools/compare.py)

A resample is a row of counts, not a list of indices: drawing image i twice is the same as weighting
it 2 (every metric here is a function of weighted counts), so one [B, n] matrix drives all metrics
without copying predictions. Where the samples carry patient ids, whole patients are drawn (their
images move together: a patient's images are correlated, so resampling images would understate the
spread). With W = ones([1, n]) `family_metrics` returns the point estimates of results.json (tested),
which is what makes predictions.npz a complete record.

Cost: AUROC is O(B n) after one sort; COCO mAP O(B K) per IoU threshold (K detections); rows are
processed in chunks so the [rows, n] work arrays stay in the tens of MB. 1,000 resamples of a few
thousand test images take seconds.
"""

from __future__ import annotations

import math

import numpy as np

from eval.metrics import coco_map, coco_matches
from eval.pairing import PER_IMAGE

N_RESAMPLES = 1000
CHUNK = 100  # bootstrap rows per vectorised block


def patient_groups(patient_ids) -> np.ndarray | None:
    """[n] group index per sample from the patient ids, or None when some sample has none
    (then images are resampled one by one)."""
    ids = np.asarray(patient_ids, dtype=str)
    if ids.size == 0 or (ids == "").any():
        return None
    return np.unique(ids, return_inverse=True)[1]


def resample_weights(
    n: int, groups: np.ndarray | None = None, n_resamples: int = N_RESAMPLES, seed: int = 0
) -> np.ndarray:
    """[B, n] float64 counts: each row draws len(unique groups) groups (or n images) uniformly with
    replacement, every image of a drawn group counting once per draw. Seeded: same seed, same rows."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples).astype(np.float64)
    groups = np.asarray(groups)
    n_groups = int(groups.max()) + 1
    drawn = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_resamples)  # [B, G]
    return drawn[:, groups].astype(np.float64)


def _chunks(W: np.ndarray):
    for start in range(0, W.shape[0], CHUNK):
        yield W[start : start + CHUNK]


# ---------------------------------------------------------------------------------------------
# weighted metrics: one value per row of W


def weighted_mean(x: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Mean of x over the samples where x is finite (nan = not scored), weighted by each row of W."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    num, den = W[:, ok] @ x[ok], W[:, ok].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, math.nan)


def weighted_auroc(y: np.ndarray, s: np.ndarray, W: np.ndarray) -> np.ndarray:
    """AUROC (Mann-Whitney, ties 1/2) per row of W; nan where a row has no positive or no negative."""
    y, s = np.asarray(y).astype(bool), np.asarray(s, dtype=np.float64)
    order = np.argsort(s, kind="stable")
    s_sorted, pos = s[order], y[order]
    start = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # run starts [R]
    end = np.r_[start[1:], s.size]  # exclusive
    run_of = np.repeat(np.arange(start.size), end - start)  # [n]
    out = []
    for w in _chunks(W):
        w = w[:, order]
        wn = np.where(pos, 0.0, w)
        wp = np.where(pos, w, 0.0)
        cum = np.cumsum(wn, axis=1)  # [b, n]
        below = np.where(start > 0, cum[:, np.maximum(start - 1, 0)], 0.0)  # [b, R] negatives under the run
        in_run = cum[:, end - 1] - below  # [b, R] negatives tied with it
        num = (wp * (below + 0.5 * in_run)[:, run_of]).sum(1)
        den = wp.sum(1) * wn.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(den > 0, num / den, math.nan))
    return np.concatenate(out)


def weighted_best_f1_accuracy(y: np.ndarray, s: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of W: (best F1 over the thresholds, accuracy of s > that threshold), the rule of
    eval.metrics.zero_shot_metrics (MedKLIP's float F1 2rp/(r+p) and its first maximum in ascending
    threshold order; strict > for the accuracy). Thresholds whose images were not drawn in a row
    are not candidates in that row."""
    y, s = np.asarray(y).astype(bool), np.asarray(s, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s_desc, pos = s[order], y[order]
    last = np.flatnonzero(np.r_[s_desc[1:] != s_desc[:-1], True])  # last index of each run [T]
    f1_out, acc_out = [], []
    for w in _chunks(W):
        w = w[:, order]
        tp = np.cumsum(np.where(pos, w, 0.0), axis=1)[:, last]  # [b, T] s >= t
        fp = np.cumsum(np.where(pos, 0.0, w), axis=1)[:, last]
        n_pos, total = tp[:, -1:], tp[:, -1:] + fp[:, -1:]
        run_weight = np.diff(np.c_[np.zeros(len(w)), tp + fp], axis=1)  # [b, T]
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = tp / (tp + fp)  # nan only before the first drawn threshold (masked below)
            recall = np.where(n_pos > 0, tp / n_pos, 0.0)
            denominator = recall + precision
            # the float formula and operation order of eval.metrics.precision_recall_f1_curve
            f1 = np.where(denominator > 0, 2 * recall * precision / denominator, 0.0)
        f1 = np.where(run_weight > 0, f1, -1.0)
        best = f1.shape[1] - 1 - np.argmax(f1[:, ::-1], axis=1)  # first maximum in ascending order
        rows = np.arange(len(w))
        tp_above = np.where(best > 0, tp[rows, np.maximum(best - 1, 0)], 0.0)  # strictly above t
        fp_above = np.where(best > 0, fp[rows, np.maximum(best - 1, 0)], 0.0)
        neg = total[:, 0] - n_pos[:, 0]
        f1_out.append(f1[rows, best])
        with np.errstate(invalid="ignore", divide="ignore"):
            acc_out.append((tp_above + neg - fp_above) / total[:, 0])
    return np.concatenate(f1_out), np.concatenate(acc_out)


def _macro(per_class: dict[str, np.ndarray]) -> np.ndarray:
    """Mean over the classes defined in each row (nan classes left out, as eval.metrics.macro_auroc)."""
    stacked = np.stack(list(per_class.values()), axis=1)  # [B, C]
    defined = np.isfinite(stacked)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(defined, stacked, 0.0).sum(1) / defined.sum(1)


# ---------------------------------------------------------------------------------------------
# per family: the metrics of results.json from predictions.npz


def _classification(p: dict, W: np.ndarray) -> dict[str, np.ndarray]:
    names = [str(n) for n in p["names"]]
    scores = np.asarray(p["scores"], dtype=np.float64)
    if str(p["kind"]) == "multiclass":
        target = np.asarray(p["targets"]).astype(np.int64)
        onehot = np.eye(len(names), dtype=np.int64)[target]
        per = {f"auroc_ovr_per_class.{n}": weighted_auroc(onehot[:, c], scores[:, c], W) for c, n in enumerate(names)}
        correct = (scores.argmax(1) == target).astype(np.float64)
        return {"accuracy": weighted_mean(correct, W), "auroc_ovr": _macro(per), **per}
    target = np.asarray(p["targets"]).astype(np.int64)
    per = {f"auroc_per_class.{n}": weighted_auroc(target[:, c], scores[:, c], W) for c, n in enumerate(names)}
    return {"auroc": _macro(per), **per}


def _zeroshot(p: dict, W: np.ndarray) -> dict[str, np.ndarray]:
    names = [str(n) for n in p["names"]]
    target, scores = np.asarray(p["targets"]).astype(np.int64), np.asarray(p["scores"], dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for c, n in enumerate(names):
        out[f"per_class.{n}.auc"] = weighted_auroc(target[:, c], scores[:, c], W)
        out[f"per_class.{n}.f1"], out[f"per_class.{n}.acc"] = weighted_best_f1_accuracy(target[:, c], scores[:, c], W)
    for m in ("auc", "f1", "acc"):
        out[m] = _macro({n: out[f"per_class.{n}.{m}"] for n in names})
    return out


def _segmentation(p: dict, W: np.ndarray) -> dict[str, np.ndarray]:
    dice, iou, positive = (np.asarray(p[k], dtype=np.float64) for k in ("dice", "iou", "positive"))
    return {
        "dice": weighted_mean(dice, W),
        "iou": weighted_mean(iou, W),
        "dice_positive": weighted_mean(np.where(positive > 0, dice, math.nan), W),
        "dice_negative_images": weighted_mean(np.where(positive > 0, math.nan, dice), W),
    }


def _grounding(p: dict, W: np.ndarray) -> dict[str, np.ndarray]:
    # pointing_chance, pointing_attn_value, pointing_projector: absent in older runs
    keys = ("pointing", "pointing_cell", "pointing_chance", "pointing_attn_value", "pointing_projector", "iou", "dice")
    return {k: weighted_mean(p[k], W) for k in (*keys, "medklip_iou", "medklip_dice") if k in p}


def detection_lists(p: dict) -> tuple[list, list, list]:
    """predictions.npz's flat detection arrays -> per-image (boxes, scores, ground truth) lists."""
    n = len(p["keys"])
    pred_image, gt_image = np.asarray(p["pred_image"]), np.asarray(p["gt_image"])
    boxes = [np.asarray(p["pred_boxes"])[pred_image == i] for i in range(n)]
    scores = [np.asarray(p["pred_scores"])[pred_image == i] for i in range(n)]
    gts = [np.asarray(p["gt_boxes"])[gt_image == i] for i in range(n)]
    return boxes, scores, gts


def _detection(p: dict, W: np.ndarray) -> dict[str, np.ndarray]:
    boxes, scores, gts = detection_lists(p)
    thresholds = [float(t) for t in p["iou_thresholds"]]
    out = {}
    for name, skip in (("map_mgca", "mgca"), ("map_all_images", "none")):
        ap = coco_map(coco_matches(boxes, scores, gts, thresholds, skip), W)  # [B, T]
        with np.errstate(invalid="ignore"):
            out[name] = ap.mean(axis=1)
        for i, t in enumerate(thresholds):
            out[f"{name}_per_threshold.{round(t, 4)}"] = ap[:, i]
    return out


FAMILY_METRICS = {
    "linear": _classification,
    "finetune": _classification,
    "zeroshot_cls": _zeroshot,
    "segmentation": _segmentation,
    "grounding": _grounding,
    "detection": _detection,
}


def family_metrics(family: str, predictions: dict, W: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{metric: [B]} for each row of W (None: the point estimates, B = 1)."""
    if family not in FAMILY_METRICS:
        raise ValueError(f"no bootstrap metrics for task family {family!r}")
    n = len(predictions["keys"])
    return FAMILY_METRICS[family](predictions, np.ones((1, n)) if W is None else W)


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> list[float] | None:
    """[low, high] percentile interval over the finite samples (a resample where the metric is
    undefined, e.g. no positive drawn, is left out); None if none is finite."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return [float(low), float(high)]


def weights_for(predictions: dict, n_resamples: int, seed: int) -> np.ndarray:
    return resample_weights(
        len(predictions["keys"]), patient_groups(predictions.get("patient_ids", [])), n_resamples, seed
    )


def confidence_intervals(
    family: str, predictions: dict, seed: int = 0, n_resamples: int = N_RESAMPLES
) -> dict[str, list[float] | None]:
    """{metric: [low, high]} 95% bootstrap percentile intervals, resampling patients where ids exist."""
    samples = family_metrics(family, predictions, weights_for(predictions, n_resamples, seed))
    return {k: percentile_ci(v) for k, v in samples.items()}


def align(pred_a: dict, pred_b: dict) -> dict:
    """pred_b reordered to pred_a's sample order (paired comparison needs the same test images)."""
    keys_a, keys_b = [str(k) for k in pred_a["keys"]], [str(k) for k in pred_b["keys"]]
    if sorted(keys_a) != sorted(keys_b):
        only_a, only_b = sorted(set(keys_a) - set(keys_b)), sorted(set(keys_b) - set(keys_a))
        raise ValueError(
            f"the two runs were not scored on the same test images: {len(only_a)} only in A "
            f"(e.g. {only_a[:3]}), {len(only_b)} only in B (e.g. {only_b[:3]})"
        )
    if keys_a == keys_b:
        return pred_b
    pos_a, pos_b = {k: i for i, k in enumerate(keys_a)}, {k: i for i, k in enumerate(keys_b)}
    index = np.array([pos_b[k] for k in keys_a])  # A's order, as positions in B
    per_image = {"keys", *PER_IMAGE}
    out = {k: (np.asarray(v)[index] if k in per_image else v) for k, v in pred_b.items()}
    if "pred_image" in pred_b:  # detection: boxes name their image by number
        renumber = np.array([pos_a[k] for k in keys_b])
        out["pred_image"] = renumber[np.asarray(pred_b["pred_image"], dtype=np.int64)]
        out["gt_image"] = renumber[np.asarray(pred_b["gt_image"], dtype=np.int64)]
    return out


def paired_difference(
    family: str, pred_a: dict, pred_b: dict, seed: int = 0, n_resamples: int = N_RESAMPLES
) -> dict[str, dict]:
    """B - A for every metric, with a 95% paired-bootstrap interval: both runs are rescored on the
    SAME resamples of the test images (patients), so the image-to-image variation they share cancels.
    Returns {metric: {a, b, diff, ci95: [low, high] | None, p_b_better: fraction of resamples with B > A}}."""
    pred_b = align(pred_a, pred_b)
    W = weights_for(pred_a, n_resamples, seed)
    point_a, point_b = family_metrics(family, pred_a), family_metrics(family, pred_b)
    boot_a, boot_b = family_metrics(family, pred_a, W), family_metrics(family, pred_b, W)
    out = {}
    for k in point_a:
        diff = boot_b[k] - boot_a[k]
        finite = np.isfinite(diff)
        out[k] = {
            "a": float(point_a[k][0]),
            "b": float(point_b[k][0]),
            "diff": float(point_b[k][0] - point_a[k][0]),
            "ci95": percentile_ci(diff),
            "p_b_better": float((diff[finite] > 0).mean()) if finite.any() else math.nan,
        }
    return out
