"""The pretraining run's config: one dataclass per component, composed into `PretrainConfig`.

YAML files in configs/pretrain/ fill it; `key.sub=value` arguments override it; the resolved result
is saved as `<output_dir>/config.yaml` and inside every checkpoint, and eval rebuilds the model
from that saved `model` section and the image side and token cap its `data` section gives.
Each value is stored once (the `data` and `model` sections lack the fields another section decides);
the loader and the model take the derived views `resolved_data` / `resolved_model`.
`model.name` picks a registered base config (model/registry.py); the other `model.*` keys override it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from common.config import (
    ConfigError,
    apply_overrides,
    at_least,
    check_field,
    check_fields,
    checked,
    config_from_dict,
    config_to_dict,
    one_of,
    read_yaml,
)
from model.config import DATA_DERIVED_FIELDS, ModelConfig, data_derived_fields
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
    batch_size_per_gpu: int = at_least(1, 128)  # the loader's batch (resolved_data carries it)
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


def _stored_section(cls: type, derived: tuple[str, ...], name: str) -> type:
    """Dataclass `cls` without the fields `derived` (another section decides them): the section as a
    pretraining config stores it, so those keys are stored once and a reader cannot take a stale copy.
    Defaults and declared checks are `cls`'s own."""
    hints = typing.get_type_hints(cls)
    fields = [
        (f.name, hints[f.name], field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
        for f in dataclasses.fields(cls)
        if f.name not in derived
    ]
    return dataclasses.make_dataclass(name, fields, namespace={"__module__": __name__})


# The loader's batch size and seed are train.batch_size_per_gpu / train.seed; the model's image_size and
# max_text_length follow from the data section (model.config.data_derived_fields).
DATA_FROM_TRAIN = ("batch_size_per_gpu", "seed")
DataSection = _stored_section(DataConfig, DATA_FROM_TRAIN, "DataSection")
ModelSection = _stored_section(ModelConfig, DATA_DERIVED_FIELDS, "ModelSection")


def _fields_of(section) -> dict:
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


@dataclass
class PretrainConfig:
    """Each value once. `resolved_data` / `resolved_model` are the views the loader and the model take,
    derived on every read (never stored, so never stale)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)

    @property
    def resolved_data(self) -> DataConfig:
        """The loader's config: the data section with train.batch_size_per_gpu and train.seed."""
        return DataConfig(
            **_fields_of(self.data), batch_size_per_gpu=self.train.batch_size_per_gpu, seed=self.train.seed
        )

    @property
    def resolved_model(self) -> ModelConfig:
        """The model's config: the model section with the fields the data section decides."""
        return ModelConfig(**_fields_of(self.model), **data_derived_fields(self.resolved_data))


def validate_pretrain_config(cfg: PretrainConfig) -> None:
    """Raise ConfigError naming the first key outside its declared domain or a non-finite float."""
    if not cfg.train.output_dir.strip():
        # Path("") is the current directory: checkpoints would land wherever the command ran.
        raise ConfigError("train.output_dir is empty; name the run's folder, e.g. runs/pretrain")
    check_fields(cfg.train, "train")
    check_fields(cfg.optim, "optim")


def _section(raw: dict, name: str) -> dict:
    """raw[name] as a dict; a scalar where a section belongs (`model=5`) is a ConfigError."""
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a mapping of {name}.* keys, got {value!r}")
    return value


def _drop_derived(section: dict, keys: tuple[str, ...]) -> tuple[dict, dict]:
    """(section without `keys`, the ones it gave): a derived key is not stored, only checked."""
    return {k: v for k, v in section.items() if k not in keys}, {k: section[k] for k in keys if k in section}


def build_pretrain_config(raw: dict) -> PretrainConfig:
    """A PretrainConfig from a nested dict (defaults <- file <- overrides), checked.

    A derived key (data.batch_size_per_gpu, data.seed, model.image_size, model.max_text_length) is not
    a setting: saved configs of older runs carry it, so it is accepted when it equals the value it is
    derived from and dropped; another value is a ConfigError naming both keys."""
    raw = dict(raw)
    model_raw, model_given = _drop_derived(_section(raw, "model"), DATA_DERIVED_FIELDS)
    data_raw, data_given = _drop_derived(_section(raw, "data"), DATA_FROM_TRAIN)
    name = model_raw.get("name", ModelConfig.name)
    if not isinstance(name, str) or name not in MODEL_CONFIGS:
        raise ConfigError(f"model.name={name!r} is not a registered model; choose one of {sorted(MODEL_CONFIGS)}")
    base, _ = _drop_derived(config_to_dict(model_config(name)), DATA_DERIVED_FIELDS)
    cfg = config_from_dict(PretrainConfig, {**raw, "model": {**base, **model_raw}, "data": data_raw})
    for key, value in data_given.items():
        if value != getattr(cfg.train, key):
            raise ConfigError(
                f"data.{key}={value} conflicts with train.{key}={getattr(cfg.train, key)}; "
                f"data.{key} is set from train.{key}"
            )
    # The train section first: a bad batch size is train.batch_size_per_gpu's fault.
    validate_pretrain_config(cfg)
    _check_model_view(cfg.resolved_data, model_given)
    check_fields(cfg.resolved_model, "model")
    return cfg


def _check_model_view(data: DataConfig, model_given: dict) -> None:
    """A model.* key the data section decides must match it (named with both keys), and the training
    side must suit the image tower's stride."""
    side_key = "data.crop_size" if data.transform in CROPPING else "data.image_size"
    derived = data_derived_fields(data)
    sources = {"image_size": side_key, "max_text_length": "data.max_text_length"}
    for name, value in model_given.items():
        check_field(ModelConfig, name, value, "model")
        if value != derived[name]:
            source = sources[name]
            raise ConfigError(
                f"model.{name}={value} conflicts with {source}={derived[name]}"
                + (f" (data.transform={data.transform} crops)" if source == "data.crop_size" else "")
                + f"; model.{name} is set from {source}: set that one, or both to one value"
            )
    if derived["image_size"] % 32:
        raise ConfigError(
            f"{side_key}={derived['image_size']} must be a multiple of 32 "
            "(the image tower's stride; the model is built for the training input side)"
        )


def load_pretrain_config(path: str | Path | None, overrides: list[str]) -> PretrainConfig:
    raw = read_yaml(path) if path else {}
    return build_pretrain_config(apply_overrides(raw, overrides))
