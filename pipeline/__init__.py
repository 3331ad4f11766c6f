"""The data pipeline: packed WebDataset shards -> augmented, tokenised, device-resident batches.

    from pipeline import build_loader
    loader = build_loader(cfg.data, "train", dist, tokenizer)   # -> Loader
    loader.set_epoch(epoch)
    for batch in loader: ...                                   # Batch: image [B, C, H, W] on device, ...

Modules: config (DataConfig), plan (who reads what, per epoch and rank), transforms (the named
augmentations, shared by both backends), backend (the interface a backend implements), dali_backend /
torch_backend / stream (the backends), factory (build_loader: picks the backend), text (per-batch
tokenisation), batch (Batch, stats, bad-sample handling), loader (state, device step).
"""

from pipeline.batch import Batch, CorruptSampleError, LoaderStats
from pipeline.config import DataConfig
from pipeline.factory import build_loader
from pipeline.loader import CorruptSampleWarning, Loader

__all__ = ["Batch", "CorruptSampleError", "CorruptSampleWarning", "DataConfig", "Loader", "LoaderStats", "build_loader"]
