"""`build_loader(cfg, split, dist, tokenizer)` -> `Loader`: the one entry point training and eval use.

The loader owns the epoch/position state and the device step; the backends (DALI or torch) only turn
a plan into host batches:

    plan (pipeline/plan.py) -> backend -> HostBatch -> [device step] -> Batch

The device step moves what is still on the host to `dist.device` (non-blocking from pinned memory on
CUDA), and for the torch backend applies colour jitter + normalisation there: batched on a GPU,
per-sample lookup tables on a CPU (`transforms.colour_normalise_cpu`). DALI batches arrive
normalised (on the GPU when DALI decodes there). The backend's workers (torch) or pipeline (DALI)
persist across epochs; `close()` ends them.

Iteration protocol (same as a DataLoader with a DistributedSampler): `set_epoch(e)` then iterate;
`state_dict()` is {epoch, batches consumed}; after `load_state_dict` the next iteration yields exactly
the batches not consumed yet (none if the epoch was complete - the caller then moves to the next epoch
with `set_epoch`). A finished pass iterated again replays the same epoch.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator

from common.dist import DistInfo
from pipeline.batch import BackendOptions, Batch, CorruptSampleError, HostBatch, LoaderStats
from pipeline.config import DataConfig, is_url
from pipeline.plan import DatasetIndex, PlanArgs, RankPlan, num_batches
from pipeline.text import BatchTokenizer
from pipeline.transforms import CpuColourNormalise, build_spec, colour_normalise
from shards.schema import STALE_INDEX, ManifestError


class CorruptSampleWarning(UserWarning):
    pass


class Loader:
    def __init__(self, cfg: DataConfig, split: str, dist: DistInfo, tokenizer=None, profile: bool = False):
        self.cfg, self.split, self.dist, self.profile = cfg, split, dist, profile
        self.device = dist.device
        self.index = self._open_index()
        self.spec = build_spec(cfg, cfg.transform)
        self.tokenizer = (
            BatchTokenizer(tokenizer, cfg.max_text_length, cfg.text_pad_multiple, cfg.text_padding)
            if tokenizer
            else None
        )
        self.backend = self._choose_backend(cfg.backend, dist.device.type == "cuda")
        cuda = dist.device.type == "cuda"
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
            gpu_decode=cuda and (cfg.dali_decode == "auto" if self.backend == "dali" else cfg.torch_gpu_decode),
            profile=profile,
        )
        self._cpu_colour = CpuColourNormalise(self.spec)  # the torch backend's device step without a GPU
        self.stats = LoaderStats()
        self.epoch = 0
        self._consumed = 0  # batches of `epoch` handed to the consumer
        self._pass_done = False  # this process finished a pass over `epoch`
        self._bad: dict[int, str] = {}  # global id -> reason, for samples found unreadable
        self._warned: set[int] = set()
        self.plan_args = PlanArgs(
            cfg.seed, dist.rank, dist.world_size, cfg.batch_size_per_gpu, cfg.shuffle, cfg.drop_last, cfg.shard_mix
        )
        self._workers = None  # the backend's persistent part (TorchBatches | DaliBatches), on first use
        self._length = num_batches(
            self.index.num_selected, dist.rank, dist.world_size, cfg.batch_size_per_gpu, cfg.drop_last
        )
        if self._length == 0 and cfg.drop_last:
            raise ValueError(
                f"split {split!r} of {cfg.shards} has {self.index.num_selected} selected samples: "
                f"not one full batch of {cfg.batch_size_per_gpu} per rank x {dist.world_size} ranks"
            )

    def _open_index(self) -> DatasetIndex:
        cfg = self.cfg
        return DatasetIndex(cfg.shards, self.split, cfg.subset, cfg.subset_task, need_masks=cfg.load_masks)

    @staticmethod
    def _choose_backend(name: str, cuda: bool) -> str:
        from pipeline.dali_backend import dali_available

        if name == "auto":
            # DALI's strength is nvJPEG + GPU augmentation; its CPU operators are slower than PIL
            # (CPU warp_affine ~5x, docs/performance.md), so without a GPU the torch workers win.
            return "dali" if cuda and dali_available() else "torch"
        if name == "dali" and not dali_available():
            raise RuntimeError(
                "data.backend=dali but nvidia.dali (with its PyTorch plugin) does not import; "
                "install nvidia-dali-cuda130 or use data.backend=torch"
            )
        return name

    # ---- state --------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank with drop_last)."""
        return self._length

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._consumed, self._pass_done = int(epoch), 0, False

    def state_dict(self) -> dict:
        return {
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
        self._consumed = min(self._consumed, len(self))

    # ---- iteration ----------------------------------------------------------------------------
    def plan(self, epoch: int | None = None) -> RankPlan:
        """This rank's plan for `epoch` (default: the current one)."""
        return self.plan_args.make(self.index, self.epoch if epoch is None else epoch)

    def _host_batches(self, plan: RankPlan, first: int) -> Iterator[HostBatch]:
        if self.backend == "dali":
            if self._workers is None:
                from pipeline.dali_backend import DaliBatches

                self._workers = DaliBatches(self.index, self.options, self.tokenizer, self._bad, self.stats)
            return self._workers.iterate(plan, first)
        if self._workers is None:
            from pipeline.torch_backend import EpochBatches, TorchBatches

            dataset = EpochBatches(self.index, self.plan_args, self.options, self.tokenizer)
            self._workers = TorchBatches(dataset, max_batches=len(plan))
        return self._workers.iterate(plan.epoch, first)

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
        if hb.jpeg is not None and len(hb):
            from pipeline.torch_backend import gpu_decode

            self._record_errors(gpu_decode(hb, self.spec, device, keep_size=self.cfg.drop_last))
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


def build_loader(cfg: DataConfig, split: str, dist: DistInfo, tokenizer=None, profile: bool = False) -> Loader:
    """The loader of `split` for this rank. Fails at once (naming the path) if the manifest, a shard
    or an index it names is missing. `profile`: workers time each stage (stats.stage_s; costs ~1.5%).
    A URL spec in `data.shards` (https://, pipe:, s3://, ...) streams the tars (pipeline/stream.py)."""
    if is_url(cfg.shards):
        from pipeline.stream import StreamLoader  # imports this module

        return StreamLoader(cfg, split, dist, tokenizer, profile)
    return Loader(cfg, split, dist, tokenizer, profile)
