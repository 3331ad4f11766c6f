"""The data loader's config (`data:` section of a training/eval YAML).

Everything the loader does is decided here, so the same YAML gives the same batches on any machine
(up to the backend's interpolation rounding, see pipeline/transforms.py). Invalid values fail when the
config is built, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlparse

from common.config import ConfigError, at_least, check_fields, checked

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (resize mode, crop mode, degrees, shear, brightness, contrast, mean, std)
TRANSFORM_TABLE = {
    "g2d_train": ("squash", None, 15.0, 15.0, 0.2, 0.2, IMAGENET_MEAN, IMAGENET_STD),
    "g2d_paper": ("squash", "random", 0.0, 0.0, 0.0, 0.0, (0.0,), (1.0,)),
    "g2d_paper_eval": ("squash", "centre", 0.0, 0.0, 0.0, 0.0, (0.0,), (1.0,)),
    "mgca_train": ("longest_pad", "random", 0.0, 0.0, 0.0, 0.0, (0.5,), (0.5,)),
    "mgca_eval": ("longest_pad", "centre", 0.0, 0.0, 0.0, 0.0, (0.5,), (0.5,)),
    "eval": ("squash", None, 0.0, 0.0, 0.0, 0.0, IMAGENET_MEAN, IMAGENET_STD),
}
# The transform names and which of them crop (their output side is crop_size) follow from the table.
TRANSFORM_NAMES = tuple(TRANSFORM_TABLE)
CROPPING = tuple(name for name, row in TRANSFORM_TABLE.items() if row[1] is not None)


def is_deterministic(transform: str) -> bool:
    """True when `transform` maps one stored image to the same tensor every epoch (no random crop,
    rotation, shear or colour change), so whatever a frozen network computes from it can be kept.
    A name outside the table (e.g. an evaluation's `checkpoint` view, resolved later) counts as not."""
    if transform not in TRANSFORM_TABLE:
        return False
    _, crop, *amounts = TRANSFORM_TABLE[transform][:6]
    return crop != "random" and not any(amounts)


def is_url(shards: str) -> bool:
    """`data.shards` names remote shards (streamed, pipeline/stream.py) rather than a local dataset root:
    a `pipe:` command or a URL with a scheme (https://, s3://, file://, ...). A Windows drive letter
    (`C:/data`) is a path."""
    return shards.startswith("pipe:") or len(urlparse(shards).scheme) > 1


@dataclass
class DataConfig:
    shards: str = "data/shards/mimic"  # packed dataset root (holds manifest.json), or a URL spec (streaming)
    manifest: str | None = None  # streaming only: the manifest's URL (default: beside the shards)
    stream_lanes: int = at_least(1, 8)  # streaming: independent sequential readers per rank (workers divide it)
    stream_buffer: int = at_least(1, 1000)  # streaming: shuffle buffer per lane, in samples
    # Streaming: seconds one http(s)/pipe: transfer (a shard) may take.
    stream_deadline_s: float = checked(1800.0, "> 0 (seconds)", lambda v: v > 0)
    backend: Literal["auto", "dali", "torch"] = "auto"  # auto: dali with CUDA (if it imports), else torch
    batch_size_per_gpu: int = at_least(1, 128)
    num_workers: int = at_least(0, 8)  # torch: DataLoader worker processes; dali: CPU threads
    prefetch: int = at_least(1, 2)  # batches in flight per worker (torch) / DALI queue depth
    transform: str = "g2d_train"  # training transform, one of TRANSFORM_NAMES
    eval_transform: str = "eval"  # used by validation/eval code that swaps it in
    image_size: int = at_least(1, 256)  # side of the resized (square) image
    crop_size: int = at_least(1, 224)  # output side of the cropping transforms (g2d_paper*, mgca_*)
    channels: Literal[1, 3] = 3  # 3: the grey image replicated (G2D, ImageNet encoders)
    mean: list[float] | None = None  # per channel in [0, 1] units; None: the transform's own
    std: list[float] | None = None
    max_text_length: int = at_least(1, 256)  # tokens; batches are padded to their longest text, capped here
    text_padding: Literal["longest", "max_length"] = "longest"  # per batch | always max_length (G2D code)
    text_pad_multiple: int = at_least(1, 8)  # round the padded length up to this (tensor cores); 1 = off
    on_error: Literal["skip", "raise"] = "skip"  # a corrupt sample: skip it (recorded) or raise
    seed: int = 0  # shard order, sample order and augmentation draws
    shuffle: bool = True
    # Shuffle within windows of k shards (0: the whole split; streaming: 4 at once).
    shard_mix: int = at_least(0, 0, " (0: shuffle the whole split)")
    drop_last: bool = True  # training: every rank yields the same number of full batches
    subset: str | None = None  # data-efficiency fraction, e.g. "0.01": manifest["subsets"][split]
    subset_task: str | None = None  # take the subset from manifest["task_subsets"][task] instead
    # At most this many samples of the split (after the subset): those whose keys hash lowest, the same
    # ones for every seed and backend (plan.DatasetIndex.cap). 0 = all. E.g. a cheaper validation pass.
    max_samples: int = at_least(0, 0, " (0: the whole split)")
    load_masks: bool = False  # `<key>.png` -> Batch.mask, warped like the image
    load_boxes: bool = False  # json "boxes" -> Batch.boxes, transformed like the image
    torch_gpu_decode: bool = False  # torch backend + CUDA: nvJPEG via torchvision.io.decode_jpeg
    dali_decode: Literal["auto", "cpu"] = "auto"  # auto: nvJPEG ("mixed") when CUDA is available

    @property
    def train_side(self) -> int:
        """Side of the images the training transform yields: crop_size for the cropping transforms."""
        return self.crop_size if self.transform in CROPPING else self.image_size

    def __post_init__(self) -> None:
        # Floats here were never required to be finite (stream_deadline_s=inf passes): ranges only.
        check_fields(self, "data", finite=False)
        for key in ("transform", "eval_transform"):
            name = getattr(self, key)
            if name not in TRANSFORM_NAMES:
                raise ConfigError(f"data.{key}={name!r}; choose one of {TRANSFORM_NAMES}")
            if name in CROPPING and self.crop_size > self.image_size:
                raise ConfigError(
                    f"data.crop_size={self.crop_size} exceeds data.image_size={self.image_size} "
                    f"(data.{key}={name} crops)"
                )
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and len(value) not in (1, self.channels):
                raise ConfigError(
                    f"data.{key} has {len(value)} values; give 1 or {self.channels} (data.channels={self.channels})"
                )
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ConfigError(f"data.std={self.std} must be positive")
        if is_url(self.shards):
            if self.backend == "dali":
                raise ConfigError(
                    f"data.backend=dali needs local shard files (DALI reads members by offset); "
                    f"data.shards={self.shards!r} is streamed: use data.backend=torch (or auto)"
                )
        elif self.manifest is not None:
            raise ConfigError(
                f"data.manifest is for streamed shards; local shards read {self.shards}/manifest.json (unset it)"
            )
        if self.subset_task is not None and self.subset is None:
            raise ConfigError("data.subset_task needs data.subset (the fraction, e.g. '0.01')")
