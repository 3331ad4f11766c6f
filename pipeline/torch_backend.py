"""torch backend: DataLoader worker processes build whole batches of the plan.

Each worker reads its samples with pread at the index's offsets (no tar parsing, nothing extracted;
a batch's reads sorted by shard and offset, since a batch mixes shards), checks them (tar headers,
CRCs), decodes (DCT-domain scaling when the stored image is at least twice the needed size; with an
affine, OpenCV's imdecode straight to an array, else PIL), applies the geometry (one OpenCV warp
written straight into the sample's row of the batch tensor, allocated in shared memory up front: no
per-sample image, no collate copy / torchvision.transforms.v2.functional; masks nearest, boxes as
BoundingBoxes), and tokenises the batch's reports. Images stay uint8 until the last step: a batch
leaves the worker as uint8 [B, 1, H, W] with each sample's (brightness, contrast), 4x fewer bytes
through shared memory (and over PCIe) than float, and no fresh float pages to fault in per batch;
colour jitter + normalisation then run in the loader's device step, batched on the GPU
(`transforms.colour_normalise`) or as per-sample lookup tables on a CPU, into recycled buffers
(`transforms.CpuColourNormalise`). The small per-batch tensors (colour parameters, tokens) travel
pickled inline (`HostBatch.__getstate__`), only the images through shared memory.

Order: batch j of the plan is built by worker (j - first) % num_workers, and the DataLoader collects
from workers round-robin, so batches arrive in plan order for any worker count (the output does not
depend on num_workers).

Workers live as long as the loader (`persistent_workers`): forking and importing them cost 0.2-0.65 s
per epoch, 7% of a CPU training run with ~20-batch epochs. A worker learns which pass to build from
the shared-memory `position` (epoch, first batch), written by the loader before each pass, and
computes the rank's plan for that epoch itself (a pure function, ~5 ms for MIMIC's 377k samples).

GPU decode (`torch_gpu_decode` with CUDA): workers skip decoding and ship the JPEG bytes; the loader
decodes the batch with nvJPEG (torchvision.io.decode_jpeg(device="cuda")) and runs the same
torchvision geometry on the GPU tensors.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.backend import Backend
from pipeline.batch import (
    BackendOptions,
    HostBatch,
    LoaderStats,
    SampleError,
    SampleReader,
    boxes_of,
    decode_gray,
    open_gray,
    resolve_rows,
    text_and_meta,
)
from pipeline.config import DataConfig
from pipeline.plan import DatasetIndex, PlanArgs, RankPlan, ShardIndex
from pipeline.text import BatchTokenizer
from pipeline.transforms import (
    TransformSpec,
    apply_geometry,
    colour_params,
    draw_params,
    geometry_matrix,
    resized_size,
    transform_boxes,
    warp_tensors,
)

# The stages a sample goes through in a worker, in order (HostBatch.stage_s, bench-pipeline); jitter
# and normalisation follow in the loader's device step (pipeline/loader.py).
STAGES = ("read", "check", "params", "decode", "warp", "collate", "tokenise", "jitter_normalise")


class StageClock:
    """CPU seconds per stage of this thread (time.thread_time, ~0.8 us a call, so only when profiling:
    ~1.5% of a sample's cost otherwise). Disabled, `lap` only returns."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.seconds: Counter = Counter()
        self._last = time.thread_time() if enabled else 0.0

    def lap(self, stage: str) -> None:
        if self.enabled:
            now = time.thread_time()
            self.seconds[stage] += now - self._last
            self._last = now


class EpochBatches(IterableDataset):
    """The batches of one rank's plan from `position` = (epoch, first batch) on; each worker builds
    every num_workers-th batch."""

    def __init__(
        self, index: DatasetIndex, plan_args: PlanArgs, options: BackendOptions, tokenizer: BatchTokenizer | None
    ):
        self.index, self.plan_args, self.options, self.tokenizer = index, plan_args, options, tokenizer
        # Shared memory, created before the workers fork: they see every later write.
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()

    def set_position(self, epoch: int, first: int) -> None:
        self.position[0], self.position[1] = epoch, first

    def __iter__(self) -> Iterator[HostBatch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch, first = self.position.tolist()
        plan = self.plan_args.make(self.index, epoch)
        reader = SampleReader(self.index)
        try:
            for j in range(first + worker, len(plan), workers):
                yield self.build(plan, j, reader)
        finally:
            reader.close()

    def _draft_size(self, width: int, height: int) -> tuple[int, int]:
        return resized_size(self.options.spec, width, height)

    def _sample(
        self, shard: ShardIndex, row: int, epoch: int, reader: SampleReader, clock: StageClock, i: int, out: dict
    ) -> dict:
        """Read, check and decode one sample; its image (and mask) are warped straight into row `i` of
        the batch arrays `out` ("image", "mask": [n, c, c] uint8 views of the batch tensors)."""
        opt, spec = self.options, self.options.spec
        members = reader.read_row(shard, row, opt.exts)
        clock.lap("read")
        text, meta = text_and_meta(members)
        clock.lap("check")
        params = draw_params(spec, self.plan_args.seed, epoch, shard.keys[row])
        sample = {"text": text, "meta": meta, "params": params}
        clock.lap("params")
        size = opt.bounds.check(members["jpg"], "jpg", meta)  # header only: nothing decoded out of bounds
        if opt.gpu_decode:
            sample["size"] = size
            sample["jpeg"] = torch.frombuffer(bytearray(members["jpg"]), dtype=torch.uint8)
        else:
            # With an affine the warp takes the decoded array as it is; otherwise PIL's resize does.
            decode = decode_gray if spec.has_affine else open_gray
            img, sample["size"] = decode(members["jpg"], "jpg", self._draft_size)
            clock.lap("decode")
            apply_geometry(img, spec, params, *sample["size"], out=out["image"][i])  # [c, c] uint8
            clock.lap("warp")
        w, h = sample["size"]
        if opt.load_masks:
            opt.bounds.check(members["png"], "png", meta, expected=(w, h))
            mask, _ = open_gray(members["png"], "png")
            apply_geometry(mask, spec, params, w, h, nearest=True, out=out["mask"][i])
        if opt.load_boxes:
            sample["boxes"] = transform_boxes(boxes_of(meta), spec, params, w, h)
        clock.lap("warp")
        return sample

    def build(self, plan: RankPlan, j: int, reader: SampleReader) -> HostBatch:
        t0 = time.perf_counter()
        opt = self.options
        clock = StageClock(opt.profile)
        shared = get_worker_info() is not None
        batch = plan.batches[j]
        gids = batch.tolist()
        sids = self.index.shard_id(batch)  # one search for the batch
        located = [(self.index.shards[s], g - int(self.index.shard_start[s])) for s, g in zip(sids.tolist(), gids)]
        keys = [shard.keys[row] for shard, row in located]
        shards = [shard.name for shard, _ in located]
        # The batch tensors up front (shared memory in a worker), each sample warped into its row.
        side = opt.spec.out_size
        tensors = {
            name: _batch_tensor((len(gids), 1, side, side), torch.uint8, shared)  # [n, 1, c, c]
            for name, wanted in (("image", not opt.gpu_decode), ("mask", opt.load_masks))
            if wanted
        }
        rows_out = {name: t.numpy()[:, 0] for name, t in tensors.items()}
        rows: list[dict | None] = [None] * len(gids)
        reasons: list[str | None] = [None] * len(gids)
        # Read in (shard, offset) order: global ids are shard-major in file order, and a batch draws
        # from many shards.
        for i in sorted(range(len(gids)), key=gids.__getitem__):
            try:
                rows[i] = self._sample(*located[i], plan.epoch, reader, clock, i, rows_out)
            except SampleError as exc:
                reasons[i] = exc.reason
        errors = [
            {"gid": g, "key": k, "shard": s, "reason": r}
            for g, k, s, r in zip(gids, keys, shards, reasons)
            if r is not None
        ]
        keep, filled = resolve_rows([r is None for r in reasons], opt.keep_size)
        picked = [rows[i] for i in keep]
        hb = HostBatch(
            index=j,
            gids=[gids[i] for i in keep],
            keys=[keys[i] for i in keep],
            shards=[shards[i] for i in keep],
            texts=[r["text"] for r in picked],
            meta=[r["meta"] for r in picked],
            image=None,
            errors=errors,
            filled=filled,
        )
        if picked:
            params = [r["params"] for r in picked]
            hb.colour = colour_params(params) if opt.spec.has_jitter else None
            if keep != list(range(len(gids))):  # bad samples: their rows dropped (or refilled)
                tensors = {name: _select_rows(t, keep, shared) for name, t in tensors.items()}
            hb.image, hb.mask = tensors.get("image"), tensors.get("mask")  # [n, 1, c, c] uint8
            if opt.gpu_decode:
                hb.jpeg, hb.sizes, hb.params = [r["jpeg"] for r in picked], [r["size"] for r in picked], params
            if opt.load_boxes:
                hb.boxes = [r["boxes"] for r in picked]
            clock.lap("collate")
            if self.tokenizer is not None:
                hb.input_ids, hb.attention_mask, hb.tokenize_s = self.tokenizer(hb.texts)
                clock.lap("tokenise")
        hb.work_s = time.perf_counter() - t0
        hb.stage_s = dict(clock.seconds)
        return hb


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An output tensor; in a worker, allocated in shared memory up front (as default_collate does),
    so sending it to the loader process does not copy it there (25 MB per float batch of 32)."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape))
    return proto.new(storage).view(shape)


def _select_rows(t: torch.Tensor, rows: list[int], shared: bool) -> torch.Tensor:
    """Rows `rows` of a batch tensor (repeats allowed), into a new batch tensor."""
    out = _batch_tensor((len(rows),) + tuple(t.shape[1:]), t.dtype, shared)
    return torch.index_select(t, 0, torch.as_tensor(rows, dtype=torch.long), out=out)


def _identity(x):
    return x


def _freeze_inherited() -> None:
    """In every process forked from this one (the workers), first thing: move every object inherited
    from the parent out of the garbage collector's reach. Collecting an inherited garbage cycle that
    holds a DALI pipeline (another loader's, in the same process) runs its destructor against
    threads that do not exist in the fork: a segfault (seen). It also stops collections from
    touching, hence copying, the parent's pages."""
    gc.freeze()


os.register_at_fork(after_in_child=_freeze_inherited)


class TorchBatches:
    """The loader's worker pool: one DataLoader with persistent workers for the loader's lifetime;
    `iterate(epoch, first)` is one pass. Workers are shut down by `close` (or with the loader)."""

    def __init__(self, dataset: EpochBatches, max_batches: int):
        self.dataset = dataset
        opt = dataset.options
        self.workers = min(opt.workers, max_batches)
        self.loader = None
        if self.workers > 0:
            if dataset.tokenizer is not None:
                # The Rust tokenizer would print a fork warning in every worker if the parent already
                # used its thread pool; workers tokenise one batch each, so they need no pool.
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            # A private generator: DataLoader draws its workers' base seed from it, so starting the
            # workers never advances the global torch RNG (which would break exact resume;
            # augmentation is seeded per sample).
            self.loader = DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.workers,
                prefetch_factor=opt.prefetch,
                pin_memory=opt.device.type == "cuda",
                collate_fn=_identity,
                persistent_workers=True,
                generator=torch.Generator().manual_seed(0),
            )

    def iterate(self, plan: RankPlan, first: int) -> Iterator[HostBatch]:
        """Batches first.. of `plan`, in plan order (workers compute the plan of `plan.epoch`
        themselves). Stopping early is fine: the next pass first drains what the workers still had in
        flight (DataLoader's reset)."""
        self.dataset.set_position(plan.epoch, first)
        return iter(self.dataset if self.loader is None else self.loader)

    def close(self) -> None:
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()  # joined now, not at garbage collection
            self.loader._iterator = None


def gpu_decode(hb: HostBatch, spec: TransformSpec, device: torch.device, keep_size: bool) -> list[dict]:
    """nvJPEG-decode a GPU-mode batch in place (hb.image <- uint8 [B, 1, H, W] on `device`), with the
    geometry applied by the same torchvision calls on GPU tensors. Rows that fail are dropped/refilled
    like any bad sample; returns their error records."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        decoded = decode_jpeg(hb.jpeg, mode=ImageReadMode.GRAY, device=device)  # [1, h, w] each
        failed: dict[int, str] = {}
    except RuntimeError:
        # The batched call fails as a whole; decode one by one to find the culprit(s).
        decoded, failed = [], {}
        for i, data in enumerate(hb.jpeg):
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.GRAY, device=device))
            except RuntimeError as exc:
                decoded.append(None)
                failed[i] = f"jpg: nvJPEG cannot decode ({exc})"
    errors = [{"gid": hb.gids[i], "key": hb.keys[i], "shard": hb.shards[i], "reason": r} for i, r in failed.items()]
    keep, filled = resolve_rows([i not in failed for i in range(len(hb))], keep_size)
    hb.select(keep)
    hb.filled += filled
    if not keep:
        hb.image = torch.empty(0, 1, spec.out_size, spec.out_size, dtype=torch.uint8, device=device)
    elif spec.has_affine:  # g2d_train: the whole batch in one warp
        images = [decoded[i] for i in keep]
        matrices = np.stack([geometry_matrix(spec, p, x.shape[-1], x.shape[-2]) for x, p in zip(images, hb.params)])
        hb.image = warp_tensors(images, matrices, spec.out_size)  # [B, 1, out, out] uint8
    else:
        hb.image = torch.stack(
            [apply_geometry(decoded[i], spec, p, *size) for i, p, size in zip(keep, hb.params, hb.sizes)]
        )
    hb.jpeg = None
    return errors


class TorchBackend(Backend):
    """Local shards read by DataLoader workers (`EpochBatches`); with `data.torch_gpu_decode` and CUDA the
    workers ship JPEG bytes and the loader's device step decodes them (`gpu_decode`)."""

    name = "torch"

    def gpu_decode(self, cfg: DataConfig, cuda: bool) -> bool:
        return cuda and cfg.torch_gpu_decode

    def dataset(
        self, index: DatasetIndex, plan_args: PlanArgs, options: BackendOptions, tokenizer: BatchTokenizer | None
    ) -> EpochBatches:
        return EpochBatches(index, plan_args, options, tokenizer)

    def start(
        self,
        index: DatasetIndex,
        plan_args: PlanArgs,
        options: BackendOptions,
        tokenizer: BatchTokenizer | None,
        bad: dict[int, str],
        stats: LoaderStats,
        max_batches: int,
    ) -> TorchBatches:
        return TorchBatches(self.dataset(index, plan_args, options, tokenizer), max_batches)

    def device_step(self, hb: HostBatch, spec: TransformSpec, device: torch.device, keep_size: bool) -> list[dict]:
        return gpu_decode(hb, spec, device, keep_size) if hb.jpeg is not None else []
