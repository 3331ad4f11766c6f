"""A task's data: its dataset directory and manifest, loaders over its splits (the pretraining
pipeline with the task's or the checkpoint's image view), label targets and masks of a batch, and
the sample ids every predictions.npz starts with."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.dist import DistInfo
from eval.checkpoint import Pretrained
from eval.metrics import macro_auroc, multiclass_accuracy
from eval.plots import plot_history, plot_roc
from eval.tasks.base import TaskConfig
from pipeline import Loader, build_loader
from pipeline.config import DataConfig
from shards.schema import read_manifest


def dataset_root(cfg: TaskConfig) -> Path:
    return Path(cfg.data.root) / cfg.data.dataset


def manifest_of(cfg: TaskConfig) -> dict:
    return read_manifest(dataset_root(cfg))


CHECKPOINT_VIEW = "checkpoint"


# Every loader `make_loader` builds inside a `recording_loaders()` block, as (split, loader).
_RECORDERS: list[list[tuple[str, Loader]]] = []


@contextmanager
def recording_loaders() -> Iterator[list[tuple[str, Loader]]]:
    """Collect (split, loader) of every `make_loader` call inside the block, so the runner can record
    what each one skipped. A context rather than a parameter: the task modules build their loaders
    themselves, and the run's bookkeeping need not pass through every task's signature."""
    made: list[tuple[str, Loader]] = []
    _RECORDERS.append(made)
    try:
        yield made
    finally:
        _RECORDERS.remove(made)


def skipped_samples(made: list[tuple[str, Loader]]) -> dict[str, dict]:
    """{split: {"count", "samples": [{key, shard, reason}]}} of the unreadable samples the loaders
    left out, each sample once (a training loader meets the same bad sample every epoch)."""
    out: dict[str, dict] = {}
    for split, loader in made:
        seen = out.setdefault(split, {"count": 0, "samples": []})
        keys = {(s["shard"], s["key"]) for s in seen["samples"]}
        for sample in loader.stats.skipped_samples:
            if (sample["shard"], sample["key"]) not in keys:
                keys.add((sample["shard"], sample["key"]))
                seen["samples"].append({k: sample[k] for k in ("key", "shard", "reason")})
        seen["count"] = len(seen["samples"])
    return {split: v for split, v in out.items() if v["count"]}


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
    the others run once, in order, over the whole split (validation: at most data.valid_max_images).
    The channel count follows the model.

    An unreadable sample of the test split raises `pipeline.CorruptSampleError` (naming shard, key
    and reason): a test set must never shrink silently, since the metric would move with it. Other
    splits skip such a sample; the runner records each one in results.json (`skipped_samples`)."""
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
        max_samples=d.valid_max_images if split == d.valid_split else 0,
        shuffle=train,
        drop_last=False,
        seed=cfg.seed,
        on_error="raise" if split == d.test_split else "skip",
    )
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    loader = build_loader(data_cfg, split, dist)
    for made in _RECORDERS:
        made.append((split, loader))
    return loader


def resolved_view(cfg: TaskConfig, weights: Pretrained, name: str) -> dict:
    """The image view a loader really uses: transform name, sizes and mean/std (None = the
    transform's default). `checkpoint` resolves to the pretraining run's own view, so zero-shot and
    grounding record e.g. 128 px `eval`, not the task config's 256/224."""
    d = cfg.data
    if name == CHECKPOINT_VIEW:
        return checkpoint_view(weights)
    return {"transform": name, "image_size": d.image_size, "crop_size": d.crop_size, "mean": d.mean, "std": d.std}


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


def binary_mask(batch) -> torch.Tensor:
    """The loader's mask [B,1,H,W] (resampled with the image) -> {0,1} float."""
    if batch.mask is None:
        raise ValueError("the loader returned no masks (load_masks must be on for segmentation)")
    return (batch.mask.float() > 0.5).float()


# ---- labels, losses and metrics of the three label types (linear probing and fine-tuning)


@dataclass
class LabelSpec:
    kind: str  # binary | multilabel | multiclass
    names: list[str]  # label names (multiclass: class names by index)

    @property
    def outputs(self) -> int:
        return len(self.names)

    @classmethod
    def from_manifest(cls, manifest: dict) -> LabelSpec:
        kind = manifest.get("label_type")
        if kind not in ("binary", "multilabel", "multiclass"):
            raise ValueError(
                f"manifest of {manifest.get('dataset')!r}: label_type {kind!r} is not binary, multilabel or multiclass"
            )
        names = manifest.get("classes") if kind == "multiclass" else manifest.get("label_names")
        if not names:
            raise ValueError(f"manifest of {manifest.get('dataset')!r} names no labels/classes")
        return cls(kind, list(names))

    def targets(self, meta: list[dict], device) -> torch.Tensor:
        """multiclass: [B] class indices (json class_index); else [B, C] 0/1 floats from json labels."""
        if self.kind == "multiclass":
            try:
                return torch.tensor([int(m["class_index"]) for m in meta], device=device)
            except KeyError:
                raise ValueError("a multiclass sample's json has no class_index") from None
        rows = []
        for m in meta:
            labels = m.get("labels", {})
            missing = [n for n in self.names if n not in labels]
            if missing:
                raise ValueError(f"sample {m.get('key')!r}: json labels lack {missing}")
            rows.append([1.0 if labels[n] == 1.0 else 0.0 for n in self.names])
        return torch.tensor(rows, device=device)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.kind == "multiclass":
            return F.cross_entropy(logits, target)
        return F.binary_cross_entropy_with_logits(logits, target)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(dim=1) if self.kind == "multiclass" else logits.float().sigmoid()

    def onehot(self, target: np.ndarray) -> np.ndarray:
        """Targets as [n, C] 0/1 ints (multiclass: one-vs-rest)."""
        if self.kind == "multiclass":
            return np.eye(self.outputs, dtype=np.int64)[target]
        return target.astype(np.int64)

    def metrics(self, scores: np.ndarray, target: np.ndarray) -> dict:
        """multiclass: accuracy (+ one-vs-rest AUROCs); else mean AUROC + per class."""
        if self.kind == "multiclass":
            auc, per = macro_auroc(self.onehot(target), scores)
            return {
                "accuracy": multiclass_accuracy(target, scores),
                "auroc_ovr": auc,
                "auroc_ovr_per_class": dict(zip(self.names, per)),
            }
        auc, per = macro_auroc(target.astype(np.int64), scores)
        return {"auroc": auc, "auroc_per_class": dict(zip(self.names, per))}

    def predictions(self, ids: dict[str, np.ndarray], scores: np.ndarray, target: np.ndarray) -> dict:
        """predictions.npz of a classification task: ids + label kind, names, targets, scores [n, C]."""
        return {
            **ids,
            "kind": np.asarray(self.kind),
            "names": np.asarray(self.names, dtype=str),
            "targets": target,
            "scores": scores,
        }

    @property
    def headline(self) -> str:
        return "accuracy" if self.kind == "multiclass" else "auroc"


def classification_result(
    spec: LabelSpec,
    ids: dict[str, np.ndarray],
    scores: np.ndarray,
    target: np.ndarray,
    metrics: dict,
    headline: str,
    plots_to: Path | None,
    roc_title: str,
    history: list[dict],
    history_title: str,
) -> dict:
    """A classification task's result (linear probing, fine-tuning): its metrics and headline, the
    test ROC and (where a head was trained by epochs) loss-history figures in `plots_to` (None: no
    figures), and the predictions.npz arrays."""
    plots = []
    if plots_to is not None:
        plots.append(plot_roc(scores, spec.onehot(target), spec.names, plots_to / "roc.png", roc_title))
        if history:
            plots.append(plot_history(history, plots_to / "loss.png", history_title))
    return {
        "metrics": metrics,
        "headline": headline,
        "plots": plots,
        "predictions": spec.predictions(ids, scores, target),
    }
