"""DALI backend: our external source feeds the planned samples' encoded bytes; decode + augment in the graph.

The feed: for every DALI iteration, `_Feed` reads the planned batch's members with the torch
backend's checked read (`SampleReader.read`: one pread per sample, reads sorted by shard and offset,
tar headers compared with the index, then `text_and_meta`: json, the CRC-32s it records for jpg, txt
and png, text) and hands DALI the encoded jpg (and png) bytes with the sample's augmentation
parameters. So DALI decodes exactly the bytes that were checked, in exactly the plan's order, from
any mix of shards (a batch draws from many, pipeline/plan.py), and nothing else reads the tars: no
reader, no per-epoch index files, no reader-side shuffling or sharding (the plan already is this
rank's part). A sample that fails a check (or is already known bad) is replaced in its slot by the
batch's first good sample, or by a tiny blank placeholder image when none is, and dropped again when
the batch is unpacked.

Graph (one sample; S = image_size, c = crop_size; "mixed" = nvJPEG when CUDA is available, else CPU
with device_id=None):

    feed -> jpg bytes (, png bytes), matrix | crop position, brightness, contrast
    jpg --decoders.image(GRAY)--> [h, w, 1] u8
        --resize (squash | longer side + centred pad via crop)--> [S, S, 1] --crop(pos)--> [c, c, 1] u8
        or, with an affine: --warp_affine(matrix)--> [c, c, 1] u8 (one warp)
        --x*b, contrast about reductions.mean, clamp--> --cat x3--> --crop_mirror_normalize--> [C, c, c] f32

Per-sample parameters come from `transforms.draw_params(seed, epoch, key)`, so DALI applies exactly
the augmentation the torch backend would, and a resumed epoch continues with the same draws (DALI's
own RNG could do neither). The whole warp matrix (resize to S x S, torchvision's affine, crop:
`transforms.geometry_matrix`) is computed in numpy by the feed, with the decoded size read from the
JPEG header (~20 us), so the graph runs no per-sample argument operators (shape, cast, stack,
transforms.scale/combine: several small CPU ops per sample before). Contrast is an arithmetic expression instead of
fn.brightness_contrast because torchvision centres contrast on the image mean, and on the GPU that
mean is a GPU tensor, which cannot feed a (CPU-only) argument input.

One pipeline for the loader's lifetime: the graph does not depend on the epoch, so a new pass only
points the feed at the new batches and resets the iterator (no pipeline build, 0.2-0.65 s, per
epoch); a pass abandoned early is drained first (at most `prefetch` batches DALI ran ahead on).

Decode failures: a DALI error on batch j is diagnosed by decoding that batch's planned samples on the
CPU (and those DALI may have been running ahead on); the culprits are recorded (or raised with shard
and key), and a new pipeline continues from batch j with them replaced.

Batches are unpacked, tokenised and queued by a background thread (`prefetch` deep), which is also
the thread DALI calls the feed from: the training thread only dequeues ready batches.
"""

from __future__ import annotations

import io
import queue
import threading
import time
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.backend import Backend
from pipeline.batch import (
    BackendOptions,
    CorruptSampleError,
    HostBatch,
    LoaderStats,
    SampleError,
    SampleReader,
    boxes_of,
    check_sample,
    peek_size,
    resolve_rows,
    text_and_meta,
)
from pipeline.config import DataConfig
from pipeline.plan import DatasetIndex, PlanArgs, RankPlan
from pipeline.text import BatchTokenizer
from pipeline.transforms import SampleParams, TransformSpec, draw_params, geometry_matrix, transform_boxes


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def _placeholder(fmt: str) -> np.ndarray:
    """A blank 8x8 grey image in `fmt`: fills the slot of a batch whose every sample failed its checks
    (the row is dropped again on unpacking)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format=fmt)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


class _Fed:
    """What the feed read for one DALI iteration, for the unpacking step."""

    def __init__(
        self,
        j: int,
        gids: list[int],
        keys: list[str],
        shards: list[str],
        params: list[SampleParams],
        texts: list[str],
        metas: list[dict],
        reasons: list[str | None],
    ):
        self.j, self.gids, self.keys, self.shards, self.params = j, gids, keys, shards, params
        self.texts, self.metas, self.reasons = texts, metas, reasons


class _Feed:
    """External source (batch=True): for each DALI iteration, the next planned batch's encoded images
    and the drawn parameters of the columns the transform uses (`names`). Called by DALI in order,
    from the thread that runs the pipeline; `fed` keeps what the unpacking step needs, in order."""

    def __init__(self, index: DatasetIndex, options: BackendOptions, bad: dict[int, str]):
        spec, load_masks = options.spec, options.load_masks
        self.index, self.spec, self.seed, self.bad, self.load_masks = index, spec, options.seed, bad, load_masks
        self.bounds = options.bounds
        self.exts = options.exts
        self.names = (
            ["jpg"]
            + (["png"] if load_masks else [])
            + (["matrix"] if spec.has_affine else [])
            + (["crop_x", "crop_y"] if spec.crop and not spec.has_affine else [])  # else in the matrix
            + (["brightness", "contrast"] if spec.has_jitter else [])
        )
        self.reader = SampleReader(index)
        self.plan: RankPlan | None = None
        self.next_batch = 0
        self.fed: list[_Fed] = []
        self._blank = {"jpg": _placeholder("JPEG"), "png": _placeholder("PNG")}

    def start(self, plan: RankPlan, first: int) -> None:
        self.plan, self.next_batch, self.fed = plan, first, []

    def stop(self) -> None:
        """No more batches: DALI's next call ends the pass."""
        self.next_batch = len(self.plan) if self.plan is not None else 0

    def __call__(self, info):
        if self.plan is None or self.next_batch >= len(self.plan):
            raise StopIteration
        j = self.next_batch
        self.next_batch += 1
        batch = self.plan.batches[j]
        gids = batch.tolist()
        sids = self.index.shard_id(batch).tolist()  # one search for the batch
        located = [(self.index.shards[s], g - int(self.index.shard_start[s])) for s, g in zip(sids, gids)]
        epoch = self.plan.epoch
        members: list[dict | None] = [None] * len(gids)
        texts, metas, reasons = [""] * len(gids), [{} for _ in gids], [self.bad.get(g) for g in gids]
        for i in sorted(range(len(gids)), key=gids.__getitem__):  # reads in shard/offset order
            if reasons[i] is not None:
                continue
            try:
                members[i] = self.reader.read_row(*located[i], self.exts)
                texts[i], metas[i] = text_and_meta(members[i])
                size = self.bounds.check(members[i]["jpg"], "jpg", metas[i])  # before DALI decodes it
                if self.load_masks:
                    self.bounds.check(members[i]["png"], "png", metas[i], expected=size)
            except SampleError as exc:
                reasons[i] = exc.reason
        params = [draw_params(self.spec, self.seed, epoch, shard.keys[row]) for shard, row in located]
        good = next((i for i, r in enumerate(reasons) if r is None), None)
        self.fed.append(
            _Fed(
                j,
                gids,
                [shard.keys[row] for shard, row in located],
                [shard.name for shard, _ in located],
                params,
                texts,
                metas,
                reasons,
            )
        )

        def encoded(ext: str) -> list[np.ndarray]:
            def one(i: int) -> np.ndarray:
                src = i if reasons[i] is None else good
                return self._blank[ext] if src is None else np.frombuffer(members[src][ext], dtype=np.uint8)

            return [one(i) for i in range(len(gids))]

        # A placeholder row gets its donor's parameters too (any valid values would do: it is dropped).
        used = [p if r is None or good is None else params[good] for p, r in zip(params, reasons)]

        def matrices() -> np.ndarray:
            """[B, 2, 3] output -> decoded-image pixels, the whole warp (`geometry_matrix`): the decoded
            size comes from the JPEG header here, so the graph runs no per-sample argument ops."""
            sizes = [
                peek_size(members[good if r is not None else i]["jpg"], "jpg") if good is not None else (8, 8)
                for i, r in enumerate(reasons)
            ]
            return np.stack([geometry_matrix(s, p, w, h) for p, (w, h) in zip(used, sizes)]).astype(np.float32)

        s = self.spec
        span = max(1, s.size - s.crop)
        columns = {
            "jpg": lambda: encoded("jpg"),  # B x [nbytes]
            "png": lambda: encoded("png"),
            "matrix": matrices,  # [B, 2, 3]
            "crop_x": lambda: np.array([p.crop_left / span for p in used], dtype=np.float32),  # [B]
            "crop_y": lambda: np.array([p.crop_top / span for p in used], dtype=np.float32),
            "brightness": lambda: np.array([p.brightness for p in used], dtype=np.float32),
            "contrast": lambda: np.array([p.contrast for p in used], dtype=np.float32),
        }
        return tuple(columns[name]() for name in self.names)

    def close(self) -> None:
        self.reader.close()


def _warp(x, matrix, spec: TransformSpec, interp):
    """One affine warp of the decoded image to [out, out, 1], as transforms.apply_geometry does;
    `matrix` maps output pixels to input pixels (the feed's per-sample matrix or a constant)."""
    from nvidia.dali import fn

    return fn.warp_affine(
        x, matrix=matrix, size=[spec.out_size, spec.out_size], fill_value=0, interp_type=interp, inverse_map=True
    )


def _jitter(img, brightness, contrast, gpu: bool):
    """Brightness/contrast jitter of a uint8-range image around its per-sample mean, clamped to [0, 255]."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn

    if gpu:  # arithmetic operands must share the image's device
        brightness, contrast = brightness.gpu(), contrast.gpu()
    mean = fn.reductions.mean(img)  # per-sample scalar, float
    return dmath.clamp(brightness * (contrast * img + (1.0 - contrast) * mean), 0.0, 255.0)


def _normalise(img, spec: TransformSpec):
    """[c, c, 1] grey -> [C, c, c] float, replicated to spec.channels and normalised with its mean/std."""
    from nvidia.dali import fn, types

    if spec.channels == 3:
        img = fn.cat(img, img, img, axis=2)  # grey replicated: [c, c, 3]
    return fn.crop_mirror_normalize(
        img,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[255.0 * m for m in spec.mean],
        std=[255.0 * s for s in spec.std],
    )


def _build_pipeline(
    feed: _Feed,
    spec: TransformSpec,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    prefetch: int,
    seed: int,
    with_mask: bool,
):
    from nvidia.dali import Pipeline, fn, types

    gpu = device_id is not None
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=max(1, num_threads),
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        seed=seed,
    )
    with pipe:
        params = dict(
            zip(feed.names, fn.external_source(source=feed, num_outputs=len(feed.names), batch=True, batch_info=True))
        )
        jpg, png = params.pop("jpg"), params.pop("png", None)

        def geometry(x, interp):
            if spec.has_affine:
                return _warp(x, params["matrix"], spec, interp)  # [out, out, 1] uint8
            if spec.resize == "squash":
                x = fn.resize(x, size=[spec.size, spec.size], interp_type=interp, antialias=interp != types.INTERP_NN)
            else:
                x = fn.resize(x, resize_longer=spec.size, interp_type=interp, antialias=interp != types.INTERP_NN)
                x = fn.crop(
                    x,
                    crop=[spec.size, spec.size],
                    crop_pos_x=0.5,
                    crop_pos_y=0.5,
                    out_of_bounds_policy="pad",
                    fill_values=0,
                )
            if spec.crop:
                x = fn.crop(x, crop=[spec.crop, spec.crop], crop_pos_x=params["crop_x"], crop_pos_y=params["crop_y"])
            return x  # [c, c, 1] uint8

        decode_device = "mixed" if gpu else "cpu"
        img = fn.decoders.image(jpg, device=decode_device, output_type=types.GRAY)  # [h, w, 1] uint8
        stored = img.shape()  # (h, w, 1), on the CPU
        img = geometry(img, types.INTERP_LINEAR)
        if spec.has_jitter:
            img = _jitter(img, params["brightness"], params["contrast"], gpu)
        img = _normalise(img, spec)  # [C, c, c] float
        outputs = [img, stored]
        if with_mask:
            mask = fn.decoders.image(png, device=decode_device, output_type=types.GRAY)
            mask = geometry(mask, types.INTERP_NN)
            outputs.append(fn.transpose(mask, perm=[2, 0, 1]))  # [1, c, c] uint8 0/255
        pipe.set_outputs(*outputs)
    pipe.build()
    return pipe


OUTPUT_NAMES = ["image", "stored"]


class DaliBatches:
    """The loader's DALI pipeline and its prefetch thread; `iterate(plan, first)` is one pass, yielding
    HostBatch in plan order."""

    def __init__(
        self,
        index: DatasetIndex,
        options: BackendOptions,
        tokenizer: BatchTokenizer | None,
        bad: dict[int, str],
        stats: LoaderStats | None,
    ):
        self.index, self.options, self.tokenizer, self.bad = index, options, tokenizer, bad
        self.spec, self.seed, self.keep_size, self.on_error = (
            options.spec,
            options.seed,
            options.keep_size,
            options.on_error,
        )
        self.num_threads, self.prefetch, self.batch_size = options.workers, options.prefetch, options.batch_size
        self.device = device = options.device
        self.device_id = None
        if options.gpu_decode and device.type == "cuda":
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()
        # The loader's counters, not a callback into the loader: a Loader <-> DaliBatches cycle would
        # leave the pipeline to the garbage collector, which a forked worker may then run (segfault).
        self.load_masks, self.load_boxes, self.stats = options.load_masks, options.load_boxes, stats
        self.feed = _Feed(index, options, bad)
        self._pipe = self._it = None
        self._open = False  # the iterator has run a pass (reset needed before the next)
        self.builds = 0  # pipelines built: 1 for the loader's lifetime unless DALI failed

    # ---- the pipeline -------------------------------------------------------------------------
    def _iterator(self):
        """The pipeline's iterator, built on first use and after a failure, reset between passes."""
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        if self._it is None:
            self.builds += 1
            self._pipe = _build_pipeline(
                self.feed,
                self.spec,
                self.batch_size,
                self.num_threads,
                self.device_id,
                self.prefetch,
                self.seed,
                self.load_masks,
            )
            names = OUTPUT_NAMES + (["mask"] if self.load_masks else [])
            # No reader: the pass ends when the feed raises StopIteration.
            self._it = DALIGenericIterator(
                [self._pipe],
                names,
                auto_reset=False,
                prepare_first_batch=False,
                last_batch_policy=LastBatchPolicy.PARTIAL,
            )
        elif self._open:
            self._it.reset()  # schedules the first iterations of the new pass (feed already pointed)
        return self._it

    def _drain(self) -> None:
        """End the current pass early: DALI has run up to `prefetch` iterations ahead."""
        self.feed.stop()
        try:
            for _ in self._it:
                pass
        except RuntimeError:
            self._discard()

    def _discard(self) -> None:
        self._it = self._pipe = None
        self._open = False

    # ---- one DALI batch -> HostBatch ----------------------------------------------------------
    def _unpack(self, out: dict, fed: _Fed) -> HostBatch:
        t0 = time.perf_counter()
        stored = out["stored"].cpu().numpy()  # [n, 3] (h, w, 1)
        keys, shards, boxes, errors = fed.keys, fed.shards, [], []
        ok = [r is None for r in fed.reasons]
        for i, gid in enumerate(fed.gids):
            boxes.append(None)
            if fed.reasons[i] is not None:
                self.bad.setdefault(gid, fed.reasons[i])
                errors.append({"gid": gid, "key": keys[i], "shard": shards[i], "reason": fed.reasons[i]})
            elif self.load_boxes:
                try:
                    h, w = int(stored[i, 0]), int(stored[i, 1])
                    boxes[-1] = transform_boxes(boxes_of(fed.metas[i]), self.spec, fed.params[i], w, h)
                except SampleError as exc:
                    ok[i] = False
                    self.bad[gid] = exc.reason
                    errors.append({"gid": gid, "key": keys[i], "shard": shards[i], "reason": exc.reason})
        keep, filled = resolve_rows(ok, self.keep_size)
        hb = HostBatch(
            index=fed.j,
            gids=fed.gids,
            keys=keys,
            shards=shards,
            texts=fed.texts,
            meta=fed.metas,
            image=out["image"],
            normalised=True,
            mask=out.get("mask"),
            boxes=boxes if self.load_boxes else None,
            errors=errors,
        )
        hb.select(keep)
        hb.filled = filled
        if self.tokenizer is not None and len(hb):
            hb.input_ids, hb.attention_mask, hb.tokenize_s = self.tokenizer(hb.texts)
        hb.work_s = time.perf_counter() - t0
        return hb

    def _diagnose(self, plan: RankPlan, j: int, exc: Exception) -> None:
        """DALI failed fetching batch j: find the bad samples on the CPU (that batch first, then the
        ones DALI may have been running ahead on) and record them; re-raise if none is found."""
        reader = SampleReader(self.index)
        try:
            for batch in plan.batches[j : j + self.prefetch + 1]:
                found = {}
                for gid in batch.tolist():
                    if gid not in self.bad and gid not in found:
                        reason = check_sample(reader, gid, self.load_masks, self.options.bounds)
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
        names = sorted({self.index.locate(g)[0].name for g in plan.batches[j].tolist()})
        raise RuntimeError(
            f"DALI failed on batch {j} (shards {names}) but every sample of it decodes on the CPU: {exc}"
        ) from exc

    def _produce(self, plan: RankPlan, first: int) -> Iterator[HostBatch]:
        j = first
        while j < len(plan):
            self.feed.start(plan, j)
            it = self._iterator()
            self._open = True
            while j < len(plan):
                try:
                    out = next(it)[0]
                except StopIteration:
                    raise RuntimeError(f"DALI stopped at batch {j} of {len(plan)} planned batches") from None
                except RuntimeError as exc:
                    self._discard()
                    self._diagnose(plan, j, exc)
                    if self.stats is not None:
                        self.stats.dali_rebuilds += 1
                    break  # a new pipeline continues from batch j
                fed = self.feed.fed.pop(0)
                yield self._unpack(out, fed)
                j = fed.j + 1
        if self._it is not None:
            # The feed ended the pass on DALI's next call: collect that end, so the next pass starts clean.
            try:
                next(self._it)
            except StopIteration:
                return
            raise RuntimeError("DALI produced a batch beyond the plan")

    def iterate(self, plan: RankPlan, first: int) -> Iterator[HostBatch]:
        """Run `_produce` in a background thread, `prefetch` batches ahead of the consumer."""
        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()

        def work():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            try:
                for hb in self._produce(plan, first):
                    while not stop.is_set():
                        try:
                            q.put(("batch", hb), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        break
                else:
                    q.put(("end", None))
                    return
                self._drain()
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

    def close(self) -> None:
        self._discard()
        self.feed.close()


class DaliBackend(Backend):
    """Local shards decoded and augmented in a DALI graph (nvJPEG with `data.dali_decode=auto` and CUDA);
    batches arrive normalised, so the device step has nothing of the backend's to do."""

    name = "dali"

    def gpu_decode(self, cfg: DataConfig, cuda: bool) -> bool:
        return cuda and cfg.dali_decode == "auto"

    def start(
        self,
        index: DatasetIndex,
        plan_args: PlanArgs,
        options: BackendOptions,
        tokenizer: BatchTokenizer | None,
        bad: dict[int, str],
        stats: LoaderStats,
        max_batches: int,
    ) -> DaliBatches:
        return DaliBatches(index, options, tokenizer, bad, stats)
