"""Pseudo-mask collapse in the training health log: the mean IoU between different images' masks
(train.health.pairwise_mask_iou) on constructed masks, the warning rule, and the log step that
averages it over the window, writes it to metrics.jsonl and warns."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from tqdm import tqdm

from common.dist import DistInfo
from train.config import PretrainConfig
from train.health import MASK_COLLAPSE_IOU, HealthCheck, pairwise_mask_iou
from train.metrics_log import MetricsLog
from train.progress import Progress


def masks_from_boxes(boxes: list[tuple[int, int, int, int]], size: int = 16) -> torch.Tensor:
    """[(top, left, height, width)] -> [B,1,size,size] {0,1} float masks."""
    out = torch.zeros(len(boxes), 1, size, size)
    for i, (top, left, h, w) in enumerate(boxes):
        out[i, 0, top : top + h, left : left + w] = 1
    return out


def test_identical_masks_score_one_and_disjoint_masks_zero():
    assert pairwise_mask_iou(masks_from_boxes([(2, 3, 5, 4)] * 6)).item() == 1.0
    assert pairwise_mask_iou(masks_from_boxes([(0, 0, 4, 4), (4, 4, 4, 4), (8, 8, 4, 4)])).item() == 0.0
    # Two 4x4 boxes sharing a 4x2 strip: 8 / (16 + 16 - 8) = 1/3; a third box disjoint from both.
    three = masks_from_boxes([(0, 0, 4, 4), (0, 2, 4, 4), (10, 10, 4, 4)])
    assert pairwise_mask_iou(three).item() == pytest.approx((1 / 3 + 1 / 3) / 6)  # 6 ordered pairs
    assert pairwise_mask_iou(torch.zeros(3, 1, 8, 8)).item() == 1.0  # empty masks are all the same mask
    assert math.isnan(pairwise_mask_iou(masks_from_boxes([(0, 0, 4, 4)])).item())  # one image: no pair


def test_collapse_warning_rule():
    check = HealthCheck(math.log(32), after_step=50, loss_margin=0.03, min_spread=0.1, dim=128)
    assert check.max_mask_iou == MASK_COLLAPSE_IOU == 0.8
    learning = (60, math.log(32) * 0.9, 0.08, 0.08)
    (warning,) = check.problems(*learning, mask_iou=0.95)
    assert "pseudo masks collapsed" in warning and "0.950 > 0.8" in warning
    assert check.problems(*learning, mask_iou=0.5) == []
    assert check.problems(*learning, mask_iou=None) == []  # not measured
    assert check.problems(40, math.log(32) * 0.9, 0.08, 0.08, mask_iou=1.0) == []  # still warming up


@pytest.mark.parametrize("collapsed", [True, False])
def test_log_step_records_the_window_mean_iou_and_warns_on_collapse(collapsed, tmp_path, caplog):
    cfg = PretrainConfig()
    cfg.train.nonfinite = "stop"
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    log = MetricsLog(tmp_path / "metrics.jsonl", resume_step=0, enabled=True)
    health = HealthCheck(math.log(8), after_step=0, loss_margin=0.03, min_spread=0.1, dim=4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    progress = Progress(cfg, dist, log, health, tqdm(disable=True), scheduler, 8, 1e9, None)
    same = masks_from_boxes([(2, 2, 6, 6)] * 4)
    spread = masks_from_boxes([(0, 0, 4, 4), (4, 4, 4, 4), (8, 8, 4, 4), (12, 12, 4, 4)])
    window = [same, same, same] if collapsed else [same, spread, spread]  # IoU 1, 1, 1 | 1, 0, 0
    for step, masks in enumerate(window, start=1):
        progress.add(torch.cat([torch.tensor([1.0, 1.0, 0.5]), pairwise_mask_iou(masks)[None]]), step)
    emb = torch.eye(4)  # what flush reads of the step's G2DOutput: L2-normalised embeddings
    with caplog.at_level(logging.WARNING, logger="train"):
        record = progress.flush(3, 0, SimpleNamespace(image_emb=emb, text_emb=emb))
    assert record["pseudo_mask_iou"] == pytest.approx(1.0 if collapsed else 1 / 3)
    assert ("pseudo masks collapsed" in caplog.text) == collapsed
    assert any("pseudo masks collapsed" in p for p in record.get("health", [])) == collapsed
    log.close()
