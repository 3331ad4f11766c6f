"""Fine-tuned classification (ChestX-ray14, 14 labels, KAD's protocol as G2D reports it):

    image -> encoder (TRAINED, BatchNorm in train mode) -> C5 -> global average pool -> Linear(D, 14)

Whole encoder + head updated with AdamW lr 1e-4, batch 64, up to 50 epochs, BCE; early stopping on the
validation loss and the weights of the best epoch tested (KAD's exact stopping rule is not in the
reference; this is the same rule as the linear tasks). Metric: mean AUROC over the 14 labels + per label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from eval.checkpoint import Pretrained
from eval.tasks.base import TaskConfig
from eval.tasks.data import LabelSpec, classification_result, make_loader, manifest_of
from eval.tasks.fit import fit, log_info, place, pooled_features, predict


@dataclass
class FinetuneConfig(TaskConfig):
    pass


class EncoderClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, dim: int, outputs: int):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(dim, outputs)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> logits [B, outputs]
        return self.head(pooled_features(self.encoder, image))


def run(cfg: FinetuneConfig, weights: Pretrained, out_dir: Path, device: torch.device, log=log_info) -> dict:
    d = cfg.data
    spec = LabelSpec.from_manifest(manifest_of(cfg))
    encoder = weights.build_encoder()
    model = place(EncoderClassifier(encoder, encoder.out_channels[-1], spec.outputs), device, cfg.train)
    train = make_loader(cfg, d.train_split, device, weights, train=True)
    valid = make_loader(cfg, d.valid_split, device, weights, train=False)
    test = make_loader(cfg, d.test_split, device, weights, train=False)

    def loss_on_batch(batch):
        return spec.loss(model(batch.image), spec.targets(batch.meta, device))

    fitted = fit(model, loss_on_batch, train, valid, cfg.train, model.train, device, log)
    model.eval()
    scores, target, ids = predict(model, test, spec, device, cfg.train.autocast_precision(device))
    metrics = spec.metrics(scores, target)
    metrics.update(
        {
            "n_test": int(len(target)),
            **fitted.summary(),
        }
    )
    return classification_result(
        spec,
        ids,
        scores,
        target,
        metrics,
        spec.headline,
        out_dir if cfg.plots else None,
        f"{cfg.task} ({cfg.fraction} of train): test ROC",
        fitted.history,
        f"{cfg.task}: fine-tuning loss",
    )
