"""eval.metrics against scikit-learn / torchvision on random inputs, and on hand-worked tiny cases."""

import math

import numpy as np
import pytest
import torch
import torchvision
from sklearn import metrics as skm

from eval import metrics as M

SEEDS = [0, 1, 2, 3, 4]


def tied_binary(seed: int, n: int = 300):
    """Labels with a class imbalance and scores on a coarse grid, so many scores tie."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    s = np.round(rng.random(n) + 0.4 * y, 1)
    return y, s


# ---------------------------------------------------------------------------------------------------
# classification


@pytest.mark.parametrize("seed", SEEDS)
def test_roc_auc_and_curve_match_sklearn_with_ties(seed):
    y, s = tied_binary(seed)
    assert len(np.unique(s)) < len(s) // 5  # the case really has ties
    assert M.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, thr = M.roc_curve(y, s)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    np.testing.assert_array_equal(thr, sk_thr)
    # Average ranks and the trapezoid under the curve are the same number.
    assert M.roc_auc(y, s) == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-12)


def test_roc_auc_hand_example_and_torch_input():
    # positives 0.8, 0.5; negatives 0.5, 0.2: pairs (0.8>0.5) 1, (0.8>0.2) 1, (0.5=0.5) 1/2, (0.5>0.2) 1
    y, s = [1, 1, 0, 0], [0.8, 0.5, 0.5, 0.2]
    assert M.roc_auc(y, s) == pytest.approx(3.5 / 4)
    assert M.roc_auc(torch.tensor(y), torch.tensor(s)) == pytest.approx(3.5 / 4)
    with pytest.raises(ValueError, match="both labels"):
        M.roc_auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0/1"):
        M.roc_auc([0, 2], [0.1, 0.2])


def test_macro_auroc_skips_single_label_class():
    rng = np.random.default_rng(0)
    Y = (rng.random((200, 4)) < 0.4).astype(int)
    S = np.round(rng.random((200, 4)) + 0.3 * Y, 2)
    Y[:, 2] = 0  # no positives: AUROC undefined
    macro, per_class = M.macro_auroc(Y, S)
    assert math.isnan(per_class[2])
    defined = [0, 1, 3]
    for c in defined:
        assert per_class[c] == pytest.approx(skm.roc_auc_score(Y[:, c], S[:, c]), abs=1e-12)
    assert macro == pytest.approx(np.mean([per_class[c] for c in defined]))


def sklearn_best_f1(y, s):
    """Oracle: MedKLIP's rule, F1 = 2PR/(P+R) in float over scikit-learn's ascending PR curve and
    numpy's argmax (the first maximum: the lowest of float-equal thresholds; exact-arithmetic ties are
    decided by rounding, tests/test_reference_exact.py)."""
    p, r, t = skm.precision_recall_curve(y, s)
    p, r = p[:-1], r[:-1]  # the appended (1, 0) end point has no threshold
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    best = int(np.argmax(f1))
    return f1[best], t[best]


@pytest.mark.parametrize("seed", SEEDS)
def test_best_f1_and_curve_match_sklearn(seed):
    y, s = tied_binary(seed)
    f1, t = M.best_f1(y, s)
    sk_f1, sk_t = sklearn_best_f1(y, s)
    assert f1 == sk_f1 and t == sk_t
    assert f1 == pytest.approx(skm.f1_score(y, s >= t), abs=1e-12)
    precision, recall, f1_curve, thresholds = M.precision_recall_f1_curve(y, s)
    sk_p, sk_r, sk_t_all = skm.precision_recall_curve(y, s)
    np.testing.assert_array_equal(thresholds, sk_t_all[::-1])
    np.testing.assert_allclose(precision, sk_p[:-1][::-1], atol=1e-12)
    np.testing.assert_allclose(recall, sk_r[:-1][::-1], atol=1e-12)
    assert M.accuracy_at_threshold(y, s, t) == pytest.approx(skm.accuracy_score(y, s > t))


def test_best_f1_float_equal_tie_takes_lowest_threshold():
    # t=0.9: TP 1, FP 0 -> F1 = 2/(1+0+2) = 2/3; t=0.5: TP 2, FP 2 -> 4/(2+2+2) = 2/3; t=0.1: 4/(2+3+2).
    # In float both 2/3 are 0.6666666666666666 (p=1, r=.5 and p=.5, r=1: the same 1/1.5), so numpy's
    # argmax over ascending thresholds takes the lower one.
    y, s = [1, 0, 0, 1, 0], [0.9, 0.5, 0.5, 0.5, 0.1]
    assert M.best_f1(y, s) == (pytest.approx(2 / 3), 0.5)
    # strict > 0.5 (MedKLIP): predictions 1,0,0,0,0 vs labels 1,0,0,1,0 -> 4 of 5 right (>= would give 3)
    assert M.accuracy_at_threshold(y, s, 0.5) == pytest.approx(4 / 5)


@pytest.mark.parametrize("seed", SEEDS)
def test_zero_shot_accuracy_is_medklips_formula(seed):
    # MedKLIP/KAD's test script, re-done with scikit-learn: F1 over precision_recall_curve, its argmax
    # threshold, then accuracy of pred > threshold.
    y, s = tied_binary(seed, 60)
    p, r, t = skm.precision_recall_curve(y, s)
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) != 0)
    threshold = t[np.argmax(f1)]
    out = M.zero_shot_metrics(y[:, None], s[:, None])
    assert out["f1"] == pytest.approx(np.max(f1), abs=1e-12)
    assert out["threshold_per_class"][0] == threshold
    assert out["acc"] == pytest.approx(np.mean((s > threshold) == y), abs=1e-12)


def test_zero_shot_metrics_per_class_and_macro():
    rng = np.random.default_rng(7)
    Y = (rng.random((150, 3)) < 0.3).astype(int)
    S = np.round(rng.random((150, 3)) + 0.5 * Y, 1)
    Y[:, 1] = 1  # all positive: AUROC nan, F1/accuracy still defined
    out = M.zero_shot_metrics(Y, S)
    assert math.isnan(out["auc_per_class"][1])
    assert out["auc"] == pytest.approx(np.mean([skm.roc_auc_score(Y[:, c], S[:, c]) for c in (0, 2)]))
    for c in range(3):
        f1, t = sklearn_best_f1(Y[:, c], S[:, c])
        assert out["f1_per_class"][c] == pytest.approx(f1, abs=1e-12)
        assert out["threshold_per_class"][c] == t
        assert out["acc_per_class"][c] == pytest.approx(skm.accuracy_score(Y[:, c], S[:, c] > t))
    assert out["f1"] == pytest.approx(np.mean(out["f1_per_class"]))
    assert out["acc"] == pytest.approx(np.mean(out["acc_per_class"]))


def test_multiclass_accuracy_first_argmax_on_ties():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 3.0], [1.0, 1.0, 5.0], [0.0, 0.0, 0.0]])
    # argmax: 0, 1 (tie 1/2 -> first), 2, 0 (all tied -> first); labels 0, 2, 2, 0 -> 3/4 correct
    assert M.multiclass_accuracy([0, 2, 2, 0], logits) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="class indices"):
        M.multiclass_accuracy([0, 3, 2, 0], logits)


# ---------------------------------------------------------------------------------------------------
# segmentation and grounding


def masks(*rows_per_image):
    return torch.tensor(rows_per_image, dtype=torch.bool)


def test_dice_and_iou_with_empty_masks():
    empty = [[0, 0], [0, 0]]
    pred = masks(empty, [[1, 0], [0, 0]], empty, [[1, 1], [0, 0]])
    gt = masks(empty, empty, [[1, 0], [0, 0]], [[0, 1], [0, 1]])
    # image 0: both empty -> 1; image 1: gt empty, pred not -> 0; image 2: pred empty -> 0;
    # image 3: |P|=2, |T|=2, overlap 1 -> Dice 2*1/4 = 0.5, IoU 1/3.
    np.testing.assert_allclose(M.dice_score(pred, gt).numpy(), [1.0, 0.0, 0.0, 0.5])
    np.testing.assert_allclose(M.iou_score(pred, gt).numpy(), [1.0, 0.0, 0.0, 1 / 3])
    no_rule = M.dice_score(pred, gt, empty_rule=False).numpy()
    assert math.isnan(no_rule[0])
    np.testing.assert_allclose(no_rule[1:], [0.0, 0.0, 0.5])
    assert M.dice_positive_only(pred, gt) == pytest.approx(0.25)  # images 2 and 3
    assert math.isnan(M.dice_positive_only(pred[:2], gt[:2]))
    with pytest.raises(ValueError, match="binary"):
        M.dice_score(pred.float() * 0.7, gt)


def test_segmentation_summary_thresholds_strictly():
    probs = torch.tensor(
        [
            [[0.5, 0.2], [0.1, 0.0]],  # 0.5 is not > 0.5: empty prediction, empty gt -> 1
            [[0.9, 0.6], [0.4, 0.0]],
        ]
    )  # predicts 2 pixels, gt 1 of them -> Dice 2/3, IoU 1/2
    targets = torch.tensor([[[0, 0], [0, 0]], [[1, 0], [0, 0]]])
    out = M.segmentation_summary(probs, targets)
    assert out["dice"] == pytest.approx((1 + 2 / 3) / 2)
    assert out["dice_positive"] == pytest.approx(2 / 3)
    assert out["iou"] == pytest.approx((1 + 1 / 2) / 2)
    assert (out["n_images"], out["n_positive"]) == (2, 1)


def test_pointing_game_hits_misses_and_ties():
    heat = torch.tensor(
        [
            [[0, 0, 0], [0, 9, 0], [0, 0, 0]],  # peak (1,1) inside -> hit
            [[0, 0, 9], [0, 0, 0], [0, 0, 0]],  # peak (0,2) outside -> miss
            [[1, 1, 1], [1, 1, 1], [1, 1, 1]],  # all tied -> first pixel (0,0), inside -> hit
            [[5, 0, 0], [0, 0, 0], [0, 0, 5]],
        ],  # tie (0,0)/(2,2) -> (0,0), gt at (2,2) -> miss
        dtype=torch.float32,
    )
    gt = torch.zeros(4, 3, 3, dtype=torch.bool)
    gt[0, 1, 1] = gt[1, 2, 2] = gt[2, 0, 0] = gt[3, 2, 2] = True
    assert M.pointing_game(heat, gt) == pytest.approx(0.5)


def test_grounding_summary_positive_only_and_medklip_rule():
    heat = torch.tensor(
        [
            [[0.010, 0.009], [0.000, -0.010]],  # positive, gt at (0,0)
            [[0.020, 0.000], [0.000, 0.000]],
        ]
    )  # normal image (empty mask): dropped
    gt = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]])
    # MedKLIP: raw > 0.008 -> pixels (0,0), (0,1); gt (0,0): IoU 1/2, Dice 2/3; argmax (0,0) -> hit.
    medklip = M.grounding_summary(heat, gt, **M.MEDKLIP_GROUNDING)
    assert medklip == pytest.approx({"pointing": 1.0, "iou": 0.5, "dice": 2 / 3, "n_images": 1})
    # Min-max to [0, 1]: (0.010, 0.009, 0, -0.01) -> (1, 0.95, 0.5, 0); > 0.96 keeps only (0,0).
    normed = M.grounding_summary(heat, gt, threshold=0.96)
    assert normed == pytest.approx({"pointing": 1.0, "iou": 1.0, "dice": 1.0, "n_images": 1})
    none = M.grounding_summary(heat[1:], gt[1:])
    assert none["n_images"] == 0 and math.isnan(none["pointing"])


# ---------------------------------------------------------------------------------------------------
# detection


def test_box_iou_hand_cases():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 4, 4]])
    b = torch.tensor(
        [
            [0.0, 0, 2, 2],  # identical to a0
            [1, 0, 3, 2],  # a0: overlap 1x2=2, union 4+4-2=6 -> 1/3
            [1, 1, 3, 3],  # inside a1: 4/16
            [2, 0, 4, 2],  # touches a0's edge -> 0
            [5, 5, 5, 5],
        ]
    )  # zero-area box -> 0
    expected = torch.tensor([[1.0, 1 / 3, 1 / 7, 0, 0], [4 / 16, 4 / 16, 4 / 16, 4 / 16, 0]])
    # a0 vs (1,1,3,3): overlap 1, union 4+4-1 = 7. a1 vs b0, b1, b3: each box (area 4) lies inside a1.
    torch.testing.assert_close(M.box_iou(a, b), expected)
    rng = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=rng) * 100
    boxes = torch.cat([xy, xy + torch.rand(20, 2, generator=rng) * 50 + 1], 1)
    torch.testing.assert_close(M.box_iou(boxes, boxes[:7]), torchvision.ops.box_iou(boxes, boxes[:7]))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_nms_matches_torchvision(seed, iou_threshold):
    rng = torch.Generator().manual_seed(seed)
    xy = torch.rand(200, 2, generator=rng) * 200
    boxes = torch.cat([xy, xy + torch.rand(200, 2, generator=rng) * 80 + 1], 1)
    scores = torch.rand(200, generator=rng)
    keep = M.nms(boxes, scores, iou_threshold)
    assert keep.dtype == torch.long
    torch.testing.assert_close(keep, torchvision.ops.nms(boxes, scores, iou_threshold))
    assert M.nms(boxes[:0], scores[:0], 0.5).numel() == 0


def _reference_coco_map(preds, scores, gts, thresholds, skip):
    """COCO 101-point mAP written from the definition (not from eval.metrics): per image the 100 best
    detections in score order each take the free ground truth of highest IoU >= t (ties: the later
    one); all detections ranked by score; interpolated precision at recall r = best precision at any
    recall >= r (0 if r is never reached); AP = mean over r in 0, 0.01, ..., 1."""
    aps = []
    for t in thresholds:
        dets, n_gt = [], 0
        for b, s, g in zip(preds, scores, gts):
            b = torch.as_tensor(b, dtype=torch.float64).reshape(-1, 4)
            g = torch.as_tensor(g, dtype=torch.float64).reshape(-1, 4)
            if skip == "mgca" and (len(s) == 0 or len(g) == 0):
                continue
            n_gt += len(g)
            iou = torchvision.ops.box_iou(b, g) if len(g) else torch.zeros(len(s), 0)
            used = set()
            for k in sorted(range(len(s)), key=lambda k: -s[k])[:100]:
                ok = [j for j in range(len(g)) if j not in used and iou[k, j] >= t]
                best = max(ok, key=lambda j: (float(iou[k, j]), j)) if ok else None
                if best is not None:
                    used.add(best)
                dets.append((s[k], best is not None))
        dets.sort(key=lambda d: -d[0])
        tp = np.cumsum([d[1] for d in dets])
        recall = tp / n_gt
        precision = tp / np.arange(1, len(dets) + 1)
        aps.append(
            np.mean(
                [max([p for p, r in zip(precision, recall) if r >= rt], default=0.0) for rt in np.linspace(0, 1, 101)]
            )
        )
    return float(np.mean(aps)), aps


def _random_detections(seed, n_images=24):
    rng = np.random.default_rng(seed)
    preds, scores, gts = [], [], []
    for _ in range(n_images):
        g = []
        for _ in range(rng.integers(0, 3)):
            x, y = rng.uniform(0, 150, 2)
            g.append([x, y, x + rng.uniform(10, 60), y + rng.uniform(10, 60)])
        p = []
        for box in g:  # near-hits of varying quality
            if rng.random() < 0.7:
                p.append(list(np.asarray(box) + rng.normal(0, 6, 4)))
        for _ in range(rng.integers(0, 3)):  # false positives
            x, y = rng.uniform(0, 150, 2)
            p.append([x, y, x + rng.uniform(10, 60), y + rng.uniform(10, 60)])
        preds.append(torch.tensor(p, dtype=torch.float32).reshape(-1, 4))
        scores.append(rng.uniform(0.5, 1.0, len(p)).astype(np.float32))
        gts.append(torch.tensor(g, dtype=torch.float32).reshape(-1, 4))
    return preds, scores, gts


@pytest.mark.parametrize("seed", SEEDS[:3])
@pytest.mark.parametrize("skip", ["mgca", "none"])
def test_map_torchmetrics_and_numpy_coco_match_reference(seed, skip):
    preds, scores, gts = _random_detections(seed)
    ref, ref_per_t = _reference_coco_map(preds, scores, gts, M.DEFAULT_IOU_THRESHOLDS, skip)
    tm = M.map_torchmetrics(preds, scores, gts, skip=skip)
    assert tm["map"] == pytest.approx(ref, abs=1e-6)
    assert list(tm["per_threshold"].values()) == pytest.approx(ref_per_t, abs=1e-6)
    # The numpy version (used by the bootstrap) gives the same number from its per-detection matches.
    ours = M.coco_map(M.coco_matches(preds, scores, gts, skip=skip))
    assert ours[0] == pytest.approx(ref_per_t, abs=1e-9)
    n_scored = sum(M.keep_image(len(s), len(g), skip) for s, g in zip(scores, gts))
    assert tm["n_images_scored"] == n_scored


def test_mgca_skip_rule_hand_case():
    gt = torch.tensor([[0.0, 0, 100, 100]])
    hit = torch.tensor([[0.0, 0, 100, 100]])
    empty = torch.zeros(0, 4)
    preds = [hit, empty, torch.tensor([[10.0, 10, 20, 20]])]
    scores = [[0.9], [], [0.8]]
    gts = [gt, gt, empty]  # image 2: no ground truth, one (false) box; image 1: ground truth, no box
    # MGCA: only image 0 is scored -> perfect.
    assert M.map_torchmetrics(preds, scores, gts, skip="mgca")["map"] == pytest.approx(1.0)
    # All images: recall stops at 1/2; the FP (0.8) ranks after the TP -> AP = 51 points of 101 at precision 1.
    every = M.map_torchmetrics(preds, scores, gts, skip="none")
    assert every["map"] == pytest.approx(51 / 101)
    assert every["n_images_scored"] == 3
    assert math.isnan(M.map_torchmetrics([empty], [[]], [gt], skip="mgca")["map"])


def test_coco_map_weights_equal_repeated_images():
    preds, scores, gts = _random_detections(11, 10)
    weights = np.array([[2, 0, 1, 3, 1, 0, 1, 1, 2, 1]])
    repeat = [i for i, w in enumerate(weights[0]) for _ in range(w)]
    repeated = M.coco_map(
        M.coco_matches([preds[i] for i in repeat], [scores[i] for i in repeat], [gts[i] for i in repeat])
    )
    weighted = M.coco_map(M.coco_matches(preds, scores, gts), weights)
    np.testing.assert_allclose(weighted, repeated, atol=1e-12)


def test_nms_plus_one_convention():
    # Two 10x10-pixel boxes (x2 - x1 = 9) shifted by 5: IoU 40/140 without +1, 50/150 with it.
    boxes = torch.tensor([[0.0, 0, 9, 9], [5, 0, 14, 9]])
    assert float(M.box_iou(boxes[:1], boxes[1:], plus_one=True)) == pytest.approx(50 / 150)
    assert M.nms(boxes, torch.tensor([0.9, 0.8]), 0.3, plus_one=True).tolist() == [0]
    assert M.nms(boxes, torch.tensor([0.9, 0.8]), 0.34).tolist() == [0, 1]


def test_pointing_game_at_the_peak_cell_not_the_image_edge():
    # A 4x4 feature grid over a 32x32 image: each cell is 8x8 px; cell (0, 0)'s centre is pixel (4, 4).
    grid = torch.zeros(3, 4, 4)
    grid[0, 0, 0] = 1.0  # peak in the top-left border cell
    grid[1, 3, 3] = 1.0  # peak in the bottom-right border cell
    grid[2, 1, 2] = 1.0  # interior peak, cell centre (row 12, col 20)
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[0, 2:7, 2:7] = True  # around cell (0,0)'s centre, not touching the image corner
    masks[1, 0:4, 0:4] = True  # the wrong corner -> miss
    masks[2, 12, 20] = True
    assert M.grid_peak_hits(grid, masks).tolist() == [True, False, True]
    # The old rule (argmax of the bilinearly upsampled map) lands on the corner pixel (0, 0): a miss.
    up = torch.nn.functional.interpolate(grid[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert M.pointing_game(up[:1], masks[:1]) == 0.0
    per = M.grounding_per_image(up, masks, grid_maps=grid)
    assert per["pointing"].tolist() == [1.0, 0.0, 1.0]
    # The lenient cell rule: a region inside the peak cell that misses its centre pixel still counts.
    masks[0] = False
    masks[0, 0:2, 6:8] = True  # in cell (0, 0) (pixels 0-7), away from its centre (4, 4)
    assert M.grid_peak_hits(grid[:1], masks[:1]).tolist() == [False]
    assert M.grid_peak_cell_overlaps(grid, masks).tolist() == [True, False, True]
    empty = torch.zeros(1, 32, 32, dtype=torch.bool)
    assert math.isnan(float(M.grounding_per_image(up[:1], empty, grid_maps=grid[:1])["pointing"][0]))


def test_pointing_chance_is_a_random_peak_cells_hit_rate():
    # Independent check: score every one of the 16 cells as the peak with grid_peak_hits and average.
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, 0:16, 0:16] = True  # the top-left quadrant: 4 of 16 cell centres
    masks[1, 4, 4] = True  # exactly one cell centre (cell (0, 0))
    masks[1, 0:3, 20:32] = True  # touches cells but no centre
    by_enumeration = torch.stack(
        [M.grid_peak_hits(torch.eye(16)[c].reshape(1, 4, 4).expand(2, 4, 4), masks).double() for c in range(16)]
    ).mean(0)
    assert M.grid_chance(masks, 4, 4).tolist() == by_enumeration.tolist() == [0.25, 1 / 16]
    per = M.grounding_per_image(masks.double(), masks, grid_maps=torch.zeros(2, 4, 4))
    assert per["pointing_chance"].tolist() == [0.25, 1 / 16]
    with pytest.raises(ValueError, match=r"must be \[N, H, W\]"):
        M.grid_chance(masks[0], 4, 4)


def test_retrieval_topk_ranks_each_images_own_report():
    # The one retrieval metric (validation, eval, bench-quality): pairs 0 and 1 cross-matched, so
    # each ranks its own report second (cos 0.45 behind 0.89); unrelated pairs score exactly 0.
    from eval.zeroshot import retrieval_topk

    image = torch.eye(8, 16)
    text = image.clone()
    text[0] = torch.nn.functional.normalize(image[1] + 0.5 * image[0], dim=0)
    text[1] = torch.nn.functional.normalize(image[0] + 0.5 * image[1], dim=0)
    assert retrieval_topk(image, text, ks=(1, 2, 5)) == {"top1": 6 / 8, "top2": 1.0, "top5": 1.0}
    # Ties count in the model's favour: identical reports all rank first.
    assert retrieval_topk(image, torch.ones(8, 16) / 4, ks=(1,)) == {"top1": 1.0}


def _greedy_nms_plus_one(boxes: list[list[float]], scores: list[float], threshold: float) -> list[int]:
    """Independent reference: pure-Python greedy NMS with pixel-inclusive (+1) widths."""

    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
        inter = iw * ih
        area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
        return inter / (area(a) + area(b) - inter)

    keep: list[int] = []
    for i in sorted(range(len(scores)), key=lambda k: -scores[k]):
        if all(iou(boxes[i], boxes[k]) <= threshold for k in keep):
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", SEEDS)
def test_torchvision_nms_with_shift_matches_plus_one_reference(seed):
    # Integer-pixel boxes of 1-12 px, where the +1 matters most; distinct scores (no tie order).
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, 30, (200, 2), generator=g).double()
    wh = torch.randint(0, 12, (200, 2), generator=g).double()
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.randperm(200, generator=g).double() / 200
    for threshold in (0.3, 0.5):
        want = _greedy_nms_plus_one(boxes.tolist(), scores.tolist(), threshold)
        assert M.nms(boxes, scores, threshold, plus_one=True).tolist() == want
