"""The backend interface: everything the backend-neutral loader (pipeline/loader.py) asks of a backend.

    open_index(cfg, split)      the split's index (plan.DatasetIndex, or stream.StreamIndex)
    plan_args(args, cfg)        the plan's arguments (plan.PlanArgs, or stream.StreamArgs with lanes)
    gpu_decode(cfg, cuda)       whether samples are decoded on the GPU (BackendOptions.gpu_decode)
    start(...)                  the persistent part (worker pool, DALI pipeline), built on first use:
                                `iterate(plan, first)` -> HostBatch in plan order; `close()`
    device_step(hb, ...)        the backend's share of the loader's device step (torch: nvJPEG decode of
                                a GPU-decode batch); returns the error records of rows it dropped
    resume_state(index, args)   what besides (epoch, batches) a saved position depends on

The implementations: torch_backend.TorchBackend (local, DataLoader workers), dali_backend.DaliBackend
(local, DALI graph), stream.StreamBackend (streamed tars, torch workers); pipeline/factory.py picks
one. Backends import this module and never the loader, so pipeline/ has no import cycle
(tests/test_pipeline.py checks the graph).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from pipeline.batch import BackendOptions, HostBatch, LoaderStats
from pipeline.config import DataConfig
from pipeline.plan import DatasetIndex, PlanArgs, RankPlan
from pipeline.text import BatchTokenizer
from pipeline.transforms import TransformSpec


class BatchPool(Protocol):
    """A backend's persistent part, alive from the loader's first pass to `Loader.close`."""

    def iterate(self, plan: RankPlan, first: int) -> Iterator[HostBatch]: ...

    def close(self) -> None: ...


class Backend:
    """Defaults shared by the local backends; a backend overrides what differs."""

    name = "torch"  # what Loader.backend reports

    def open_index(self, cfg: DataConfig, split: str) -> DatasetIndex:
        return DatasetIndex(cfg.shards, split, cfg.subset, cfg.subset_task, need_masks=cfg.load_masks)

    def plan_args(self, args: PlanArgs, cfg: DataConfig) -> PlanArgs:
        return args

    def gpu_decode(self, cfg: DataConfig, cuda: bool) -> bool:
        raise NotImplementedError

    def start(
        self,
        index: DatasetIndex,
        plan_args: PlanArgs,
        options: BackendOptions,
        tokenizer: BatchTokenizer | None,
        bad: dict[int, str],
        stats: LoaderStats,
        max_batches: int,
    ) -> BatchPool:
        raise NotImplementedError

    def device_step(self, hb: HostBatch, spec: TransformSpec, device: torch.device, keep_size: bool) -> list[dict]:
        return []

    def resume_state(self, index: DatasetIndex, plan_args: PlanArgs) -> dict:
        return {}
