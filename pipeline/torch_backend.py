"""torch backend: DataLoader worker processes build whole batches of the plan.

Each worker reads its samples with pread at the index's offsets (no tar parsing, nothing extracted;
a batch's reads sorted by shard and offset, since a batch mixes shards), checks them (tar headers,
CRCs), decodes with PIL (DCT-domain draft when the stored image is at least twice the needed size),
applies the geometry (OpenCV warp / torchvision.transforms.v2.functional; masks nearest, boxes as
BoundingBoxes), and tokenises the batch's reports. Images stay uint8 until the last step: a batch
leaves the worker as uint8 [B, 1, H, W] with each sample's (brightness, contrast), 4x fewer bytes
through shared memory (and over PCIe) than float, and no fresh float pages to fault in per batch;
colour jitter + normalisation then run in the loader's device step, batched on the GPU
(`transforms.colour_normalise`) or as per-sample lookup tables on a CPU
(`transforms.colour_normalise_cpu`).

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

from pipeline.batch import (
    HostBatch,
    SampleError,
    SampleReader,
    boxes_of,
    open_gray,
    peek_size,
    resolve_rows,
    text_and_meta,
)
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
        self,
        index: DatasetIndex,
        plan_args: PlanArgs,
        spec: TransformSpec,
        tokenizer: BatchTokenizer | None,
        keep_size: bool,
        load_masks: bool,
        load_boxes: bool,
        gpu_decode: bool,
        profile: bool = False,
    ):
        self.index, self.plan_args, self.spec, self.tokenizer = index, plan_args, spec, tokenizer
        self.keep_size, self.load_masks, self.load_boxes = keep_size, load_masks, load_boxes
        self.gpu_decode, self.profile = gpu_decode, profile
        self.exts = ("jpg", "txt", "json") + (("png",) if load_masks else ())
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
        return resized_size(self.spec, width, height)

    def _sample(self, shard: ShardIndex, row: int, epoch: int, reader: SampleReader, clock: StageClock) -> dict:
        key = shard.keys[row]
        members = reader.read_row(shard, row, self.exts)
        clock.lap("read")
        text, meta = text_and_meta(members)
        clock.lap("check")
        out = {"text": text, "meta": meta, "params": draw_params(self.spec, self.plan_args.seed, epoch, key)}
        clock.lap("params")
        if self.gpu_decode:
            out["size"] = peek_size(members["jpg"], "jpg")
            out["jpeg"] = torch.frombuffer(bytearray(members["jpg"]), dtype=torch.uint8)
        else:
            img, out["size"] = open_gray(members["jpg"], "jpg", self._draft_size)
            clock.lap("decode")
            out["image"] = np.asarray(apply_geometry(img, self.spec, out["params"], *out["size"]))  # [H, W] u8
            clock.lap("warp")
        w, h = out["size"]
        if self.load_masks:
            mask, mask_size = open_gray(members["png"], "png")
            if mask_size != (w, h):
                raise SampleError(f"png: mask is {mask_size}, image is {(w, h)}")
            out["mask"] = np.asarray(apply_geometry(mask, self.spec, out["params"], w, h, nearest=True))
        if self.load_boxes:
            out["boxes"] = transform_boxes(boxes_of(out["meta"]), self.spec, out["params"], w, h)
        clock.lap("warp")
        return out

    @staticmethod
    def _stack(arrays: list[np.ndarray], shared: bool) -> torch.Tensor:
        out = _batch_tensor((len(arrays), 1) + arrays[0].shape, torch.uint8, shared)  # [n, 1, H, W]
        np.stack(arrays, out=out.numpy()[:, 0])
        return out

    def build(self, plan: RankPlan, j: int, reader: SampleReader) -> HostBatch:
        t0 = time.perf_counter()
        clock = StageClock(self.profile)
        shared = get_worker_info() is not None
        batch = plan.batches[j]
        gids = batch.tolist()
        sids = self.index.shard_id(batch)  # one search for the batch
        located = [(self.index.shards[s], g - int(self.index.shard_start[s])) for s, g in zip(sids.tolist(), gids)]
        keys = [shard.keys[row] for shard, row in located]
        shards = [shard.name for shard, _ in located]
        rows: list[dict | None] = [None] * len(gids)
        reasons: list[str | None] = [None] * len(gids)
        # Read in (shard, offset) order: global ids are shard-major in file order, and a batch draws
        # from many shards.
        for i in sorted(range(len(gids)), key=gids.__getitem__):
            try:
                rows[i] = self._sample(*located[i], plan.epoch, reader, clock)
            except SampleError as exc:
                reasons[i] = exc.reason
        errors = [
            {"gid": g, "key": k, "shard": s, "reason": r}
            for g, k, s, r in zip(gids, keys, shards, reasons)
            if r is not None
        ]
        keep, filled = resolve_rows([r is None for r in reasons], self.keep_size)
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
            if self.gpu_decode:
                hb.colour = colour_params(params) if self.spec.has_jitter else None
                hb.jpeg, hb.sizes, hb.params = [r["jpeg"] for r in picked], [r["size"] for r in picked], params
            else:
                hb.colour = colour_params(params) if self.spec.has_jitter else None
                hb.image = self._stack([r["image"] for r in picked], shared)  # [n, 1, H, W] uint8
            if self.load_masks:
                hb.mask = self._stack([r["mask"] for r in picked], shared)
            if self.load_boxes:
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

    def __init__(self, dataset: EpochBatches, num_workers: int, prefetch: int, pin_memory: bool, max_batches: int):
        self.dataset = dataset
        self.workers = min(num_workers, max_batches)
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
                prefetch_factor=prefetch,
                pin_memory=pin_memory,
                collate_fn=_identity,
                persistent_workers=True,
                generator=torch.Generator().manual_seed(0),
            )

    def iterate(self, epoch: int, first: int) -> Iterator[HostBatch]:
        """Batches first.. of `epoch`'s plan, in plan order. Stopping early is fine: the next pass
        first drains what the workers still had in flight (DataLoader's reset)."""
        self.dataset.set_position(epoch, first)
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
