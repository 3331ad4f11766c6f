"""The config of an evaluation task: the sections every task shares.

A task config is a dataclass (`TaskConfig` + the family's own section) filled from
configs/eval/<task>.yaml, then `fraction_overrides[<fraction>]` from that file, then `key=value`
arguments (strict: an unknown key is an error naming it). Data loading: eval/tasks/data.py; the
training loop: eval/tasks/fit.py; figures: eval/plots.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.config import at_least


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
    # Validate (early stopping, the kept epoch) on at most this many images of the valid split, the
    # same ones for every seed and checkpoint (data.max_samples' key-hash pick); 0 = all, as MGCA.
    # A validation pass runs every epoch, so on a large valid split and a small training subset it is
    # most of a run's cost.
    valid_max_images: int = at_least(0, 0, " (0: the whole valid split)")


@dataclass
class TrainSection:
    epochs: int = 50
    patience: int = 10  # early stopping: epochs without a better validation loss (detection: mAP); MGCA: 10
    lr: float = 5e-4
    weight_decay: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    precision: Literal["bf16", "fp32"] = "bf16"  # autocast dtype on CUDA; on CPU only with cpu_bf16
    # bf16 autocast on CPU too: oneDNN's AMX / AVX512-BF16 kernels, 2-3x faster per step on CPUs that
    # have them (docs/quality.md, "Cost"), much slower on CPUs that do not; off, CPU runs fp32.
    cpu_bf16: bool = False
    channels_last: bool = False  # NHWC models: oneDNN's fast path for bf16 convolutions (and cuDNN's)

    def autocast_precision(self, device) -> str:
        """The precision the task runs at on `device`: bf16 on CUDA, and on CPU only with cpu_bf16."""
        return self.precision if device.type == "cuda" or self.cpu_bf16 else "fp32"


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
