"""VLA (InfoNCE) and pseudo-segmentation losses against hand computations; global negatives across
two real gloo processes against the single-process loss on the concatenated batch."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from common import dist as cdist
from model.losses import ContrastiveLoss, pseudo_seg_loss


def _hand_infonce(img: np.ndarray, txt: np.ndarray, t: float) -> tuple[float, float]:
    """(image->text, text->image) mean cross-entropies written out with loops."""
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    n = len(img)
    i2t = t2i = 0.0
    for i in range(n):
        row = [float(img[i] @ txt[j]) / t for j in range(n)]
        i2t += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        col = [float(txt[i] @ img[j]) / t for j in range(n)]
        t2i += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    return i2t / n, t2i / n


def test_infonce_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    i2t, t2i = _hand_infonce(img.double().numpy(), txt.double().numpy(), 0.07)
    mean_loss = ContrastiveLoss(0.07, reduction="mean")(img, txt)
    sum_loss = ContrastiveLoss(0.07, reduction="sum")(img, txt)
    assert mean_loss.item() == pytest.approx(0.5 * (i2t + t2i), rel=1e-5)
    assert sum_loss.item() == pytest.approx(i2t + t2i, rel=1e-5)
    # Scale of the inputs is irrelevant: embeddings are L2-normalised inside.
    assert ContrastiveLoss(0.07)(3 * img, 0.5 * txt).item() == pytest.approx(mean_loss.item(), rel=1e-5)


def test_perfect_alignment_gives_near_zero_loss_and_shuffled_pairs_do_not():
    emb = torch.eye(6, 16)  # orthogonal unit vectors: cos 1 with self, 0 with others
    loss = ContrastiveLoss(0.07)(emb, emb)
    assert loss.item() < 1e-4  # 5 * exp(-1/0.07) ~ 3e-6
    shuffled = ContrastiveLoss(0.07)(emb, emb.roll(1, dims=0))
    assert shuffled.item() > 10.0


def test_learnable_temperature_gets_gradient_and_fixed_one_is_not_a_parameter():
    fixed = ContrastiveLoss(0.07, learnable=False)
    assert list(fixed.parameters()) == []
    learn = ContrastiveLoss(0.07, learnable=True)
    assert learn.temperature().item() == pytest.approx(0.07, rel=1e-6)
    img, txt = torch.randn(5, 8), torch.randn(5, 8)
    learn(img, txt).backward()
    assert learn.log_temperature.grad is not None and learn.log_temperature.grad.abs().item() > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, world: int, port: int, out_dir: str, img: torch.Tensor, txt: torch.Tensor):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    info = cdist.init_distributed(backend="gloo")
    try:
        b = img.shape[0] // world
        local_img = img[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        local_txt = txt[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        loss = ContrastiveLoss(0.07, gather_negatives=True)(local_img, local_txt)
        loss.backward()
        local_only = ContrastiveLoss(0.07, gather_negatives=False)(local_img.detach(), local_txt.detach())
        mean_loss = cdist.all_reduce_mean(loss.detach())
        torch.save(
            {
                "info": (info.rank, info.world_size, info.local_rank, cdist.get_rank() == 0),
                "loss": loss.detach(),
                "mean_loss": mean_loss,
                "local_only": local_only,
                "img_grad": local_img.grad,
                "txt_grad": local_txt.grad,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        cdist.barrier()
    finally:
        cdist.cleanup()


def test_gathered_negatives_across_two_processes_match_the_concatenated_batch(tmp_path):
    world = 2
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    mp.spawn(_gather_worker, args=(world, _free_port(), str(tmp_path), img, txt), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    full_img, full_txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    full = ContrastiveLoss(0.07, gather_negatives=True)(full_img, full_txt)  # world size 1 here
    full.backward()

    assert [r["info"] for r in results] == [(0, 2, 0, True), (1, 2, 1, False)]
    per_rank = torch.stack([r["loss"] for r in results])
    assert per_rank.mean().item() == pytest.approx(full.item(), rel=1e-5)
    assert results[0]["mean_loss"].item() == pytest.approx(full.item(), rel=1e-5)
    # Global negatives change the loss (more negatives than the local 3).
    assert abs(results[0]["local_only"].item() - results[0]["loss"].item()) > 1e-3
    # Each rank's grad is d(sum of rank losses)/d(its rows) = world * d(mean loss)/d(rows);
    # DDP's gradient averaging divides that world back out.
    b = img.shape[0] // world
    for r, res in enumerate(results):
        rows = slice(r * b, (r + 1) * b)
        assert torch.allclose(res["img_grad"] / world, full_img.grad[rows], atol=1e-6)
        assert torch.allclose(res["txt_grad"] / world, full_txt.grad[rows], atol=1e-6)
        assert res["img_grad"].abs().sum() > 0


def test_single_process_dist_helpers_are_no_ops(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = cdist.init_distributed()
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert cdist.get_rank() == 0 and not cdist.is_initialized()
    t = torch.randn(3, 2, requires_grad=True)
    assert cdist.all_gather_with_grad(t) is t
    assert torch.equal(cdist.all_reduce_mean(t), t)
    cdist.barrier()
    cdist.cleanup()


def _hand_dice(p: np.ndarray, t: np.ndarray) -> float:
    """Mean over images of (2*sum(p*t)+1e-5)/(sum(p)+sum(t)+1e-5)."""
    return float(np.mean([(2 * (pi * ti).sum() + 1e-5) / (pi.sum() + ti.sum() + 1e-5) for pi, ti in zip(p, t)]))


def _hand_bce(x: np.ndarray, t: np.ndarray) -> float:
    p = 1 / (1 + np.exp(-x))
    return float(np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p))))


def test_pseudo_seg_losses_match_hand_computation():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 1, 5, 5, generator=g) * 2
    target = (torch.rand(3, 1, 5, 5, generator=g) > 0.7).float()
    x, t = logits.double().numpy(), target.double().numpy()
    bce = _hand_bce(x, t)
    paper = 0.5 * ((1 - _hand_dice(1 / (1 + np.exp(-x)), t)) + bce)
    code = (1 - _hand_dice(x, t)) + 0.2 * bce
    assert pseudo_seg_loss(logits, target, "paper").item() == pytest.approx(paper, rel=1e-5)
    assert pseudo_seg_loss(logits, target, "code").item() == pytest.approx(code, rel=1e-5)
    # The code's Dice on raw logits leaves [0, 1]: logits -0.5 on a full target give
    # "dice" = 2*(-8) / (-8 + 16) = -2, so the loss exceeds 3; logits +2 give "dice" 4/3 > 1.
    ones = torch.ones(1, 1, 4, 4)
    assert pseudo_seg_loss(-0.5 * ones, ones, "code").item() > 3
    assert pseudo_seg_loss(2.0 * ones, ones, "code").item() < 0
    # Paper loss: confident correct prediction ~ 0.
    good = torch.where(target > 0, 20.0, -20.0)
    assert pseudo_seg_loss(good, target, "paper").item() < 1e-3
    with pytest.raises(ValueError, match="pa_loss"):
        pseudo_seg_loss(logits, target, "other")
