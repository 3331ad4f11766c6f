"""Linear classification on a frozen encoder: CheXpert (5 labels, BCE, macro AUROC), RSNA (binary,
BCE, AUROC), COVIDx (3 classes, CE, accuracy). Protocol (G2D/MGCA, reference section 3):

    image -> frozen encoder (eval mode) -> C5 [B,D,h,w] -> global average pool [B,D] -> Linear(D, classes)

AdamW lr 5e-4, wd 1e-6, up to 50 epochs, early stopping on the validation loss, test on the head of
the best epoch. `linear.augment: moco_v2` (CheXpert, as MGCA) adds MoCo-v2's colour jitter, blur and
flip to the training batches after the pipeline's random crop (eval/augment.py). `linear.mode`:
- faithful (default): every epoch runs the encoder on freshly augmented training images (the
  training transform), exactly the protocol above.
- fast: the frozen features of every split are computed once (training images with the evaluation
  transform, so no augmentation), then a grid of heads (linear.lrs x linear.weight_decays) is trained
  together in one pass over the cached features, each with its own early stopping; the head with the
  best validation metric is reported (DINOv2's linear-probe recipe). Much cheaper: one encoder pass
  instead of one per epoch, and a whole learning-rate sweep for the price of one run.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from eval.augment import moco_v2_colour
from eval.checkpoint import Pretrained
from eval.plots import plot_history, plot_roc
from eval.tasks.base import TaskConfig
from eval.tasks.data import LabelSpec, epochs_of, make_loader, manifest_of, sample_ids
from eval.tasks.fit import adamw, autocast, fit, freeze, pooled_features, predict


@dataclass
class LinearSection:
    mode: str = "faithful"  # faithful | fast (cached features + grid of heads)
    augment: str = "none"  # training-batch augmentation after the pipeline: none | moco_v2 (faithful mode)
    lrs: tuple[float, ...] = (1e-4, 5e-4, 1e-3, 5e-3)  # fast mode grid
    weight_decays: tuple[float, ...] = (0.0, 1e-6, 1e-4)  # fast mode grid


@dataclass
class LinearConfig(TaskConfig):
    linear: LinearSection = field(default_factory=LinearSection)


def run(cfg: LinearConfig, weights: Pretrained, out_dir: Path, device: torch.device, log=print) -> dict:
    spec = LabelSpec.from_manifest(manifest_of(cfg))
    encoder = freeze(weights.build_encoder().to(device))
    d = cfg.data
    if cfg.linear.augment not in ("none", "moco_v2"):
        raise ValueError(f"linear.augment={cfg.linear.augment!r}; choose none or moco_v2")
    if cfg.linear.mode == "faithful":
        result = _faithful(cfg, spec, encoder, weights, device, log)
    elif cfg.linear.mode == "fast":
        result = _fast(cfg, spec, encoder, weights, device, log)
    else:
        raise ValueError(f"linear.mode={cfg.linear.mode!r}; choose faithful or fast")
    scores, target, history = result.pop("test_scores"), result.pop("test_target"), result.pop("history")
    ids = result.pop("test_ids")
    metrics = spec.metrics(scores, target)
    metrics.update(result)
    # What ran: fast mode caches one un-augmented view per image, whatever linear.augment says.
    metrics["augment"] = cfg.linear.augment if cfg.linear.mode == "faithful" else "none"
    metrics["n_test"] = int(len(target))
    plots = []
    if cfg.plots:
        plots.append(
            plot_roc(
                scores,
                spec.onehot(target),
                spec.names,
                out_dir / "roc.png",
                f"{cfg.task} ({d.dataset}, {cfg.fraction} of train): test ROC",
            )
        )
        if history:
            plots.append(plot_history(history, out_dir / "loss.png", f"{cfg.task}: linear head loss"))
    return {
        "metrics": metrics,
        "headline": spec.headline,
        "plots": plots,
        "predictions": spec.predictions(ids, scores, target),
    }


def _faithful(cfg: LinearConfig, spec: LabelSpec, encoder: nn.Module, weights: Pretrained, device, log) -> dict:
    d = cfg.data
    train = make_loader(cfg, d.train_split, device, weights, train=True)
    valid = make_loader(cfg, d.valid_split, device, weights, train=False)
    test = make_loader(cfg, d.test_split, device, weights, train=False)
    head = nn.Linear(encoder.out_channels[-1], spec.outputs).to(device)
    generator = torch.Generator().manual_seed(cfg.seed)

    def loss_on_batch(batch):
        image = batch.image
        if head.training and cfg.linear.augment == "moco_v2":  # training batches only
            image = moco_v2_colour(image, train.spec.mean, train.spec.std, generator)
        with torch.no_grad():
            feats = pooled_features(encoder, image)
        return spec.loss(head(feats), spec.targets(batch.meta, device))

    fitted = fit(
        head,
        loss_on_batch,
        train,
        valid,
        adamw(head.parameters(), cfg.train),
        cfg.train.epochs,
        cfg.train.patience,
        head.train,
        device,
        cfg.train.precision,
        log,
    )
    head.eval()
    scores, target, ids = predict(lambda x: head(pooled_features(encoder, x)), test, spec, device, cfg.train.precision)
    return {
        "test_scores": scores,
        "test_target": target,
        "test_ids": ids,
        "history": fitted.history,
        "mode": "faithful",
        **fitted.summary(),
    }


@torch.no_grad()
def _cache(encoder, loader, spec: LabelSpec, device, precision) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(features [N, D], targets, sample_ids) of a split, one evaluation-transform view per image."""
    feats, targets, keys, meta = [], [], [], []
    for batch in epochs_of(loader, 0):
        with autocast(device, precision):
            feats.append(pooled_features(encoder, batch.image))
        targets.append(spec.targets(batch.meta, device))
        keys.extend(batch.keys)
        meta.extend(batch.meta)
    return torch.cat(feats), torch.cat(targets), sample_ids(keys, meta)


def _fast(cfg: LinearConfig, spec: LabelSpec, encoder: nn.Module, weights: Pretrained, device, log) -> dict:
    d, t = cfg.data, cfg.train
    # Training images (the fraction's subset) go through the evaluation transform: the cache holds
    # one view per image, so there is no augmentation in fast mode.
    loaders = (
        make_loader(
            cfg, d.train_split, device, weights, train=True, transform=d.eval_transform, batch_size=d.eval_batch_size
        ),
        make_loader(cfg, d.valid_split, device, weights, train=False),
        make_loader(cfg, d.test_split, device, weights, train=False),
    )
    (x_tr, y_tr, _), (x_va, y_va, _), (x_te, y_te, test_ids) = (
        _cache(encoder, ld, spec, device, t.precision) for ld in loaders
    )
    grid = [(lr, wd) for lr in cfg.linear.lrs for wd in cfg.linear.weight_decays]
    if not grid:
        raise ValueError("linear.lrs and linear.weight_decays must be non-empty in fast mode")
    heads = nn.ModuleList(nn.Linear(x_tr.shape[1], spec.outputs) for _ in grid).to(device)
    opt = torch.optim.AdamW(
        [{"params": h.parameters(), "lr": lr, "weight_decay": wd} for h, (lr, wd) in zip(heads, grid)],
        betas=tuple(t.betas),
    )
    best_loss = [math.inf] * len(grid)
    best_state = [copy.deepcopy(h.state_dict()) for h in heads]
    bad = [0] * len(grid)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    epochs_run = 0
    for _ in range(t.epochs):
        heads.train()
        order = torch.randperm(x_tr.shape[0], generator=gen).to(device)
        for start in range(0, x_tr.shape[0], d.batch_size):
            idx = order[start : start + d.batch_size]
            x, y = x_tr[idx], y_tr[idx]
            # Heads share no parameters, so the summed loss gives each head its own gradient.
            loss = sum(spec.loss(h(x), y) for h in heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        epochs_run += 1
        heads.eval()
        with torch.no_grad():
            val = [float(spec.loss(h(x_va), y_va)) for h in heads]
        for g, v in enumerate(val):
            if v < best_loss[g]:
                best_loss[g], bad[g] = v, 0
                best_state[g] = copy.deepcopy(heads[g].state_dict())
            else:
                bad[g] += 1
        if min(bad) >= t.patience:
            break
    rows = []
    for g, (lr, wd) in enumerate(grid):
        heads[g].load_state_dict(best_state[g])
        with torch.no_grad():
            val_scores = spec.scores(heads[g](x_va)).cpu().numpy()
        val_metric = spec.metrics(val_scores, y_va.cpu().numpy())[spec.headline]
        rows.append({"lr": lr, "weight_decay": wd, "val_loss": best_loss[g], f"val_{spec.headline}": val_metric})
    # The best validation metric wins; ties and undefined metrics (a one-label validation split) fall
    # back to the lower validation loss.
    key = f"val_{spec.headline}"

    def rank(g: int) -> tuple:
        metric = rows[g][key]
        return (math.isnan(metric), 0.0 if math.isnan(metric) else -metric, rows[g]["val_loss"])

    best = min(range(len(grid)), key=rank)
    log(f"  fast mode: {len(grid)} heads, {epochs_run} epochs; best lr {grid[best][0]} wd {grid[best][1]}")
    heads.eval()
    with torch.no_grad():
        scores = spec.scores(heads[best](x_te)).cpu().numpy()
    return {
        "test_scores": scores,
        "test_target": y_te.cpu().numpy(),
        "test_ids": test_ids,
        "history": [],
        "mode": "fast",
        "grid": rows,
        "best_lr": grid[best][0],
        "best_weight_decay": grid[best][1],
        "epochs_run": epochs_run,
        "n_train": int(x_tr.shape[0]),
    }
