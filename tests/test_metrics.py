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
    """Oracle: F1 over scikit-learn's ascending PR curve; among (near-)equal maxima the first one, i.e.
    the lowest threshold (the argmax MedKLIP takes, made robust to rounding of 2PR/(P+R))."""
    p, r, t = skm.precision_recall_curve(y, s)
    p, r = p[:-1], r[:-1]  # the appended (1, 0) end point has no threshold
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)[0]
    return f1[best], t[best]


@pytest.mark.parametrize("seed", SEEDS)
def test_best_f1_and_curve_match_sklearn(seed):
    y, s = tied_binary(seed)
    f1, t = M.best_f1(y, s)
    sk_f1, sk_t = sklearn_best_f1(y, s)
    assert f1 == pytest.approx(sk_f1, abs=1e-12)
    assert t == sk_t
    assert f1 == pytest.approx(skm.f1_score(y, s >= t), abs=1e-12)
    precision, recall, f1_curve, thresholds = M.precision_recall_f1_curve(y, s)
    sk_p, sk_r, sk_t_all = skm.precision_recall_curve(y, s)
    np.testing.assert_array_equal(thresholds, sk_t_all[::-1])
    np.testing.assert_allclose(precision, sk_p[:-1][::-1], atol=1e-12)
    np.testing.assert_allclose(recall, sk_r[:-1][::-1], atol=1e-12)
    assert M.accuracy_at_threshold(y, s, t) == pytest.approx(skm.accuracy_score(y, s >= t))


def test_best_f1_tie_takes_lowest_threshold():
    # t=0.9: TP 1, FP 0 -> F1 = 2/(1+0+2) = 2/3; t=0.5: TP 2, FP 2 -> 4/(2+2+2) = 2/3; t=0.1: 4/(2+3+2)
    y, s = [1, 0, 0, 1, 0], [0.9, 0.5, 0.5, 0.5, 0.1]
    assert M.best_f1(y, s) == (pytest.approx(2 / 3), 0.5)
    # at 0.5: predictions 1,1,1,1,0 vs labels 1,0,0,1,0 -> 3 of 5 right
    assert M.accuracy_at_threshold(y, s, 0.5) == pytest.approx(3 / 5)


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
        assert out["acc_per_class"][c] == pytest.approx(skm.accuracy_score(Y[:, c], S[:, c] >= t))
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
    probs = torch.tensor([[[0.5, 0.2], [0.1, 0.0]],    # 0.5 is not > 0.5: empty prediction, empty gt -> 1
                          [[0.9, 0.6], [0.4, 0.0]]])   # predicts 2 pixels, gt 1 of them -> Dice 2/3, IoU 1/2
    targets = torch.tensor([[[0, 0], [0, 0]], [[1, 0], [0, 0]]])
    out = M.segmentation_summary(probs, targets)
    assert out["dice"] == pytest.approx((1 + 2 / 3) / 2)
    assert out["dice_positive"] == pytest.approx(2 / 3)
    assert out["iou"] == pytest.approx((1 + 1 / 2) / 2)
    assert (out["n_images"], out["n_positive"]) == (2, 1)


def test_pointing_game_hits_misses_and_ties():
    heat = torch.tensor([[[0, 0, 0], [0, 9, 0], [0, 0, 0]],   # peak (1,1) inside -> hit
                         [[0, 0, 9], [0, 0, 0], [0, 0, 0]],   # peak (0,2) outside -> miss
                         [[1, 1, 1], [1, 1, 1], [1, 1, 1]],   # all tied -> first pixel (0,0), inside -> hit
                         [[5, 0, 0], [0, 0, 0], [0, 0, 5]]],  # tie (0,0)/(2,2) -> (0,0), gt at (2,2) -> miss
                        dtype=torch.float32)
    gt = torch.zeros(4, 3, 3, dtype=torch.bool)
    gt[0, 1, 1] = gt[1, 2, 2] = gt[2, 0, 0] = gt[3, 2, 2] = True
    assert M.pointing_game(heat, gt) == pytest.approx(0.5)


def test_grounding_summary_positive_only_and_medklip_rule():
    heat = torch.tensor([[[0.010, 0.009], [0.000, -0.010]],   # positive, gt at (0,0)
                         [[0.020, 0.000], [0.000, 0.000]]])   # normal image (empty mask): dropped
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
    b = torch.tensor([[0.0, 0, 2, 2],   # identical to a0
                      [1, 0, 3, 2],     # a0: overlap 1x2=2, union 4+4-2=6 -> 1/3
                      [1, 1, 3, 3],     # inside a1: 4/16
                      [2, 0, 4, 2],     # touches a0's edge -> 0
                      [5, 5, 5, 5]])    # zero-area box -> 0
    expected = torch.tensor([[1.0, 1 / 3, 1 / 7, 0, 0],
                             [4 / 16, 4 / 16, 4 / 16, 4 / 16, 0]])
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


# Hand-worked case (IoUs chosen off the threshold grid so no comparison sits on an edge):
#   image A: gt G1 = (0,0,100,100); P1 = (0,0,100,72) score 0.9, IoU 0.72; P2 = G1 itself, score 0.6, IoU 1
#   image B: gt G2 = (200,200,300,300); P3 = (200,200,300,252) score 0.8, IoU 0.52
#   ranking P1, P3, P2; 2 ground-truth boxes.
#   t in 0.40..0.50: P1 TP, P3 TP, P2 FP (G1 taken)  -> precision 1, 1, 2/3 at recall .5, 1, 1 -> AP 1
#   t in 0.55..0.70: P1 TP, P3 FP, P2 FP (G1 taken)  -> recall .5 reached at precision 1       -> AP 1/2
#   t = 0.75:        P1 FP, P3 FP, P2 TP (G1 free)   -> recall .5 reached at precision 1/3     -> AP 1/6
#   mAP = (3 * 1 + 4 * 1/2 + 1/6) / 8 = 31/48
# Add normal image C (no gt) with P4 = (0,0,50,50) score 0.85, ranked second:
#   t <= 0.50: TP, FP, TP, FP -> precision 1, 1/2, 2/3, 1/2 at recall .5, .5, 1, 1;
#              envelope 1 up to recall .5, 2/3 up to 1                                  -> AP 1/2 + 1/3 = 5/6
#   t in 0.55..0.70: first prediction TP at recall .5 with precision 1                  -> AP 1/2
#   t = 0.75: P2 is the 4th prediction, TP: precision 1/4 at recall .5                  -> AP 1/8
#   mAP = (3 * 5/6 + 4 * 1/2 + 1/8) / 8 = 37/64 when C is scored; 31/48 when it is skipped.
A_GT = [[0.0, 0, 100, 100]]
A_PRED, A_SCORES = [[0.0, 0, 100, 72], [0, 0, 100, 100]], [0.9, 0.6]
B_GT = [[200.0, 200, 300, 300]]
B_PRED, B_SCORES = [[200.0, 200, 300, 252]], [0.8]
C_PRED, C_SCORES = [[0.0, 0, 50, 50]], [0.85]
NO_BOXES = torch.zeros(0, 4)


def test_map_hand_example():
    out = M.map_over_thresholds([A_PRED, B_PRED], [A_SCORES, B_SCORES], [A_GT, B_GT])
    expected = {0.4: 1, 0.45: 1, 0.5: 1, 0.55: 0.5, 0.6: 0.5, 0.65: 0.5, 0.7: 0.5, 0.75: 1 / 6}
    assert out["per_threshold"] == pytest.approx(expected)
    assert out["map"] == pytest.approx(31 / 48)
    assert M.average_precision([A_PRED, B_PRED], [A_SCORES, B_SCORES], [A_GT, B_GT], 0.75) == pytest.approx(1 / 6)


def test_map_normal_image_false_positive_depends_on_skip_flag():
    preds, scores, gts = [A_PRED, B_PRED, C_PRED], [A_SCORES, B_SCORES, C_SCORES], [A_GT, B_GT, NO_BOXES]
    counted = M.map_over_thresholds(preds, scores, gts)
    assert counted["per_threshold"][0.5] == pytest.approx(5 / 6)
    assert counted["per_threshold"][0.75] == pytest.approx(1 / 8)
    assert counted["map"] == pytest.approx(37 / 64)
    skipped = M.map_over_thresholds(preds, scores, gts, skip_images_without_gt=True)
    assert skipped["map"] == pytest.approx(31 / 48)


def test_map_image_without_predictions_counts_misses_unless_skipped():
    # Image D has a ground-truth box and no prediction: 3 gt boxes, so at t=0.5 recall tops out at 2/3
    # (precision 1 all the way) -> AP 2/3.
    preds, scores = [A_PRED, B_PRED, NO_BOXES], [A_SCORES, B_SCORES, []]
    gts = [A_GT, B_GT, [[10.0, 10, 20, 20]]]
    assert M.average_precision(preds, scores, gts, 0.5) == pytest.approx(2 / 3)
    assert M.average_precision(preds, scores, gts, 0.5, skip_images_without_predictions=True) == pytest.approx(1)
    assert M.average_precision([NO_BOXES], [[]], [A_GT], 0.5) == 0.0
    assert math.isnan(M.average_precision([C_PRED], [C_SCORES], [NO_BOXES], 0.5))
    with pytest.raises(ValueError, match="one entry per image"):
        M.average_precision([A_PRED], [A_SCORES, B_SCORES], [A_GT], 0.5)


def test_matching_falls_back_to_the_best_free_ground_truth():
    # One image, gts Ga = (0,0,100,100), Gb = (0,50,100,150). Q1 = Ga (score .9) takes Ga.
    # Q2 = (0,10,100,110) (score .8): IoU with Ga 9000/11000 = .82 (taken), with Gb 6000/14000 = .43.
    # At t = 0.4 Q2 matches Gb -> 2 TP, AP 1; at t = 0.5 Q2 is a FP -> recall 1/2 at precision 1, AP 1/2.
    preds, scores = [[[0.0, 0, 100, 100], [0, 10, 100, 110]]], [[0.9, 0.8]]
    gts = [[[0.0, 0, 100, 100], [0, 50, 100, 150]]]
    assert M.average_precision(preds, scores, gts, 0.4) == pytest.approx(1.0)
    assert M.average_precision(preds, scores, gts, 0.5) == pytest.approx(0.5)
