"""Named model configs. `model.name` in a run config picks one; other `model.*` keys override it.

g2d_resnet50  the real G2D model: smp U-Net ResNet-50 at 256 px, Bio_ClinicalBERT with layers
              0-8 frozen, 128-d projector, 4-head attention pool.
g2d_tiny      the same architecture shrunk for CPU tests, demos and the synthetic corpus:
              ResNet-18 U-Net with a narrow decoder at 128 px and a tiny local BERT
              (`make tiny-bert` writes runs/tiny_bert).
"""

from __future__ import annotations

import dataclasses

from model.config import ModelConfig
from model.g2d import G2DModel

MODEL_CONFIGS: dict[str, ModelConfig] = {
    "g2d_resnet50": ModelConfig(name="g2d_resnet50"),
    "g2d_tiny": ModelConfig(
        name="g2d_tiny",
        encoder="resnet18",
        decoder_channels=(128, 64, 32, 16, 8),
        image_size=128,
        text_model="runs/tiny_bert",
        text_freeze_layers=1,
        text_pooling="mean",  # its BERT is random (no ClinicalBERT offline): [CLS] would carry ~nothing
        max_text_length=128,
        pa_warmup_steps=20,
    ),
}


def model_config(name: str, **overrides) -> ModelConfig:
    """A copy of registered config `name` with `overrides` applied (unknown field -> error)."""
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(MODEL_CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown ModelConfig field(s) {unknown}; valid: {sorted(fields)}")
    return dataclasses.replace(MODEL_CONFIGS[name], **overrides)


def build_model(cfg: ModelConfig) -> G2DModel:
    return G2DModel(cfg)
