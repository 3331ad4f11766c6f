"""torch backend: DataLoader worker processes build whole batches of the plan.

Each worker reads its samples with pread at the index's offsets (no tar parsing, nothing extracted),
decodes with PIL (DCT-domain draft when the stored image is at least twice the needed size), applies
the geometry with torchvision.transforms.v2.functional (image bilinear, mask nearest, boxes as
BoundingBoxes), and tokenises the batch's reports. With a GPU it returns uint8 images: 4x fewer bytes through
shared memory and over PCIe than float, and colour jitter + normalisation then run batched on the GPU
(`transforms.colour_normalise`). Without one (`normalise`), the workers run that step themselves:
in parallel, one thread each, instead of on the consumer's thread.

Order: batch j of the plan is built by worker (j - first) % num_workers, and the DataLoader collects
from workers round-robin, so batches arrive in plan order for any worker count (the output does not
depend on num_workers). A new DataLoader is made per epoch (and per resume): the plan is baked into
the forked workers, which costs a fork per worker per epoch, negligible next to an epoch.

GPU decode (`torch_gpu_decode` with CUDA): workers skip decoding and ship the JPEG bytes; the loader
decodes the batch with nvJPEG (torchvision.io.decode_jpeg(device="cuda")) and runs the same
torchvision geometry on the GPU tensors.
"""
from __future__ import annotations

import math
import os
import time
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.batch import (HostBatch, SampleError, SampleReader, boxes_of, decode_meta, decode_text,
                            open_gray, peek_size, resolve_rows)
from pipeline.plan import DatasetIndex
from pipeline.text import BatchTokenizer
from pipeline.transforms import (TransformSpec, apply_geometry, colour_normalise, colour_params, draw_params,
                                 geometry_matrix, resized_size, transform_boxes, warp_tensors)


class EpochBatches(IterableDataset):
    """Batches `first..` of one rank's epoch plan; each worker builds every num_workers-th batch."""

    def __init__(self, index: DatasetIndex, batches: list[np.ndarray], first: int, spec: TransformSpec,
                 seed: int, epoch: int, tokenizer: BatchTokenizer | None, keep_size: bool,
                 bad: dict[int, str], load_masks: bool, load_boxes: bool, gpu_decode: bool,
                 normalise: bool):
        self.index, self.batches, self.first, self.spec = index, batches, first, spec
        self.normalise = normalise
        self.seed, self.epoch, self.tokenizer, self.keep_size = seed, epoch, tokenizer, keep_size
        self.bad, self.load_masks, self.load_boxes, self.gpu_decode = bad, load_masks, load_boxes, gpu_decode
        self.exts = ("jpg", "txt", "json") + (("png",) if load_masks else ())

    def __iter__(self) -> Iterator[HostBatch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        reader = SampleReader(self.index)
        try:
            for j in range(self.first + worker, len(self.batches), workers):
                yield self.build(j, reader)
        finally:
            reader.close()

    def _draft_size(self, width: int, height: int) -> tuple[int, int]:
        return resized_size(self.spec, width, height)

    def _sample(self, gid: int, key: str, reader: SampleReader) -> dict:
        members = reader.read(gid, self.exts)
        out = {"text": decode_text(members["txt"]), "meta": decode_meta(members["json"]),
               "params": draw_params(self.spec, self.seed, self.epoch, key)}
        if self.gpu_decode:
            out["size"] = peek_size(members["jpg"], "jpg")
            out["jpeg"] = torch.frombuffer(bytearray(members["jpg"]), dtype=torch.uint8)
        else:
            img, out["size"] = open_gray(members["jpg"], "jpg", self._draft_size)
            out["image"] = np.asarray(apply_geometry(img, self.spec, out["params"], *out["size"]))
        w, h = out["size"]
        if self.load_masks:
            mask, mask_size = open_gray(members["png"], "png")
            if mask_size != (w, h):
                raise SampleError(f"png: mask is {mask_size}, image is {(w, h)}")
            out["mask"] = np.asarray(apply_geometry(mask, self.spec, out["params"], w, h, nearest=True))
        if self.load_boxes:
            out["boxes"] = transform_boxes(boxes_of(out["meta"]), self.spec, out["params"], w, h)
        return out

    @staticmethod
    def _stack(arrays: list[np.ndarray], shared: bool) -> torch.Tensor:
        out = _batch_tensor((len(arrays), 1) + arrays[0].shape, torch.uint8, shared)    # [n, 1, H, W]
        np.stack(arrays, out=out.numpy()[:, 0])
        return out

    def build(self, j: int, reader: SampleReader) -> HostBatch:
        t0 = time.perf_counter()
        shared = get_worker_info() is not None
        rows, ok, errors, keys, shards = [], [], [], [], []
        gids = self.batches[j].tolist()
        for gid in gids:
            shard, row = self.index.locate(gid)
            keys.append(shard.keys[row])
            shards.append(shard.name)
            reason = self.bad.get(gid)
            if reason is None:
                try:
                    rows.append(self._sample(gid, shard.keys[row], reader))
                except SampleError as exc:
                    reason = exc.reason
            if reason is not None:
                rows.append(None)
                errors.append({"gid": gid, "key": shard.keys[row], "shard": shard.name, "reason": reason})
            ok.append(reason is None)
        keep, filled = resolve_rows(ok, self.keep_size)
        picked = [rows[i] for i in keep]
        hb = HostBatch(index=j, gids=[gids[i] for i in keep], keys=[keys[i] for i in keep],
                       shards=[shards[i] for i in keep], texts=[r["text"] for r in picked], meta=[r["meta"] for r in picked],
                       image=None, errors=errors, filled=filled)
        if picked:
            params = [r["params"] for r in picked]
            hb.colour = colour_params(params) if self.spec.has_jitter else None
            if self.gpu_decode:
                hb.jpeg, hb.sizes, hb.params = [r["jpeg"] for r in picked], [r["size"] for r in picked], params
            else:
                hb.image = self._stack([r["image"] for r in picked], shared and not self.normalise)
                if self.normalise:
                    out = _batch_tensor((len(picked), self.spec.channels) + hb.image.shape[2:], torch.float32, shared)
                    hb.image = colour_normalise(hb.image, hb.colour, self.spec, out=out)    # [n, C, H, W]
                    hb.colour, hb.normalised = None, True
            if self.load_masks:
                hb.mask = self._stack([r["mask"] for r in picked], shared)
            if self.load_boxes:
                hb.boxes = [r["boxes"] for r in picked]
            if self.tokenizer is not None:
                hb.input_ids, hb.attention_mask, hb.tokenize_s = self.tokenizer(hb.texts)
        hb.work_s = time.perf_counter() - t0
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


def iterate_epoch(dataset: EpochBatches, num_workers: int, prefetch: int, pin_memory: bool) -> Iterator[HostBatch]:
    """The dataset's batches in plan order, built in `num_workers` processes (0: in this process).
    Workers are shut down when the iteration ends or the consumer stops early."""
    remaining = len(dataset.batches) - dataset.first
    workers = min(num_workers, remaining)
    if workers <= 0:
        yield from dataset
        return
    if dataset.tokenizer is not None:
        # The Rust tokenizer would print a fork warning in every worker if the parent already used
        # its thread pool; workers tokenise one batch each, so they need no pool of their own.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A private generator: DataLoader draws its workers' base seed from it, so starting an epoch never
    # advances the global torch RNG (which would break exact resume; augmentation is seeded per sample).
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=prefetch,
                        pin_memory=pin_memory, collate_fn=_identity, persistent_workers=False,
                        generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    try:
        yield from it
    finally:
        # Deterministic cleanup (also on an early break): join the workers now, not at GC time.
        it._shutdown_workers()


def gpu_decode(hb: HostBatch, spec: TransformSpec, device: torch.device, keep_size: bool) -> list[dict]:
    """nvJPEG-decode a GPU-mode batch in place (hb.image <- uint8 [B, 1, H, W] on `device`), with the
    geometry applied by the same torchvision calls on GPU tensors. Rows that fail are dropped/refilled
    like any bad sample; returns their error records."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        decoded = decode_jpeg(hb.jpeg, mode=ImageReadMode.GRAY, device=device)   # [1, h, w] each
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
    elif spec.has_affine:      # g2d_train: the whole batch in one warp
        images = [decoded[i] for i in keep]
        matrices = np.stack([geometry_matrix(spec, p, x.shape[-1], x.shape[-2]) for x, p in zip(images, hb.params)])
        hb.image = warp_tensors(images, matrices, spec.out_size)          # [B, 1, out, out] uint8
    else:
        hb.image = torch.stack([apply_geometry(decoded[i], spec, p, *size)
                                for i, p, size in zip(keep, hb.params, hb.sizes)])
    hb.jpeg = None
    return errors
