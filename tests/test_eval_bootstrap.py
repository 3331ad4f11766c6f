"""eval.bootstrap (weighted metrics = metrics of the resampled data set, patient resampling, paired
differences, speed) and eval.augment (MGCA's ShiftScaleRotate and MoCo-v2 colour part)."""

import math
import time

import numpy as np
import pytest
import torch

from eval import bootstrap as B
from eval import metrics as M
from eval.augment import moco_v2_colour, shift_scale_rotate


def tied(seed, n=200):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    return y, np.round(rng.random(n) + 0.5 * y, 1)  # coarse grid: many ties


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_metrics_equal_metrics_of_the_repeated_data(seed):
    y, s = tied(seed)
    W = np.random.default_rng(seed + 100).multinomial(len(y), np.full(len(y), 1 / len(y)), size=5).astype(float)
    auc = B.weighted_auroc(y, s, W)
    f1, acc = B.weighted_best_f1_accuracy(y, s, W)
    for r in range(W.shape[0]):
        idx = np.repeat(np.arange(len(y)), W[r].astype(int))  # the resample as an explicit list
        ref = M.zero_shot_metrics(y[idx, None], s[idx, None])
        assert auc[r] == pytest.approx(M.roc_auc(y[idx], s[idx]), abs=1e-12)
        assert f1[r] == pytest.approx(ref["f1"], abs=1e-12)
        assert acc[r] == pytest.approx(ref["acc"], abs=1e-12)  # strict > at the best-F1 threshold
    mean = B.weighted_mean(np.where(y == 1, s, np.nan), W)
    assert mean[0] == pytest.approx(np.average(s[y == 1], weights=W[0][y == 1]))


def test_family_metrics_point_estimates_match_eval_metrics():
    rng = np.random.default_rng(4)
    Y = (rng.random((80, 3)) < 0.4).astype(int)
    S = rng.random((80, 3)) + 0.3 * Y
    pred = {
        "keys": np.arange(80).astype(str),
        "patient_ids": np.array([""] * 80),
        "names": np.array(["a", "b", "c"]),
        "targets": Y,
        "scores": S,
        "kind": np.asarray("multilabel"),
    }
    zs, cls = B.family_metrics("zeroshot_cls", pred), B.family_metrics("linear", pred)
    ref = M.zero_shot_metrics(Y, S)
    assert [zs[k][0] for k in ("auc", "f1", "acc")] == pytest.approx([ref["auc"], ref["f1"], ref["acc"]], abs=1e-12)
    assert cls["auroc"][0] == pytest.approx(M.macro_auroc(Y, S)[0], abs=1e-12)
    labels = rng.integers(0, 3, 80)
    multi = {**pred, "kind": np.asarray("multiclass"), "targets": labels}
    assert B.family_metrics("linear", multi)["accuracy"][0] == pytest.approx(M.multiclass_accuracy(labels, S))


def test_resampling_draws_whole_patients_and_is_seeded():
    patients = np.array(["p1", "p1", "p2", "p3", "p3", "p3", "p4"])
    groups = B.patient_groups(patients)
    W = B.resample_weights(len(patients), groups, 500, seed=7)
    assert np.array_equal(W, B.resample_weights(len(patients), groups, 500, seed=7))
    for members in ([0, 1], [3, 4, 5]):  # a patient's images share their count
        assert (W[:, members] == W[:, members[:1]]).all()
    assert np.allclose(W[:, [0, 2, 3, 6]].sum(1), 4)  # 4 patients drawn per resample
    assert B.patient_groups(np.array(["p1", ""])) is None  # an unknown id: images are resampled
    assert (B.resample_weights(10, None, 50, 0).sum(1) == 10).all()


def test_interval_width_and_speed():
    rng = np.random.default_rng(0)
    n = 4000
    correct = (rng.random(n) < 0.7).astype(float)
    t0 = time.perf_counter()
    W = B.resample_weights(n, None, 1000, seed=1)
    ci = B.percentile_ci(B.weighted_mean(correct, W))
    y = (rng.random(n) < 0.2).astype(int)
    B.weighted_auroc(y, rng.random(n) + y, W)
    B.weighted_best_f1_accuracy(y, rng.random(n) + y, W)
    assert time.perf_counter() - t0 < 20  # seconds, not minutes (~2 s unloaded)
    half_width = 1.96 * math.sqrt(0.7 * 0.3 / n)  # the normal approximation of a proportion
    assert (ci[1] - ci[0]) / 2 == pytest.approx(half_width, rel=0.15)
    assert B.percentile_ci(np.array([np.nan, np.nan])) is None


def test_paired_difference_is_zero_for_the_same_run_and_sees_a_real_gain():
    rng = np.random.default_rng(3)
    n = 300
    y = (rng.random((n, 1)) < 0.4).astype(int)
    keys = np.array([f"k{i}" for i in range(n)])
    common = {
        "patient_ids": np.array([f"p{i // 2}" for i in range(n)]),
        "names": np.array(["x"]),
        "kind": np.asarray("binary"),
    }
    weak = {**common, "keys": keys, "targets": y, "scores": rng.random((n, 1)) + 0.2 * y}
    strong = {**common, "keys": keys, "targets": y, "scores": rng.random((n, 1)) + 1.5 * y}
    same = B.paired_difference("linear", weak, weak, seed=0)["auroc"]
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0]
    gain = B.paired_difference("linear", weak, strong, seed=0)["auroc"]
    assert gain["diff"] > 0 and gain["ci95"][0] > 0 and gain["p_b_better"] == 1.0
    order = rng.permutation(n)  # B stored in another order: aligned by key
    shuffled = {k: (v[order] if k in ("keys", "patient_ids", "targets", "scores") else v) for k, v in strong.items()}
    assert B.paired_difference("linear", weak, shuffled, seed=0)["auroc"] == gain
    with pytest.raises(ValueError, match="same test images"):
        B.paired_difference("linear", weak, {**strong, "keys": np.array([f"z{i}" for i in range(n)])})


def test_detection_bootstrap_reorders_images_by_key():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 8, 8]], dtype=float)
    pred = {
        "keys": np.array(["a", "b"]),
        "patient_ids": np.array(["", ""]),
        "pred_boxes": boxes[:2],
        "pred_scores": np.array([0.9, 0.8]),
        "pred_image": np.array([0, 1]),
        "gt_boxes": boxes[[2, 1]],
        "gt_image": np.array([0, 1]),
        "iou_thresholds": np.array([0.5, 0.75]),
    }
    flipped = {**pred, "keys": np.array(["b", "a"]), "pred_image": np.array([1, 0]), "gt_image": np.array([1, 0])}
    out = B.paired_difference("detection", pred, flipped, seed=0, n_resamples=50)
    assert out["map_mgca"]["diff"] == 0 and out["map_mgca"]["ci95"] == [0.0, 0.0]
    # IoU(a) = 64/100: a hit at 0.5 (AP 1); at 0.75 a ranks first as a miss, b (IoU 1) second: recall
    # 1/2 at precision 1/2 over 51 of the 101 recall points.
    assert out["map_mgca"]["a"] == pytest.approx((1 + 0.5 * 51 / 101) / 2)


# ---------------------------------------------------------------------------------------------------
# augmentations


def test_shift_scale_rotate_geometry_probability_and_mask():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(64, 1, 32, 32)
    mask[:, :, 8:24, 10:22] = 1
    image = mask * 2 - 1 + 0.0  # normalised (0.5/0.5): black = -1
    fill = torch.tensor([-1.0])
    same, same_mask = shift_scale_rotate(image, mask, fill, g, p=0.0)
    assert torch.equal(same, image) and torch.equal(same_mask, mask)
    out, out_mask = shift_scale_rotate(image, mask, fill, g, p=0.5)
    changed = (out != image).flatten(1).any(1)
    assert 16 <= int(changed.sum()) <= 48  # about half of 64 at p = 0.5
    assert set(out_mask.unique().tolist()) <= {0.0, 1.0}  # nearest: still a binary mask
    agree = ((out > 0) == (out_mask > 0.5)).float().mean()
    assert agree > 0.97  # image and mask warped together
    # A pure 10-degree rotation at scale 0.9 leaves the corners outside the source: filled black.
    full = torch.zeros(4, 1, 32, 32)
    rotated, _ = shift_scale_rotate(full, None, fill, g, p=1.0, scale_limit=0.1, rotate_limit=10)
    assert torch.all(rotated[:, :, 0, 0] <= -0.4)  # corner pixel mostly the fill value


def test_moco_v2_colour_is_seeded_bounded_and_changes_images():
    x = torch.rand(8, 1, 24, 24) * 2 - 1  # normalised with mean 0.5, std 0.5
    a = moco_v2_colour(x, [0.5], [0.5], torch.Generator().manual_seed(1))
    b = moco_v2_colour(x, [0.5], [0.5], torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape
    assert a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6  # stays inside [0, 1] before normalising
    assert (a != x).flatten(1).any(1).sum() >= 6  # jitter p .8 / blur .5 / flip .5: most change
    rgb = moco_v2_colour(x.repeat(1, 3, 1, 1), [0.5], [0.5], torch.Generator().manual_seed(2))
    assert rgb.shape == (8, 3, 24, 24)


# ---------------------------------------------------------------------------------------------------
# the training loop: selection on a validation score (detection's mAP) and the per-epoch progress bar


class _Batch:
    def __init__(self, x):
        self.image = x

    def __len__(self):  # samples in the batch, as pipeline.Batch and detection's FeatureBatch say
        return self.image.shape[0]


class _Loader:
    def __init__(self, n):
        self.batches = [_Batch(torch.full((2, 1), float(i))) for i in range(n)]

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return iter(self.batches)


def test_fit_selects_on_the_validation_score_and_shows_a_bar_per_epoch(monkeypatch):
    from eval.tasks import fit as fit_module
    from eval.tasks.base import TrainSection

    bars = []

    def fake_tqdm(iterable, total, desc, **kw):
        bars.append((total, desc, kw.get("disable", "missing")))
        return iterable

    monkeypatch.setattr(fit_module, "tqdm", fake_tqdm)
    head = torch.nn.Linear(1, 1)
    scores = iter([math.nan, 0.2, 0.5, 0.4, 0.5, 0.3, 0.9])  # best 0.5 at epoch 3; a tie later does not win
    weights_at = []

    def val_score():
        weights_at.append(head.weight.detach().clone())
        return next(scores)

    fitted = fit_module.fit(
        head,
        lambda b: head(b.image).pow(2).mean(),
        _Loader(3),
        _Loader(1),
        TrainSection(epochs=7, patience=3, lr=0.1, precision="fp32"),  # fit builds AdamW from it
        set_train_mode=head.train,
        device=torch.device("cpu"),
        log=lambda *_: None,
        val_score=val_score,
        score_name="map_mgca",
    )
    assert (fitted.best_epoch, fitted.epochs_run, fitted.best_val_score) == (2, 6, 0.5)  # stopped before 0.9
    assert torch.equal(head.weight, weights_at[2])  # best weights restored
    assert [h["val_map_mgca"] for h in fitted.history][1:] == [0.2, 0.5, 0.4, 0.5, 0.3]
    # One bar per epoch over its batches, with the epoch in its label; tqdm decides on a terminal.
    assert bars == [(3, f"epoch {e}/7", None) for e in range(1, 7)]
