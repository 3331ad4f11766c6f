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

`linear.protocol`: mgca (default) is the protocol above, in either mode. lbfgs is a probe that
converges, so that it measures what the features hold rather than how fast a head optimises:
  features of every split cached once (evaluation transform) -> the fraction's training subset drawn
  `linear.redraws` times from the whole training split (same size as the manifest's subset; stratified
  by class for binary/multiclass labels) -> each draw: features standardised with the draw's own
  mean/std -> L2-regularised logistic regression (sigmoid per label, or softmax over classes) fitted
  full-batch with L-BFGS in float64 to a gradient below `linear.tolerance`, for each penalty of
  `linear.l2_grid`; the penalty with the best validation metric is kept -> test.
The draws' test metrics give `<headline>_mean` (the headline) and `<headline>_std`; predictions.npz
and the plain metric keys hold the first draw, so its bootstrap interval and every recorded metric of
it recompute from the file. At fraction 1.0 there is one draw (the whole split).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eval.augment import moco_v2_colour
from eval.checkpoint import Pretrained
from eval.tasks.base import TaskConfig
from eval.tasks.data import LabelSpec, classification_result, epochs_of, make_loader, manifest_of, sample_ids
from eval.tasks.fit import autocast, fit, freeze, log_info, place, pooled_features, predict


@dataclass
class LinearSection:
    protocol: str = "mgca"  # mgca (AdamW head, `mode` below) | lbfgs (standardised features, converged L-BFGS)
    mode: str = "faithful"  # faithful | fast (cached features + grid of heads)
    augment: str = "none"  # training-batch augmentation after the pipeline: none | moco_v2 (faithful mode)
    lrs: tuple[float, ...] = (1e-4, 5e-4, 1e-3, 5e-3)  # fast mode grid
    weight_decays: tuple[float, ...] = (0.0, 1e-6, 1e-4)  # fast mode grid
    # lbfgs: the L2 penalty lambda of loss = mean log-loss + lambda/2 * ||W||^2 (sklearn's C = 1/(lambda n))
    l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    redraws: int = 5  # lbfgs: training subsets drawn at a fraction below 1.0
    max_iter: int = 1000  # lbfgs: iteration cap of one fit
    tolerance: float = 1e-6  # lbfgs: a fit has converged when every gradient entry is at most this


@dataclass
class LinearConfig(TaskConfig):
    linear: LinearSection = field(default_factory=LinearSection)


def run(cfg: LinearConfig, weights: Pretrained, out_dir: Path, device: torch.device, log=log_info) -> dict:
    spec = LabelSpec.from_manifest(manifest_of(cfg))
    encoder = freeze(place(weights.build_encoder(), device, cfg.train))
    d = cfg.data
    if cfg.linear.augment not in ("none", "moco_v2"):
        raise ValueError(f"linear.augment={cfg.linear.augment!r}; choose none or moco_v2")
    headline = spec.headline
    if cfg.linear.protocol == "lbfgs":
        result = _lbfgs(cfg, spec, encoder, weights, device, log)
        headline = f"{spec.headline}_mean"
    elif cfg.linear.protocol != "mgca":
        raise ValueError(f"linear.protocol={cfg.linear.protocol!r}; choose mgca or lbfgs")
    elif cfg.linear.mode == "faithful":
        result = _faithful(cfg, spec, encoder, weights, device, log)
    elif cfg.linear.mode == "fast":
        result = _fast(cfg, spec, encoder, weights, device, log)
    else:
        raise ValueError(f"linear.mode={cfg.linear.mode!r}; choose faithful or fast")
    scores, target, history = result.pop("test_scores"), result.pop("test_target"), result.pop("history")
    ids = result.pop("test_ids")
    metrics = spec.metrics(scores, target)
    metrics.update(result)
    metrics["protocol"] = cfg.linear.protocol
    # What ran: only the faithful mode augments; the cached features hold one un-augmented view per image.
    faithful = cfg.linear.protocol == "mgca" and cfg.linear.mode == "faithful"
    metrics["augment"] = cfg.linear.augment if faithful else "none"
    metrics["n_test"] = int(len(target))
    return classification_result(
        spec,
        ids,
        scores,
        target,
        metrics,
        headline,
        out_dir if cfg.plots else None,
        f"{cfg.task} ({d.dataset}, {cfg.fraction} of train): test ROC",
        history,
        f"{cfg.task}: linear head loss",
    )


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

    fitted = fit(head, loss_on_batch, train, valid, cfg.train, head.train, device, log)
    head.eval()
    scores, target, ids = predict(
        lambda x: head(pooled_features(encoder, x)), test, spec, device, cfg.train.autocast_precision(device)
    )
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
        _cache(encoder, ld, spec, device, t.autocast_precision(device)) for ld in loaders
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


# ---- lbfgs protocol ---------------------------------------------------------------------------------


def _lbfgs(cfg: LinearConfig, spec: LabelSpec, encoder: nn.Module, weights: Pretrained, device, log) -> dict:
    d, lin = cfg.data, cfg.linear
    if not lin.l2_grid or any(not (v > 0 and math.isfinite(v)) for v in lin.l2_grid):
        raise ValueError(f"linear.l2_grid={list(lin.l2_grid)} must be a non-empty list of positive penalties")
    if lin.redraws < 1 or lin.max_iter < 1 or not lin.tolerance > 0:
        raise ValueError("linear.redraws and linear.max_iter must be >= 1 and linear.tolerance > 0")
    # The whole training split, in order, through the evaluation transform: the draws pick from it.
    splits = [d.train_split, d.valid_split, d.test_split]
    cached = [
        _cache(
            encoder,
            make_loader(cfg, s, device, weights, train=False),
            spec,
            device,
            cfg.train.autocast_precision(device),
        )
        for s in splits
    ]
    (x_tr, y_tr, _), (x_va, y_va, _), (x_te, y_te, test_ids) = cached
    size = subset_size(manifest_of(cfg), cfg, len(x_tr))
    out = probe_with_redraws(x_tr, y_tr, x_va, y_va, x_te, y_te, spec, lin, size, cfg.seed, log)
    out["test_ids"] = test_ids
    return out


def subset_size(manifest: dict, cfg: LinearConfig, n_train: int) -> int:
    """How many training images the fraction gets: the size of the manifest's subset for it (what the
    mgca protocol trains on), the whole split at 1.0 or where the manifest has no such subset."""
    d = cfg.data
    if cfg.fraction == "1.0":
        return n_train
    table = manifest.get("task_subsets", {}).get(d.subset_task, {}) if d.subset_task else manifest.get("subsets", {})
    keys = table.get(d.train_split, {}).get(cfg.fraction)
    return min(n_train, len(keys)) if keys is not None else max(1, round(float(cfg.fraction) * n_train))


def draw_subset(target: torch.Tensor, size: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Indices [size] of a random training subset. binary / multiclass: stratified, each class keeping
    its share (largest remainders) and at least one image while it has any; multilabel: uniform."""
    n = target.shape[0]
    if size >= n:
        return torch.arange(n)
    if kind == "multilabel":
        return torch.randperm(n, generator=generator)[:size].sort().values
    classes = (target[:, 0] if kind == "binary" else target).long().cpu()
    counts = torch.bincount(classes).double()
    quota = size * counts / n
    take = quota.floor().clamp(max=counts)
    take = torch.where(counts > 0, take.clamp(min=1), take)
    while take.sum() > size:  # the minimum of one per class overshot: trim the largest
        take[take.argmax()] -= 1
    while take.sum() < size:  # hand out the rest by largest remainder among classes with images left
        room = torch.where(take < counts, quota - take, torch.full_like(quota, -math.inf))
        take[room.argmax()] += 1
    picked = []
    for c, k in enumerate(take.long().tolist()):
        members = (classes == c).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(picked).sort().values


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Each feature centred and scaled by the training rows' mean and std; a feature constant on the
    training rows is only centred (its std would blow up any other split's values)."""
    mean, std = train.mean(dim=0), train.std(dim=0, unbiased=False)
    scale = torch.where(std > 1e-6, std, torch.ones_like(std))
    return [(x - mean) / scale for x in (train, *others)]


@dataclass
class LogisticFit:
    weight: torch.Tensor  # [D, C] float64
    bias: torch.Tensor  # [C]
    iterations: int
    grad_max: float  # largest gradient entry of the penalised objective at the solution
    converged: bool

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.double() @ self.weight + self.bias


def logistic_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean log-loss over the samples: softmax cross-entropy (multiclass), else the sum over labels of
    each label's mean binary log-loss, so every label is the fit it would be alone."""
    if kind == "multiclass":
        return torch.nn.functional.cross_entropy(logits, target.long())
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, target.double(), reduction="sum") / len(logits)


def fit_logistic(
    x: torch.Tensor, target: torch.Tensor, kind: str, outputs: int, l2: float, max_iter: int, tolerance: float
) -> LogisticFit:
    """x [n, D] (standardised), target [n, C] 0/1 or [n] class ids -> the minimiser of
    logistic_loss + l2/2 * ||W||^2 (bias not penalised), full batch, float64, L-BFGS with a strong-Wolfe
    line search from zero. Stops when every gradient entry is <= tolerance (converged) or at max_iter."""
    x = x.double()
    weight = torch.zeros(x.shape[1], outputs, dtype=torch.float64, device=x.device, requires_grad=True)
    bias = torch.zeros(outputs, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=tolerance,
        tolerance_change=0.0,  # no stop on a small loss change: only the gradient says "converged"
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = logistic_loss(x @ weight + bias, target, kind) + 0.5 * l2 * (weight * weight).sum()
        loss.backward()
        return loss

    opt.step(objective)
    objective()
    grad_max = max(float(weight.grad.abs().max()), float(bias.grad.abs().max()))
    iterations = int(opt.state[weight].get("n_iter", 0))
    return LogisticFit(weight.detach(), bias.detach(), iterations, grad_max, grad_max <= tolerance)


def probe_with_redraws(
    x_tr, y_tr, x_va, y_va, x_te, y_te, spec: LabelSpec, lin: LinearSection, size: int, seed: int, log
) -> dict:
    """The lbfgs protocol on cached features ([n, D] per split, targets as LabelSpec.targets):
    `lin.redraws` training subsets of `size` (one if that is the whole split), each standardised, fitted
    for every penalty of lin.l2_grid and scored on validation; the best penalty's head is tested.
    -> the run()'s result dict: first draw's test scores, per-draw records, mean/std of every metric."""
    draws = 1 if size >= len(x_tr) else lin.redraws
    records, first_scores = [], None
    for r in range(draws):
        idx = draw_subset(y_tr, size, spec.kind, torch.Generator().manual_seed(seed + r)).to(x_tr.device)
        xs_tr, xs_va, xs_te = standardise(x_tr[idx].double(), x_va.double(), x_te.double())
        rows = []
        for l2 in lin.l2_grid:
            fitted = fit_logistic(xs_tr, y_tr[idx], spec.kind, spec.outputs, l2, lin.max_iter, lin.tolerance)
            with torch.no_grad():
                val_logits = fitted.logits(xs_va)
                val_loss = float(logistic_loss(val_logits, y_va, spec.kind))
                val_metric = spec.metrics(spec.scores(val_logits).cpu().numpy(), y_va.cpu().numpy())[spec.headline]
            rows.append({"l2": l2, "val_loss": val_loss, f"val_{spec.headline}": val_metric, "fit": fitted})
        # The best validation metric wins; ties and undefined metrics fall back to the lower validation loss.
        key = f"val_{spec.headline}"
        best = min(
            rows, key=lambda row: (math.isnan(row[key]), 0.0 if math.isnan(row[key]) else -row[key], row["val_loss"])
        )
        fitted = best["fit"]
        with torch.no_grad():
            scores = spec.scores(fitted.logits(xs_te)).cpu().numpy()
        test = spec.metrics(scores, y_te.cpu().numpy())
        if first_scores is None:
            first_scores = scores
        unconverged = [row["l2"] for row in rows if not row["fit"].converged]
        if unconverged:
            log(f"  lbfgs draw {r + 1}: no convergence within {lin.max_iter} iterations for l2 {unconverged}")
        records.append(
            {
                "seed": seed + r,
                "n_train": int(len(idx)),
                "l2": best["l2"],
                key: best[key],
                "iterations": fitted.iterations,
                "grad_max": fitted.grad_max,
                "converged": fitted.converged,
                "grid": [
                    {k: v for k, v in row.items() if k != "fit"} | {"converged": row["fit"].converged} for row in rows
                ],
                "test": test,
            }
        )
    values = np.array([rec["test"][spec.headline] for rec in records], dtype=np.float64)
    spread = float(values.std(ddof=1)) if draws > 1 else 0.0  # sample std over the draws
    log(
        f"  lbfgs: {draws} draw(s) of {size} training images; test {spec.headline} "
        f"{values.mean():.4f} +- {spread:.4f}; l2 {[rec['l2'] for rec in records]}"
    )
    return {
        "test_scores": first_scores,
        "test_target": y_te.cpu().numpy(),
        "history": [],
        f"{spec.headline}_mean": float(values.mean()),
        f"{spec.headline}_std": spread,
        "draws": records,
        "n_draws": draws,
        "n_train": int(size),
        "predictions_draw": 1,
    }
