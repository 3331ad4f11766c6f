"""`build_loader(cfg, split, dist, tokenizer)` -> `Loader`: the one entry point training and eval use, and
the one place that picks the backend (pipeline/backend.py):

    data.shards a URL spec (https://, pipe:, s3://, file://)   streamed tars, torch workers (stream.py)
    data.backend=auto                                          DALI with CUDA when it imports, else torch
    data.backend=dali | torch                                  that one (dali must import)
"""

from __future__ import annotations

from common.config import ConfigError
from common.dist import DistInfo
from pipeline.backend import Backend
from pipeline.config import DataConfig, is_url
from pipeline.dali_backend import DaliBackend, dali_available
from pipeline.loader import Loader
from pipeline.stream import StreamBackend
from pipeline.torch_backend import TorchBackend


def choose_backend(cfg: DataConfig, cuda: bool) -> Backend:
    if is_url(cfg.shards):
        if cfg.backend == "dali":  # DataConfig refuses it too; a config built around the check still fails here
            raise ConfigError("data.backend=dali needs local shard files (DALI reads by offset); use torch")
        return StreamBackend(cfg)
    if cfg.backend == "auto":
        # DALI's strength is nvJPEG + GPU augmentation; its CPU operators are slower than PIL
        # (CPU warp_affine ~5x, docs/performance.md), so without a GPU the torch workers win.
        return DaliBackend() if cuda and dali_available() else TorchBackend()
    if cfg.backend == "dali":
        if not dali_available():
            raise RuntimeError(
                "data.backend=dali but nvidia.dali (with its PyTorch plugin) does not import; "
                "install nvidia-dali-cuda130 or use data.backend=torch"
            )
        return DaliBackend()
    return TorchBackend()


def build_loader(cfg: DataConfig, split: str, dist: DistInfo, tokenizer=None, profile: bool = False) -> Loader:
    """The loader of `split` for this rank. Fails at once (naming the path) if the manifest, a shard
    or an index it names is missing. `profile`: workers time each stage (stats.stage_s; costs ~1.5%).
    A URL spec in `data.shards` (https://, pipe:, s3://, ...) streams the tars (pipeline/stream.py)."""
    return Loader(cfg, split, dist, choose_backend(cfg, dist.device.type == "cuda"), tokenizer, profile)
