"""The pretraining run's config: one dataclass per component, composed into `PretrainConfig`.

YAML files in configs/pretrain/ fill it; `key.sub=value` arguments override it; the resolved result
is saved as `<output_dir>/config.yaml` and inside every checkpoint, and eval rebuilds the model
from that saved `model` section alone.
`model.name` picks a registered base config (model/registry.py); the other `model.*` keys override it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from common.config import ConfigError, apply_overrides, config_from_dict, config_to_dict, read_yaml
from model.config import ModelConfig
from model.registry import model_config
from pipeline.config import DataConfig
from train.optim import OptimConfig


@dataclass
class RunConfig:
    output_dir: str = "runs/pretrain"
    seed: int = 42
    epochs: int = 50
    max_steps: int = 0                 # optimiser steps; 0 = epochs * steps per epoch
    batch_size_per_gpu: int = 128      # the loader's batch; wins over data.batch_size_per_gpu
    global_batch_size: int = 0         # >0: gradient accumulation to reach it (must divide evenly)
    precision: str = "bf16"            # bf16 | fp16 (GradScaler) | fp32
    grad_clip: float = 0.0             # max global grad norm; 0 = off (G2D does not clip)
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False              # G2D: plain per-GPU BatchNorm
    find_unused_parameters: bool = False
    checkpoint_every: int = 500
    keep_last: int = 3
    resume: str = "auto"               # auto | none | path to a checkpoint
    log_every: int = 10
    plot_every: int = 500              # PNG grid of images + attention + pseudo-masks; 0 = off
    val_every: int = 1000              # retrieval + zero-shot AUC on the valid split; 0 = only at end
    val_batches: int = 50
    tensorboard: bool = False
    nonfinite: str = "stop"            # stop (raise naming the step) | skip (no update, counted)
    progress: bool = True


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)


VALID = {"precision": ("bf16", "fp16", "fp32"), "nonfinite": ("stop", "skip")}


def build_pretrain_config(raw: dict) -> PretrainConfig:
    raw = dict(raw)
    model_raw = dict(raw.pop("model", {}) or {})
    base = model_config(model_raw.get("name", ModelConfig.name))
    merged_model = config_to_dict(base)
    merged_model.update(model_raw)
    cfg = config_from_dict(PretrainConfig, {**raw, "model": merged_model})
    # One source of truth: the loader's batch size and seed come from the train section (a saved
    # resolved config repeats them; a different value there is a conflict).
    data_raw = raw.get("data") or {}
    for key in ("batch_size_per_gpu", "seed"):
        if key in data_raw and data_raw[key] != getattr(cfg.train, key):
            raise ConfigError(f"data.{key}={data_raw[key]} conflicts with train.{key}="
                              f"{getattr(cfg.train, key)}; data.{key} is set from train.{key}")
    cfg.data = dataclasses.replace(cfg.data, batch_size_per_gpu=cfg.train.batch_size_per_gpu,
                                   seed=cfg.train.seed)
    for key, allowed in VALID.items():
        if getattr(cfg.train, key) not in allowed:
            raise ConfigError(f"train.{key}={getattr(cfg.train, key)!r}; choose one of {allowed}")
    return cfg


def load_pretrain_config(path: str | Path | None, overrides: list[str]) -> PretrainConfig:
    raw = read_yaml(path) if path else {}
    return build_pretrain_config(apply_overrides(raw, overrides))
