"""What every evaluation task shares: the config sections, data loaders, the early-stopping training
loop, mixed precision, and atomic PNG writing.

A task config is a dataclass (`TaskConfig` + the family's own section) filled from
configs/eval/<task>.yaml, then `fraction_overrides[<fraction>]` from that file, then `key=value`
arguments (strict: an unknown key is an error naming it).
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from common.dist import DistInfo
from common.io import atomic_open
from eval.checkpoint import Pretrained
from pipeline import build_loader
from pipeline.config import DataConfig
from shards.schema import read_manifest


@dataclass
class DataSection:
    dataset: str = ""  # directory under the downstream shards root (DATA); fixed by the task
    root: str = "data/shards/downstream"  # the shards root; --data sets it
    train_transform: str = "mgca_train"  # pipeline transform (pipeline/transforms.py) of the training split
    eval_transform: str = "mgca_eval"  # ... of validation and test; "checkpoint" = the pretraining run's own
    # eval view (transform, sizes, mean/std from its saved data config)
    image_size: int = 256  # resize side S (MGCA: resize 256, crop 224)
    crop_size: int = 224  # crop side of the cropping transforms (mgca_*, g2d_paper*)
    mean: list[float] | None = None  # None: the transform's own (mgca_*: 0.5)
    std: list[float] | None = None
    batch_size: int = 8
    eval_batch_size: int = 32
    num_workers: int = 2
    backend: Literal["auto", "dali", "torch"] = "auto"  # auto: DALI if it imports, else torch
    subset_task: str = ""  # manifest task_subsets entry of the fraction's subset ("" = manifest subsets)
    train_split: str = "train"
    valid_split: str = "valid"
    test_split: str = "test"


@dataclass
class TrainSection:
    epochs: int = 50
    patience: int = 10  # early stopping: epochs without a better validation loss (detection: mAP); MGCA: 10
    lr: float = 5e-4
    weight_decay: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    precision: Literal["bf16", "fp32"] = "bf16"  # autocast dtype on CUDA; CPU always runs fp32


@dataclass
class ModelSection:
    baseline: str = "g2d_resnet50"  # architecture of CKPT=random / imagenet (and of a bare exported .pth)
    imagenet_weights: str = "imagenet"  # CKPT=imagenet: "imagenet" (download) or a local torchvision/smp state dict
    text_model: str = ""  # replaces the checkpoint's saved text-model path (a moved tiny BERT)


@dataclass
class CkptSection:
    prefix: str = ""  # strip-and-select key prefix of a foreign checkpoint's image encoder,
    # e.g. img_encoder_q.model. (MGCA); "" = our own layouts / plain torchvision


@dataclass
class TaskConfig:
    task: str = ""
    fraction: str = "1.0"  # training-data fraction: 0.01 | 0.1 | 1.0 (manifest subsets)
    seed: int = 42
    output_root: str = "runs/eval"
    plots: bool = True
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    ckpt: CkptSection = field(default_factory=CkptSection)


FRACTIONS = ("0.01", "0.1", "1.0")


def device_of() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA (the frozen ResNet's convolutions dominate eval time); fp32 on CPU."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# data


def dataset_root(cfg: TaskConfig) -> Path:
    return Path(cfg.data.root) / cfg.data.dataset


def manifest_of(cfg: TaskConfig) -> dict:
    return read_manifest(dataset_root(cfg))


CHECKPOINT_VIEW = "checkpoint"


def make_loader(
    cfg: TaskConfig,
    split: str,
    device: torch.device,
    weights: Pretrained,
    *,
    train: bool,
    masks: bool = False,
    boxes: bool = False,
    transform: str | None = None,
    batch_size: int | None = None,
):
    """A `pipeline.build_loader` over one split of the task's dataset, with masks/boxes transformed
    with the image. Training loaders shuffle, use the training transform and the fraction's subset;
    the others run once, in order, over the whole split. The channel count follows the model."""
    d = cfg.data
    view = resolved_view(cfg, weights, transform or (d.train_transform if train else d.eval_transform))
    subset = cfg.fraction if (train and split == d.train_split) else None
    data_cfg = DataConfig(
        shards=str(dataset_root(cfg)),
        backend=d.backend,
        batch_size_per_gpu=batch_size or (d.batch_size if train else d.eval_batch_size),
        num_workers=d.num_workers,
        transform=view["transform"],
        eval_transform=view["transform"],
        image_size=view["image_size"],
        crop_size=min(view["crop_size"], view["image_size"]),
        channels=weights.model_cfg.channels,
        mean=view["mean"],
        std=view["std"],
        load_masks=masks,
        load_boxes=boxes,
        subset=subset,
        subset_task=(d.subset_task or None) if subset else None,
        shuffle=train,
        drop_last=False,
        seed=cfg.seed,
    )
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    return build_loader(data_cfg, split, dist)


def resolved_view(cfg: TaskConfig, weights: Pretrained, name: str) -> dict:
    """The image view a loader really uses: transform name, sizes and mean/std (None = the
    transform's default). `checkpoint` resolves to the pretraining run's own view, so zero-shot and
    grounding record e.g. 128 px `eval`, not the task config's 256/224."""
    d = cfg.data
    if name == CHECKPOINT_VIEW:
        return checkpoint_view(weights)
    return {"transform": name, "image_size": d.image_size, "crop_size": d.crop_size, "mean": d.mean, "std": d.std}


def make_deterministic(seed: int) -> None:
    """Same seed, same machine -> the same numbers: seeds Python/numpy/torch, asks torch for
    deterministic kernels (warn_only: an op without a deterministic CUDA kernel warns instead of
    failing; docs/method.md names the ones we hit) and pins cuDNN's algorithm choice. CPU kernels are
    deterministic at a fixed thread count, which a machine keeps from run to run."""
    seed_all(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS reductions
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def checkpoint_view(weights: Pretrained) -> dict:
    """The evaluation view the pretraining run used (its saved data config), so zero-shot embeddings
    see images the way they were trained; without a saved config: `eval` at the model's size."""
    saved = weights.data_cfg or {}
    size = weights.model_cfg.image_size
    return {
        "transform": saved.get("eval_transform", "eval"),
        "image_size": saved.get("image_size", size),
        "crop_size": saved.get("crop_size", size),
        "mean": saved.get("mean"),
        "std": saved.get("std"),
    }


def sample_ids(keys: list[str], meta: list[dict]) -> dict[str, np.ndarray]:
    """predictions.npz's first two arrays: sample keys [n] and patient ids [n] ("" where the dataset
    has none; the bootstrap then resamples images instead of patients)."""
    return {
        "keys": np.asarray(keys, dtype=str),
        "patient_ids": np.asarray([str(m.get("patient_id") or "") for m in meta], dtype=str),
    }


def epochs_of(loader, epoch: int) -> Iterable:
    """The loader positioned at the start of `epoch` (training shuffles and augments per epoch)."""
    loader.set_epoch(epoch)
    return loader


# ---------------------------------------------------------------------------------------------
# training with early stopping on the validation loss (or a validation score)


@dataclass
class FitResult:
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    history: list[dict]
    seconds: float
    best_val_score: float | None = None  # the selection score of the kept epoch, when one is used


def progress(iterable, total: int | None, desc: str):
    """A tqdm bar with rate and ETA on an interactive terminal (stderr); a plain iterator in logs and
    tests (tqdm's disable=None), where the per-epoch log line says the same."""
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=None, dynamic_ncols=True)


def fit(
    trainable: nn.Module,
    loss_on_batch: Callable,
    train_loader,
    val_loader,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    patience: int,
    set_train_mode: Callable[[], None],
    device: torch.device,
    precision: str,
    log: Callable[[str], None] = print,
    val_score: Callable[[], float] | None = None,
    score_name: str = "score",
) -> FitResult:
    """Train for up to `epochs`, keep the weights of `trainable` from the best epoch, stop after
    `patience` epochs without improvement, and restore the best weights. Best = lowest validation
    loss, or with `val_score` (called after each epoch, modules in eval mode) the highest score (nan
    ranks lowest; ties keep the earlier epoch), e.g. detection's validation mAP (MGCA's rule).

    loss_on_batch(batch) -> scalar loss tensor (mean over the batch's samples). set_train_mode()
    puts the modules in the right train/eval mix (a frozen encoder stays in eval mode)."""
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
            train_sum += loss.detach().float() * batch.image.shape[0]
            n_train += batch.image.shape[0]
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
        total += loss.float() * batch.image.shape[0]
        n += batch.image.shape[0]
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


# ---------------------------------------------------------------------------------------------
# plots


def save_figure(fig, path: Path) -> str:
    """Write a matplotlib figure as PNG atomically and close it; returns the file name."""
    import matplotlib.pyplot as plt

    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=90)
    plt.close(fig)
    return path.name


def plt_agg():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: list[dict], path: Path, title: str) -> str:
    plt = plt_agg()
    fig, ax = plt.subplots(figsize=(4.5, 3))
    epochs = [h["epoch"] + 1 for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def panel_row(n: int):
    """A figure with one row of n image panels (wide enough for the title even when n is 1)."""
    plt = plt_agg()
    fig, axes = plt.subplots(1, max(n, 1), figsize=(max(2.4 * n, 5.0), 2.9), squeeze=False)
    for ax in axes[0]:
        ax.axis("off")
    return fig, axes[0]


def short_key(key: str, n: int = 16) -> str:
    """The distinctive end of a sample key (DICOM UIDs share long prefixes)."""
    return key if len(key) <= n else "..." + key[-n:]


def image_for_display(image: torch.Tensor) -> torch.Tensor:
    """[C,H,W] normalised image -> [H,W] min-max scaled to [0,1] for imshow (any normalisation)."""
    g = image.float().mean(dim=0).cpu()
    return (g - g.min()) / (g.max() - g.min()).clamp_min(1e-6)
