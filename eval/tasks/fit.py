"""Training a task's head: device and precision, determinism, the early-stopping loop, the
optimiser, freezing, and prediction over a split."""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from common.dist import seed_everything
from common.log import get_logger
from eval.tasks.base import TrainSection
from eval.tasks.data import LabelSpec, epochs_of, sample_ids

LOG = get_logger("eval")  # "g2d.eval": formatted and routed like training's lines (common/log.py)


def log_info(message: str) -> None:
    """The evaluation's default `log` callable: one INFO line on the project's logger. Tasks take a
    `log` callable (tests pass a silent one); this is what the runner and the CLI use."""
    LOG.info(message)


def device_of() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast(device: torch.device, precision: str):
    """bf16 autocast when `precision` (TrainSection.autocast_precision: fp32 on CPU unless cpu_bf16)
    says so: the frozen ResNet's convolutions dominate eval time."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def place(model: nn.Module, device: torch.device, schedule: TrainSection) -> nn.Module:
    """`model` on `device`, NHWC when train.channels_last (inputs stay NCHW: a convolution whose
    weight is channels_last runs channels_last)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if schedule.channels_last else model


def make_deterministic(seed: int) -> None:
    """Same seed, same machine -> the same numbers: seeds Python/numpy/torch, asks torch for
    deterministic kernels (warn_only: an op without a deterministic CUDA kernel warns instead of
    failing; docs/method.md names the ones we hit) and pins cuDNN's algorithm choice. CPU kernels are
    deterministic at a fixed thread count, which a machine keeps from run to run."""
    seed_everything(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS reductions
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@dataclass
class FitResult:
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    history: list[dict]
    seconds: float
    best_val_score: float | None = None  # the selection score of the kept epoch, when one is used

    def summary(self) -> dict:
        """The fit's entries of a task's metrics.json (best_epoch counted from 1)."""
        return {
            "best_epoch": self.best_epoch + 1,
            "epochs_run": self.epochs_run,
            "best_val_loss": self.best_val_loss,
            "train_seconds": self.seconds,
        }


def progress(iterable, total: int | None, desc: str):
    """A tqdm bar with rate and ETA on an interactive terminal (stderr); a plain iterator in logs and
    tests (tqdm's disable=None), where the per-epoch log line says the same."""
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=None, dynamic_ncols=True)


def fit(
    trainable: nn.Module,
    loss_on_batch: Callable,
    train_loader,
    val_loader,
    schedule: TrainSection,
    set_train_mode: Callable[[], None],
    device: torch.device,
    log: Callable[[str], None] = log_info,
    val_score: Callable[[], float] | None = None,
    score_name: str = "score",
) -> FitResult:
    """Train the parameters of `trainable` with AdamW (`schedule`'s lr, weight decay, betas) for up to
    `schedule.epochs`, keep the weights from the best epoch, stop after `schedule.patience` epochs
    without improvement, and restore the best weights. Best = lowest validation loss, or with
    `val_score` (called after each epoch, modules in eval mode) the highest score (nan ranks lowest;
    ties keep the earlier epoch), e.g. detection's validation mAP (MGCA's rule).

    loss_on_batch(batch) -> scalar loss tensor (mean over the batch's samples; len(batch) = samples,
    which weights the epoch means). set_train_mode()
    puts the modules in the right train/eval mix (a frozen encoder stays in eval mode)."""
    optimizer = adamw(trainable.parameters(), schedule)
    epochs, patience, precision = schedule.epochs, schedule.patience, schedule.autocast_precision(device)
    best_key, best_epoch, best_state, bad, history = -math.inf, -1, None, 0, []
    best_loss, best_score = math.inf, None
    t0 = time.perf_counter()
    for epoch in range(epochs):
        set_train_mode()
        train_sum = torch.zeros((), device=device)
        n_train = 0
        total = len(train_loader) if hasattr(train_loader, "__len__") else None
        for batch in progress(epochs_of(train_loader, epoch), total, f"epoch {epoch + 1}/{epochs}"):
            with autocast(device, precision):
                loss = loss_on_batch(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_sum += loss.detach().float() * len(batch)
            n_train += len(batch)
        val_loss = evaluate_loss(trainable, loss_on_batch, val_loader, device, precision)
        train_loss = float(train_sum) / max(n_train, 1)
        entry = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss}
        line = f"  epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}, val loss {val_loss:.4f}"
        if val_score is not None:
            was = trainable.training
            trainable.eval()
            score = float(val_score())
            trainable.train(was)
            entry[f"val_{score_name}"] = score
            line += f", val {score_name} {score:.4f}"
            key = -math.inf if math.isnan(score) else score
        else:
            key = -val_loss
        history.append(entry)
        log(line)
        if key > best_key or best_state is None:
            best_key, best_epoch, bad = key, epoch, 0
            best_loss, best_score = val_loss, entry.get(f"val_{score_name}")
            best_state = copy.deepcopy(trainable.state_dict())
        else:
            bad += 1
            if bad >= patience:
                what = f"validation {score_name}" if val_score is not None else "validation loss"
                log(f"  early stop: no better {what} for {patience} epochs (best epoch {best_epoch + 1})")
                break
    if best_state is None:
        raise ValueError("no training epoch ran (train.epochs must be >= 1)")
    trainable.load_state_dict(best_state)
    return FitResult(best_epoch, best_loss, len(history), history, time.perf_counter() - t0, best_score)


@torch.no_grad()
def evaluate_loss(trainable: nn.Module, loss_on_batch: Callable, loader, device, precision: str) -> float:
    """Sample-weighted mean loss over a split, every module in eval mode."""
    was = trainable.training
    trainable.eval()
    total, n = torch.zeros((), device=device), 0
    for batch in epochs_of(loader, 0):
        with autocast(device, precision):
            loss = loss_on_batch(batch)
        total += loss.float() * len(batch)
        n += len(batch)
    trainable.train(was)
    if n == 0:
        raise ValueError("the validation split yielded no samples")
    return float(total) / n


def adamw(params, cfg: TrainSection, lr: float | None = None, weight_decay: float | None = None):
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(
        params,
        lr=cfg.lr if lr is None else lr,
        weight_decay=cfg.weight_decay if weight_decay is None else weight_decay,
        betas=tuple(cfg.betas),
    )


def freeze(module: nn.Module) -> nn.Module:
    """Frozen = no gradients and eval mode (BatchNorm keeps the pretrained running statistics)."""
    module.requires_grad_(False)
    return module.eval()


def pooled_features(encoder: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> [B, D] global average of the last encoder map (D = 2048 for ResNet-50)."""
    return encoder(image)[-1].float().mean(dim=(2, 3))


@torch.no_grad()
def predict(forward, loader, spec: LabelSpec, device, precision: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(scores [N, C], targets, sample_ids) over a split; forward(image) -> logits."""
    scores, targets, keys, meta = [], [], [], []
    for batch in epochs_of(loader, 0):
        with autocast(device, precision):
            logits = forward(batch.image)
        scores.append(spec.scores(logits).cpu())
        targets.append(spec.targets(batch.meta, "cpu"))
        keys.extend(batch.keys)
        meta.extend(batch.meta)
    if not scores:
        raise ValueError("the test split yielded no samples")
    return torch.cat(scores).numpy(), torch.cat(targets).numpy(), sample_ids(keys, meta)
