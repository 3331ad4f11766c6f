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

from common.config import (
    ConfigError,
    apply_overrides,
    at_least,
    check_fields,
    checked,
    config_from_dict,
    config_to_dict,
    one_of,
    read_yaml,
)
from model.config import ModelConfig
from model.registry import MODEL_CONFIGS, model_config
from pipeline.config import CROPPING, DataConfig
from train.optim import OptimConfig

PRECISIONS = ("bf16", "fp16", "fp32")
NONFINITE = ("stop", "skip")


# Each range is declared on its field (`checked` / `at_least`) and read by common.config.check_fields
# when the config loads, so a bad value fails before any model is built (checkpoint_every=0 used to die
# with ZeroDivisionError after step 1; epochs=0 trained nothing and exited 0).
@dataclass
class RunConfig:
    output_dir: str = "runs/pretrain"
    # numpy's generators take seeds in [0, 2**32); rank r seeds seed + r, hence the margin.
    seed: int = checked(42, "in [0, 2**31) (rank r seeds numpy with seed + r)", lambda v: 0 <= v < 2**31)
    epochs: int = at_least(1, 50)
    max_steps: int = at_least(0, 0, " (0 = epochs x steps per epoch)")  # optimiser steps
    batch_size_per_gpu: int = at_least(1, 128)  # the loader's batch (the data section's is set from it)
    global_batch_size: int = at_least(0, 0, " (0 = no gradient accumulation)")  # >0: accumulate to reach it
    precision: str = one_of("bf16", PRECISIONS)  # bf16 | fp16 (GradScaler) | fp32
    grad_clip: float = at_least(0, 0.0, " (0 = off)")  # max global grad norm (G2D does not clip)
    channels_last: bool = True
    compile: bool = False  # torch.compile of image tower, BERT layers, PA loss (in place, inside DDP)
    cuda_graphs: bool = False  # CUDA only (compile mode reduce-overhead); on a CPU a logged no-op
    peak_tflops: float = 0.0  # device peak for MFU; 0 = train/flops.py's table (CPU: an estimate)
    sync_bn: bool = False  # G2D: plain per-GPU BatchNorm
    find_unused_parameters: bool = False
    checkpoint_every: int = at_least(1, 500)  # the last step is always saved too
    keep_last: int = at_least(1, 3)  # of this run's checkpoints
    resume: str = "auto"  # auto | none | path to a checkpoint
    log_every: int = at_least(1, 10)  # the last step is always logged too
    plot_every: int = at_least(0, 500, " (0 = off)")  # PNG grid of images + attention + pseudo-masks
    val_every: int = at_least(0, 1000, " (0 = only at the end)")  # retrieval + zero-shot AUC on valid
    val_batches: int = at_least(0, 50, " (0 = the whole valid split)")
    tensorboard: bool = False  # event files under <output_dir>/tensorboard/ (same scalars as metrics.jsonl)
    wandb: bool = False  # Weights & Biases; needs `pip install wandb` (not a dependency)
    wandb_project: str = "g2d"
    log_all_ranks: bool = False  # every rank also logs to the console (all ranks always log to logs/rank<N>.log)
    # Health warnings from this step on.
    health_after_steps: int = at_least(0, 0, " (0 = max(lr warm-up, min(a third of the run, 2000)))")
    # Warn while the VLA loss is within this fraction of ln(negatives).
    health_loss_margin: float = checked(0.03, "in [0, 1)", lambda v: 0 <= v < 1)
    # Warn when an embedding's per-dim std < this x 1/sqrt(proj_dim).
    health_min_spread: float = at_least(0, 0.1, " (0 = no collapse check)")
    nonfinite: str = one_of("stop", NONFINITE)  # stop (raise naming the step) | skip (no update, counted)
    progress: bool = True


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)


def validate_pretrain_config(cfg: PretrainConfig) -> None:
    """Raise ConfigError naming the first key outside its declared domain or a non-finite float."""
    if not cfg.train.output_dir.strip():
        # Path("") is the current directory: checkpoints would land wherever the command ran.
        raise ConfigError("train.output_dir is empty; name the run's folder, e.g. runs/pretrain")
    check_fields(cfg.train, "train")
    check_fields(cfg.optim, "optim")
    check_fields(cfg.model, "model")


def _section(raw: dict, name: str) -> dict:
    """raw[name] as a dict; a scalar where a section belongs (`model=5`) is a ConfigError."""
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a mapping of {name}.* keys, got {value!r}")
    return value


def build_pretrain_config(raw: dict) -> PretrainConfig:
    raw = dict(raw)
    model_raw = dict(_section(raw, "model"))
    raw.pop("model", None)
    name = model_raw.get("name", ModelConfig.name)
    if not isinstance(name, str) or name not in MODEL_CONFIGS:
        raise ConfigError(f"model.name={name!r} is not a registered model; choose one of {sorted(MODEL_CONFIGS)}")
    base = model_config(name)
    merged_model = config_to_dict(base)
    merged_model.update(model_raw)
    cfg = config_from_dict(PretrainConfig, {**raw, "model": merged_model})
    # One source of truth: the loader's batch size and seed come from the train section (a saved
    # resolved config repeats them; a different value there is a conflict).
    data_raw = _section(raw, "data")
    for key in ("batch_size_per_gpu", "seed"):
        if key in data_raw and data_raw[key] != getattr(cfg.train, key):
            raise ConfigError(
                f"data.{key}={data_raw[key]} conflicts with train.{key}="
                f"{getattr(cfg.train, key)}; data.{key} is set from train.{key}"
            )
    # Before the copy into the data section, whose own check would blame data.batch_size_per_gpu.
    validate_pretrain_config(cfg)
    cfg.data = dataclasses.replace(cfg.data, batch_size_per_gpu=cfg.train.batch_size_per_gpu, seed=cfg.train.seed)
    cfg.model = dataclasses.replace(cfg.model, **_model_view_of_data(cfg.data, model_raw))
    return cfg


def _model_view_of_data(data: DataConfig, model_raw: dict) -> dict:
    """The model fields that the data section decides: the side of the images the training transform
    feeds (`data.crop_size` for the cropping transforms, else `data.image_size`; it sizes the attention
    pool's positional table, so a mismatch would resample it on every forward) and the token cap
    (`data.max_text_length`; the model checks it against BERT's positions). A model.* key set to
    another value is a ConfigError naming both keys; the resolved config shows the derived values."""
    side_key = "data.crop_size" if data.transform in CROPPING else "data.image_size"
    derived = {
        "image_size": (side_key, data.crop_size if data.transform in CROPPING else data.image_size),
        "max_text_length": ("data.max_text_length", data.max_text_length),
    }
    for name, (source, value) in derived.items():
        if name in model_raw and model_raw[name] != value:
            raise ConfigError(
                f"model.{name}={model_raw[name]} conflicts with {source}={value}"
                + (f" (data.transform={data.transform} crops)" if source == "data.crop_size" else "")
                + f"; model.{name} is set from {source}: set that one, or both to one value"
            )
    if derived["image_size"][1] % 32:
        raise ConfigError(
            f"{side_key}={derived['image_size'][1]} must be a multiple of 32 "
            "(the image tower's stride; the model is built for the training input side)"
        )
    return {name: value for name, (_source, value) in derived.items()}


def load_pretrain_config(path: str | Path | None, overrides: list[str]) -> PretrainConfig:
    raw = read_yaml(path) if path else {}
    return build_pretrain_config(apply_overrides(raw, overrides))
