"""`Loader`: the epoch/position state and the device step, the same whichever backend turns a plan into
host batches (built by `pipeline.factory.build_loader`, the one entry point training and eval use):

    plan (pipeline/plan.py) -> backend (pipeline/backend.py) -> HostBatch -> [device step] -> Batch

The device step moves what is still on the host to `dist.device` (non-blocking from pinned memory on
CUDA), lets the backend finish what it left for the device (`Backend.device_step`: the torch
backend's nvJPEG decode), and for the torch backend applies colour jitter + normalisation there:
batched on a GPU, per-sample lookup tables on a CPU (`transforms.colour_normalise_cpu`). DALI batches
arrive normalised (on the GPU when DALI decodes there). The backend's workers (torch) or pipeline
(DALI) persist across epochs; `close()` ends them.

Iteration protocol (same as a DataLoader with a DistributedSampler): `set_epoch(e)` then iterate;
`state_dict()` is {epoch, batches consumed}; after `load_state_dict` the next iteration yields exactly
the batches not consumed yet (none if the epoch was complete - the caller then moves to the next epoch
with `set_epoch`). A finished pass iterated again replays the same epoch.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator

from common.config import ConfigError
from common.dist import DistInfo
from pipeline.backend import Backend, BatchPool
from pipeline.batch import BackendOptions, Batch, CorruptSampleError, HostBatch, ImageBounds, LoaderStats
from pipeline.config import DataConfig
from pipeline.plan import PlanArgs, RankPlan, num_batches
from pipeline.text import BatchTokenizer
from pipeline.transforms import CpuColourNormalise, build_spec, colour_normalise
from shards.schema import STALE_INDEX, ManifestError


class CorruptSampleWarning(UserWarning):
    pass


class Loader:
    def __init__(
        self, cfg: DataConfig, split: str, dist: DistInfo, backend: Backend, tokenizer=None, profile: bool = False
    ):
        self.cfg, self.split, self.dist, self.profile = cfg, split, dist, profile
        self.device = dist.device
        self._backend = backend
        self.backend = backend.name  # "torch" | "dali"
        self.index = backend.open_index(cfg, split)
        if cfg.max_samples:
            self.index.cap(cfg.max_samples)
        self.spec = build_spec(cfg, cfg.transform)
        self.tokenizer = (
            BatchTokenizer(tokenizer, cfg.max_text_length, cfg.text_pad_multiple, cfg.text_padding)
            if tokenizer
            else None
        )
        self.options = BackendOptions(  # what either backend needs to know, decided once
            spec=self.spec,
            seed=cfg.seed,
            batch_size=cfg.batch_size_per_gpu,
            workers=cfg.num_workers,
            prefetch=cfg.prefetch,
            keep_size=cfg.drop_last,
            on_error=cfg.on_error,
            load_masks=cfg.load_masks,
            load_boxes=cfg.load_boxes,
            device=dist.device,
            gpu_decode=backend.gpu_decode(cfg, dist.device.type == "cuda"),
            profile=profile,
            bounds=ImageBounds.of_manifest(self.index.manifest),
        )
        self._cpu_colour = CpuColourNormalise(self.spec)  # the torch backend's device step without a GPU
        self.stats = LoaderStats()
        self.epoch = 0
        self._consumed = 0  # batches of `epoch` handed to the consumer
        self._pass_done = False  # this process finished a pass over `epoch`
        self._bad: dict[int, str] = {}  # global id -> reason, for samples found unreadable
        self._warned: set[int] = set()
        self.plan_args = backend.plan_args(
            PlanArgs(
                cfg.seed, dist.rank, dist.world_size, cfg.batch_size_per_gpu, cfg.shuffle, cfg.drop_last, cfg.shard_mix
            ),
            cfg,
        )
        self._workers: BatchPool | None = None  # the backend's persistent part, on first use
        self._length = num_batches(
            self.index.num_selected, dist.rank, dist.world_size, cfg.batch_size_per_gpu, cfg.drop_last
        )
        if self._length == 0 and cfg.drop_last:
            # Training needs a full batch on every rank; the knob users set is train.batch_size_per_gpu
            # (copied into data), and a smaller dataset than one batch is their data or their setting.
            ranks = f" per rank x {dist.world_size} ranks" if dist.world_size > 1 else ""
            raise ConfigError(
                f"batch_size_per_gpu={cfg.batch_size_per_gpu}{ranks} needs at least "
                f"{cfg.batch_size_per_gpu * dist.world_size} samples, but split {split!r} of {cfg.shards} has "
                f"{self.index.num_selected}: lower train.batch_size_per_gpu (or give more data)"
            )

    # ---- state --------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank with drop_last)."""
        return self._length

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._consumed, self._pass_done = int(epoch), 0, False

    def state_dict(self) -> dict:
        return {
            **self._backend.resume_state(self.index, self.plan_args),
            "epoch": self.epoch,
            "batches": self._consumed,
            "world_size": self.dist.world_size,
            "batch_size": self.cfg.batch_size_per_gpu,
            "seed": self.cfg.seed,
            "split": self.split,
            "num_samples": self.index.num_selected,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._consumed, self._pass_done = int(state["epoch"]), int(state["batches"]), False
        same = all(
            state.get(k) == v
            for k, v in (
                ("world_size", self.dist.world_size),
                ("batch_size", self.cfg.batch_size_per_gpu),
                ("seed", self.cfg.seed),
                ("num_samples", self.index.num_selected),
            )
        )
        if not same and self._consumed:
            # The plan depends on all of these: the saved position means other samples now. Replaying
            # the epoch from its start is the closest honest continuation.
            warnings.warn(
                f"loader state saved with world_size={state.get('world_size')}, batch_size="
                f"{state.get('batch_size')}, seed={state.get('seed')}, num_samples="
                f"{state.get('num_samples')}; now {self.dist.world_size}, {self.cfg.batch_size_per_gpu}, "
                f"{self.cfg.seed}, {self.index.num_selected}: restarting epoch {self.epoch} from "
                "its first batch",
                stacklevel=2,
            )
            self._consumed = 0
        for key, now in self._backend.resume_state(self.index, self.plan_args).items():
            if self._consumed and state.get(key) != now:
                warnings.warn(
                    f"loader state saved with {key} settings {state.get(key)}, now {now}: restarting epoch "
                    f"{self.epoch} from its first batch",
                    stacklevel=2,
                )
                self._consumed = 0
        self._consumed = min(self._consumed, len(self))

    # ---- iteration ----------------------------------------------------------------------------
    def plan(self, epoch: int | None = None) -> RankPlan:
        """This rank's plan for `epoch` (default: the current one)."""
        return self.plan_args.make(self.index, self.epoch if epoch is None else epoch)

    def _host_batches(self, plan: RankPlan, first: int) -> Iterator[HostBatch]:
        if self._workers is None:
            self._workers = self._backend.start(
                self.index, self.plan_args, self.options, self.tokenizer, self._bad, self.stats, len(plan)
            )
        return self._workers.iterate(plan, first)

    def close(self) -> None:
        """Shut the worker processes down now (they otherwise live as long as the loader)."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    def __iter__(self) -> Iterator[Batch]:
        if self._pass_done and self._consumed >= len(self):
            self._consumed, self._pass_done = 0, False
        plan = self.plan()
        first = self._consumed
        source = self._host_batches(plan, first)
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    hb = next(source)
                except StopIteration:
                    break
                batch = self._finish(hb)
                self.stats.data_wait_s += time.perf_counter() - t0
                self._consumed = hb.index + 1
                if batch is not None:
                    yield batch
            self._consumed = len(self)
            self._pass_done = True
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def _record_errors(self, errors: list[dict]) -> None:
        for err in errors:
            if err["reason"].startswith(STALE_INDEX):
                # Not one damaged sample: the shard's index belongs to another packing, so every
                # sample read through it is suspect. Skipping would silently drop the shard.
                raise ManifestError(err["reason"])
            if self.cfg.on_error == "raise":
                raise CorruptSampleError(f"{self.index.root / err['shard']}: sample {err['key']}: {err['reason']}")
            gid = err["gid"]
            self._bad.setdefault(gid, err["reason"])
            self.stats.skipped += 1
            self.stats.skipped_by_reason[err["reason"].split(":", 1)[0]] += 1
            self.stats.skipped_samples.append(
                {"key": err["key"], "shard": err["shard"], "reason": err["reason"], "epoch": self.epoch}
            )
            if gid not in self._warned:
                self._warned.add(gid)
                warnings.warn(
                    f"skipping unreadable sample {err['key']} in {err['shard']}: {err['reason']}",
                    CorruptSampleWarning,
                    stacklevel=3,
                )

    def _finish(self, hb: HostBatch) -> Batch | None:
        """Host batch -> device Batch (None when every sample of it was unreadable, eval only)."""
        self._record_errors(hb.errors)
        self.stats.tokenize_s += hb.tokenize_s
        self.stats.worker_s += hb.work_s
        self.stats.stage_s.update(hb.stage_s)
        device = self.device
        if len(hb):
            self._record_errors(self._backend.device_step(hb, self.spec, device, keep_size=self.cfg.drop_last))
        if len(hb) == 0:
            if self.cfg.drop_last:
                raise CorruptSampleError(
                    f"every sample of batch {hb.index} is unreadable "
                    f"({hb.errors[0]['shard']}: {hb.errors[0]['reason']}); cannot refill it"
                )
            return None
        nb = device.type == "cuda"
        image = hb.image.to(device, non_blocking=nb)
        t_colour = time.thread_time() if self.profile else 0.0
        if not hb.normalised and device.type == "cpu":
            image = self._cpu_colour(image, hb.colour)  # [B, C, H, W] float32
        elif not hb.normalised:
            colour = hb.colour.to(device, non_blocking=nb) if hb.colour is not None else None
            image = colour_normalise(image, colour, self.spec)  # [B, C, H, W] float32
        if self.profile:
            self.stats.stage_s["jitter_normalise"] += time.thread_time() - t_colour
        batch = Batch(image=image, keys=hb.keys, meta=hb.meta, texts=hb.texts)
        if hb.input_ids is not None:
            batch.input_ids = hb.input_ids.to(device, non_blocking=nb)
            batch.attention_mask = hb.attention_mask.to(device, non_blocking=nb)
        if hb.mask is not None:
            batch.mask = (hb.mask.to(device, non_blocking=nb) > 127).float()  # [B, 1, H, W] {0, 1}
        if hb.boxes is not None:
            batch.boxes = [b.to(device, non_blocking=nb) for b in hb.boxes]
        self.stats.batches += 1
        self.stats.samples += len(hb)
        self.stats.filled += hb.filled
        return batch
