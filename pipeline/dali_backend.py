"""DALI backend: fn.readers.webdataset over per-epoch trimmed indexes, decode + augment in the graph.

Reading exactly the plan: for every (epoch, rank, resume point) the backend writes small wds2idx v1.2
index files (`v1.2 <count>`, then one `ext offset size name ...` line per sample) into a temp dir,
one per run of consecutive planned samples from the same shard, listing only those samples in plan
order, and hands DALI the shard paths with these indexes. DALI reads samples in index order at the
given offsets (verified: order, subsets and repeats are honoured), so the manifest's shards are read
in place - no copies for subsets, no index building by DALI, no reader-side shuffling or sharding
(shard_id/num_shards stay 0/1: the plan already is this rank's part).

Graph (one sample; S = image_size, c = crop_size; "mixed" = nvJPEG when CUDA is available, else CPU
with device_id=None):

    reader -> jpg, txt, json (, png)
    jpg --decoders.image(GRAY)--> [h, w, 1] u8
        --resize (squash | longer side + centred pad via crop)--> [S, S, 1] --crop(pos)--> [c, c, 1] u8
        or, with an affine: --warp_affine(matrix x scale(decoded shape))--> [c, c, 1] u8 (one warp)
        --x*b, contrast about reductions.mean, clamp--> --cat x3--> --crop_mirror_normalize--> [C, c, c] f32
    txt/json -> fn.pad (byte tensors, zero padded) + shapes (lengths); source_info -> the key

Per-sample parameters (affine matrix, crop position, brightness, contrast) come from
`transforms.draw_params(seed, epoch, key)` through an external source, so DALI applies exactly the
augmentation the torch backend would, and a resumed epoch continues with the same draws (DALI's own
RNG could do neither). The affine/crop part of the matrix is therefore computed in numpy
(`transforms.warp_matrix`, torchvision's formula); fn.transforms.scale/combine append the
size-dependent part in the graph. Contrast is an arithmetic expression instead of
fn.brightness_contrast because torchvision centres contrast on the image mean, and on the GPU that
mean is a GPU tensor, which cannot feed a (CPU-only) argument input.

Decode failures: a DALI error on batch j is diagnosed by decoding that batch's planned samples on the
CPU; the culprits are recorded (or raised with shard and key), and the pipeline is rebuilt from batch
j with them removed from every later plan. Text/json problems are caught while unpacking the batch.

Batches are unpacked, tokenised and queued by a background thread (`prefetch` deep), so the training
thread only dequeues ready batches.
"""
from __future__ import annotations

import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.batch import (CorruptSampleError, HostBatch, SampleError, SampleReader, boxes_of, check_sample,
                            decode_meta, decode_text, resolve_rows)
from pipeline.plan import EXT_COLUMN, DatasetIndex, RankPlan
from pipeline.text import BatchTokenizer
from pipeline.transforms import TransformSpec, draw_params, transform_boxes, warp_matrix


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


class _Slots:
    """One planned batch as DALI will read it: bad samples replaced by placeholders (a good sample of
    the same batch, dropped again after the run) so every batch still has its planned length."""

    def __init__(self, index: int, gids: list[int], ok: list[bool]):
        self.index, self.gids, self.ok = index, gids, ok


class _ParamSource:
    """External source: the drawn parameters of iteration k's samples (batch_info=True), only the
    ones the transform uses (`names`). Drawn on demand, in DALI's prefetch, not all up front."""

    def __init__(self, slots: list[_Slots], index: DatasetIndex, spec: TransformSpec, seed: int, epoch: int,
                 batch_size: int):
        self.slots, self.index, self.spec, self.seed, self.epoch = slots, index, spec, seed, epoch
        self.batch_size = batch_size
        self.names = ((["matrix"] if spec.has_affine else [])
                      + (["crop_x", "crop_y"] if spec.crop and not spec.has_affine else [])   # else in the matrix
                      + (["brightness", "contrast"] if spec.has_jitter else []))

    def params(self, k: int) -> list:
        return [draw_params(self.spec, self.seed, self.epoch, self.index.key(g)) for g in self.slots[k].gids]

    def __call__(self, info):
        # DALI prefetches past the last batch (the reader wraps); any valid parameters do there.
        params = self.params(min(info.iteration, len(self.slots) - 1))
        params = params + [params[-1]] * (self.batch_size - len(params))   # reader pads by repetition
        s = self.spec
        span = max(1, s.size - s.crop)
        columns = {
            "matrix": lambda: np.stack([warp_matrix(s, p) for p in params]).astype(np.float32),   # [B, 2, 3]
            "crop_x": lambda: np.array([p.crop_left / span for p in params], dtype=np.float32),   # [B]
            "crop_y": lambda: np.array([p.crop_top / span for p in params], dtype=np.float32),
            "brightness": lambda: np.array([p.brightness for p in params], dtype=np.float32),
            "contrast": lambda: np.array([p.contrast for p in params], dtype=np.float32),
        }
        return tuple(columns[name]() for name in self.names)


def _build_pipeline(paths: list[str], index_paths: list[str], source: _ParamSource, spec: TransformSpec,
                    batch_size: int, num_threads: int, device_id: int | None, prefetch: int, seed: int,
                    with_mask: bool):
    from nvidia.dali import Pipeline, fn, types
    import nvidia.dali.math as dmath

    gpu = device_id is not None
    pipe = Pipeline(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id,
                    prefetch_queue_depth=prefetch, seed=seed)
    with pipe:
        exts = ["jpg", "txt", "json"] + (["png"] if with_mask else [])
        members = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=exts, name="reader",
                                        missing_component_behavior="error", pad_last_batch=True,
                                        random_shuffle=False)
        jpg, txt, js = members[:3]
        info = fn.get_property(jpg, key="source_info")          # b"<tar path>:<offset>:<key>.jpg"
        p = {}
        if source.names:
            p = dict(zip(source.names, fn.external_source(source=source, num_outputs=len(source.names),
                                                          batch=True, batch_info=True)))

        def geometry(x, interp):
            if spec.has_affine:
                # One warp from the decoded image, as in transforms.apply_geometry: the per-sample
                # output->squashed-image matrix, then squashed image -> decoded pixels (its shape).
                hw = fn.cast(x.shape(), dtype=types.FLOAT)          # (h, w, 1), on the CPU
                to_image = fn.transforms.scale(scale=fn.stack(hw[1] / spec.size, hw[0] / spec.size))
                return fn.warp_affine(x, matrix=fn.transforms.combine(p["matrix"], to_image),
                                      size=[spec.out_size, spec.out_size], fill_value=0, interp_type=interp,
                                      inverse_map=True)               # [out, out, 1] uint8
            if spec.resize == "squash":
                x = fn.resize(x, size=[spec.size, spec.size], interp_type=interp,
                              antialias=interp != types.INTERP_NN)
            else:
                x = fn.resize(x, resize_longer=spec.size, interp_type=interp,
                              antialias=interp != types.INTERP_NN)
                x = fn.crop(x, crop=[spec.size, spec.size], crop_pos_x=0.5, crop_pos_y=0.5,
                            out_of_bounds_policy="pad", fill_values=0)
            if spec.crop:
                x = fn.crop(x, crop=[spec.crop, spec.crop], crop_pos_x=p["crop_x"], crop_pos_y=p["crop_y"])
            return x                                                # [c, c, 1] uint8

        decode_device = "mixed" if gpu else "cpu"
        img = fn.decoders.image(jpg, device=decode_device, output_type=types.GRAY)   # [h, w, 1] uint8
        stored = img.shape()                                        # (h, w, 1), on the CPU
        img = geometry(img, types.INTERP_LINEAR)
        if spec.has_jitter:
            b, c = p["brightness"], p["contrast"]
            if gpu:   # arithmetic operands must share the image's device
                b, c = b.gpu(), c.gpu()
            mean = fn.reductions.mean(img)                          # per-sample scalar, float
            img = dmath.clamp(b * (c * img + (1.0 - c) * mean), 0.0, 255.0)
        if spec.channels == 3:
            img = fn.cat(img, img, img, axis=2)                     # grey replicated: [c, c, 3]
        img = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                       mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std])
        outputs = [img, stored, fn.pad(info, fill_value=0), info.shape(), fn.pad(txt, fill_value=0),
                   txt.shape(), fn.pad(js, fill_value=0), js.shape()]
        if with_mask:
            mask = fn.decoders.image(members[3], device=decode_device, output_type=types.GRAY)
            mask = geometry(mask, types.INTERP_NN)
            outputs.append(fn.transpose(mask, perm=[2, 0, 1]))      # [1, c, c] uint8 0/255
        pipe.set_outputs(*outputs)
    pipe.build()
    return pipe


OUTPUT_NAMES = ["image", "stored", "info", "info_len", "txt", "txt_len", "json", "json_len"]


def _strings(data: torch.Tensor, lengths: torch.Tensor) -> list[bytes]:
    data, lengths = data.cpu().numpy(), lengths.reshape(-1).cpu().numpy()
    return [data[i, :lengths[i]].tobytes() for i in range(len(lengths))]


class DaliEpoch:
    """Iterates batches `first..` of a rank plan through DALI; yields HostBatch in plan order."""

    def __init__(self, index: DatasetIndex, plan: RankPlan, first: int, spec: TransformSpec, seed: int,
                 tokenizer: BatchTokenizer | None, keep_size: bool, bad: dict[int, str], on_error: str,
                 num_threads: int, prefetch: int, device: torch.device, use_gpu: bool,
                 load_masks: bool, load_boxes: bool, on_rebuild):
        self.index, self.plan, self.first, self.spec, self.seed = index, plan, first, spec, seed
        self.tokenizer, self.keep_size, self.bad, self.on_error = tokenizer, keep_size, bad, on_error
        self.num_threads, self.prefetch, self.device = num_threads, prefetch, device
        self.device_id = None
        if use_gpu and device.type == "cuda":
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()
        self.load_masks, self.load_boxes, self.on_rebuild = load_masks, load_boxes, on_rebuild
        self._skipped: list[HostBatch] = []     # batches whose every sample is bad (eval only)

    # ---- plan -> slots -> index files -> pipeline --------------------------------------------
    def _slots(self, start: int) -> list[_Slots]:
        """Slots of batches start.. (batches with no readable sample go to `_skipped` instead)."""
        self._skipped = []
        out = []
        for j in range(start, len(self.plan)):
            gids = self.plan.batches[j].tolist()
            ok = [g not in self.bad for g in gids]
            if not any(ok):
                if self.keep_size:
                    raise CorruptSampleError(self._all_bad_message(j, gids))
                self._skipped.append(self._empty_batch(j, gids))
                continue
            first_good = gids[ok.index(True)]
            out.append(_Slots(j, [g if flag else first_good for g, flag in zip(gids, ok)], ok))
        return out

    def _all_bad_message(self, j: int, gids: list[int]) -> str:
        first = self.index.locate(gids[0])
        return (f"every sample of batch {j} is unreadable (e.g. {first[0].name} key {first[0].keys[first[1]]}: "
                f"{self.bad.get(gids[0])}); cannot refill it")

    def _empty_batch(self, j: int, gids: list[int]) -> HostBatch:
        errors = []
        for g in gids:
            shard, row = self.index.locate(g)
            errors.append({"gid": g, "key": shard.keys[row], "shard": shard.name, "reason": self.bad[g]})
        return HostBatch(index=j, gids=[], keys=[], shards=[], texts=[], meta=[], image=None, errors=errors)

    def _write_indexes(self, slots: list[_Slots], tmp: Path) -> tuple[list[str], list[str]]:
        flat = np.array([g for s in slots for g in s.gids], dtype=np.int64)
        shard_ids = self.index.shard_id(flat)
        cuts = np.flatnonzero(np.diff(shard_ids)) + 1
        paths, index_paths = [], []
        for r, run in enumerate(np.split(np.arange(len(flat)), cuts)):
            shard = self.index.shards[int(shard_ids[run[0]])]
            lines = []
            for gid in flat[run].tolist():
                row = gid - int(self.index.shard_start[shard_ids[run[0]]])
                key = shard.keys[row]
                lines.append(" ".join(f"{ext} {shard.offsets[row, col]} {shard.sizes[row, col]} {key}.{ext}"
                                      for ext, col in EXT_COLUMN.items() if shard.offsets[row, col] >= 0))
            path = tmp / f"run-{r:06d}.idx"
            path.write_text(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n", encoding="utf-8")
            paths.append(shard.path)
            index_paths.append(str(path))
        return paths, index_paths

    def _start(self, slots: list[_Slots], tmp: Path):
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        paths, index_paths = self._write_indexes(slots, tmp)
        source = _ParamSource(slots, self.index, self.spec, self.seed, self.plan.epoch, self.plan.batch_size)
        pipe = _build_pipeline(paths, index_paths, source, self.spec, self.plan.batch_size, self.num_threads,
                               self.device_id, self.prefetch, self.seed, self.load_masks)
        names = OUTPUT_NAMES + (["mask"] if self.load_masks else [])
        it = DALIGenericIterator([pipe], names, reader_name="reader", auto_reset=False,
                                 last_batch_policy=LastBatchPolicy.PARTIAL, prepare_first_batch=False)
        return pipe, it, source

    # ---- one DALI batch -> HostBatch ----------------------------------------------------------
    def _unpack(self, out: dict, slot: _Slots, params: list | None) -> HostBatch:
        t0 = time.perf_counter()
        infos = _strings(out["info"], out["info_len"])
        texts_raw = _strings(out["txt"], out["txt_len"])
        metas_raw = _strings(out["json"], out["json_len"])
        stored = out["stored"].cpu().numpy()                    # [n, 3] (h, w, 1)
        keys, shards, texts, metas, boxes, errors, ok = [], [], [], [], [], [], list(slot.ok)
        planned_gids = self.plan.batches[slot.index].tolist()
        for i, gid in enumerate(slot.gids):
            shard, row = self.index.locate(gid)
            got = infos[i].decode("utf-8", "replace").rsplit(":", 1)[-1].split(".", 1)[0]
            if got != shard.keys[row]:
                raise RuntimeError(f"DALI reader out of step with the plan in batch {slot.index}: row {i} "
                                   f"is {got!r}, planned {shard.keys[row]!r} ({shard.name})")
            planned = self.index.locate(planned_gids[i])
            keys.append(planned[0].keys[planned[1]])
            shards.append(planned[0].name)
            texts.append("")
            metas.append({})
            boxes.append(None)
            if not slot.ok[i]:
                errors.append({"gid": planned_gids[i], "key": keys[-1], "shard": shards[-1],
                               "reason": self.bad[planned_gids[i]]})
                continue
            try:
                texts[-1] = decode_text(texts_raw[i])
                metas[-1] = decode_meta(metas_raw[i])
                if self.load_boxes:
                    h, w = int(stored[i, 0]), int(stored[i, 1])
                    boxes[-1] = transform_boxes(boxes_of(metas[-1]), self.spec, params[i], w, h)
            except SampleError as exc:
                ok[i] = False
                self.bad[gid] = exc.reason
                errors.append({"gid": gid, "key": keys[-1], "shard": shards[-1], "reason": exc.reason})
        keep, filled = resolve_rows(ok, self.keep_size)
        hb = HostBatch(index=slot.index, gids=planned_gids, keys=keys, shards=shards, texts=texts, meta=metas,
                       image=out["image"], normalised=True, mask=out.get("mask"),
                       boxes=boxes if self.load_boxes else None, errors=errors)
        hb.select(keep)
        hb.filled = filled
        if self.tokenizer is not None and len(hb):
            hb.input_ids, hb.attention_mask, hb.tokenize_s = self.tokenizer(hb.texts)
        hb.work_s = time.perf_counter() - t0
        return hb

    def _diagnose(self, slots: list[_Slots], k: int, exc: Exception) -> None:
        """DALI failed fetching slots[k]: find the bad samples on the CPU (that batch first, then the
        ones DALI may have been running ahead on) and record them; re-raise if none is found."""
        reader = SampleReader(self.index)
        try:
            for s in slots[k:k + self.prefetch + 1]:
                found = {}
                for gid, flag in zip(s.gids, s.ok):
                    if flag and gid not in found:
                        reason = check_sample(reader, gid, self.load_masks)
                        if reason is not None:
                            found[gid] = reason
                if found:
                    for gid, reason in found.items():
                        shard, row = self.index.locate(gid)
                        if self.on_error == "raise":
                            raise CorruptSampleError(f"{shard.path}: sample {shard.keys[row]}: {reason}") from exc
                        self.bad[gid] = reason
                    return
        finally:
            reader.close()
        batch = slots[k]
        names = sorted({self.index.locate(g)[0].name for g in batch.gids})
        raise RuntimeError(f"DALI failed on batch {batch.index} (shards {names}) but every sample of it "
                           f"decodes on the CPU: {exc}") from exc

    def _produce(self) -> Iterator[HostBatch]:
        start = self.first
        while start < len(self.plan):
            yield from self._flush_skipped(start)
            slots = self._slots(start)
            if not slots:
                break
            with tempfile.TemporaryDirectory(prefix="g2d-dali-idx-") as tmp:
                pipe, it, source = self._start(slots, Path(tmp))
                k = 0
                try:
                    while k < len(slots):
                        try:
                            out = next(it)[0]
                        except StopIteration:
                            raise RuntimeError(f"DALI stopped after {k} of {len(slots)} planned batches") from None
                        except RuntimeError as exc:
                            self._diagnose(slots, k, exc)
                            self.on_rebuild()
                            break
                        yield from self._flush_skipped(slots[k].index)
                        yield self._unpack(out, slots[k], source.params(k) if self.load_boxes else None)
                        k += 1
                finally:
                    del it, pipe
            start = len(self.plan) if k == len(slots) else slots[k].index
        yield from self._flush_skipped(float("inf"))

    def _flush_skipped(self, before: float) -> Iterator[HostBatch]:
        while self._skipped and self._skipped[0].index < before:
            yield self._skipped.pop(0)

    def __iter__(self) -> Iterator[HostBatch]:
        """Run `_produce` in a background thread, `prefetch` batches ahead of the consumer."""
        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()

        def work():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            try:
                for hb in self._produce():
                    while not stop.is_set():
                        try:
                            q.put(("batch", hb), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(("end", None))
            except BaseException as exc:  # forwarded to the consumer, which re-raises it
                q.put(("error", exc))

        thread = threading.Thread(target=work, name="dali-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                kind, item = q.get()
                if kind == "batch":
                    yield item
                elif kind == "error":
                    raise item
                else:
                    return
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass
            thread.join()

