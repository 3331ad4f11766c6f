"""What the loader yields (`Batch`), what it tells a backend once (`BackendOptions`), what a backend
hands it back (`HostBatch`), the loader's counters (`LoaderStats`) and the per-sample CPU
reading/decoding both backends share.

Bad samples: a sample that cannot be read (undecodable jpg/png, text that is not UTF-8, json that is
not an object) is removed from its batch and recorded with its shard, key and reason. In training
(`keep_size`, i.e. drop_last) the batch is refilled to B with copies of its first good samples, so
every rank still yields B-row batches and collectives that assume equal shapes (all_gather of
embeddings) never see a short rank; in evaluation the batch just shrinks, so no sample is counted
twice.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from PIL import Image

from pipeline.plan import EXT_COLUMN, DatasetIndex, ShardIndex
from pipeline.transforms import TransformSpec
from shards.schema import TAR_BLOCK, check_member_crcs, check_member_header, stale_index_message

# What PIL, json and UTF-8 decoding raise for damaged bytes (JSONDecodeError and UnicodeDecodeError
# are ValueErrors; UnidentifiedImageError and truncated files are OSErrors).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class CorruptSampleError(RuntimeError):
    """A sample could not be read and data.on_error is "raise"; the message names shard and key."""


class SampleError(Exception):
    """One sample failed; `reason` says which member and why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Batch:
    image: torch.Tensor  # [B, C, H, W] float32, normalised, on the device
    keys: list[str]
    meta: list[dict]  # parsed <key>.json
    texts: list[str]
    input_ids: torch.Tensor | None = None  # [B, L] int64, L = longest report (<= max_text_length)
    attention_mask: torch.Tensor | None = None  # [B, L] int64, 1 = real token
    mask: torch.Tensor | None = None  # [B, 1, H, W] float32 in {0, 1}, same warp as the image
    boxes: list[torch.Tensor] | None = None  # B x [n_i, 4] float32 (x1, y1, x2, y2) output pixels

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class ImageBounds:
    """What the stored-sample contract (shards/schema.py) allows an image header to say, checked before
    any pixel is decoded: the packer reduced every stored image to a longer side of at most its
    `max_side` (manifest "config"), from a source of at most `max_pixels`, and recorded the result in
    the json's `stored_size`. A header beyond them is bad data, not a large image: a 10 KB JPEG can
    claim 30000x30000 and cost seconds of decode (libjpeg fills the missing scans with grey)."""

    max_side: int | None  # the packing's max_side; None: the manifest does not say
    max_pixels: int

    @classmethod
    def of_manifest(cls, manifest: dict) -> ImageBounds:
        config = manifest.get("config")
        config = config if isinstance(config, dict) else {}

        def positive(name: str) -> int | None:
            value = config.get(name)
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

        max_pixels = positive("max_pixels")
        if max_pixels is None:  # a packing that does not record its limits: the packer's default
            # Imported here only: shards.image pulls in pydicom (0.8 s), which the loader never needs.
            from shards.image import DEFAULT_MAX_PIXELS

            max_pixels = DEFAULT_MAX_PIXELS
        return cls(positive("max_side"), max_pixels)

    def check(self, data: bytes, ext: str, meta: dict, expected: tuple[int, int] | None = None) -> tuple[int, int]:
        """The (w, h) the image header of member `ext` declares (no decode), or `SampleError` when it is
        out of bounds, differs from the json's `stored_size` (jpg) or from `expected` (a mask)."""
        size = (jpeg_size(data) if ext == "jpg" else None) or peek_size(data, ext)
        w, h = size
        stored = meta.get("stored_size") if ext == "jpg" else None
        if stored is not None and list(stored) != [w, h]:
            raise SampleError(f"{ext}: header says {w}x{h}, json stored_size says {stored}")
        if self.max_side is not None and max(w, h) > self.max_side:
            raise SampleError(
                f"{ext}: header says {w}x{h}, beyond the packing's max_side {self.max_side} "
                "(stored images are reduced to it)"
            )
        if w * h > self.max_pixels:
            raise SampleError(f"{ext}: header says {w}x{h} = {w * h} pixels > max_pixels {self.max_pixels}")
        if expected is not None and size != expected:
            raise SampleError(f"{ext}: mask is {size}, image is {expected}")
        return size


@dataclass(frozen=True)
class BackendOptions:
    """What the loader decides once, from its DataConfig and device, for either backend."""

    spec: TransformSpec
    seed: int  # augmentation draws (pipeline/transforms.py), DALI's pipeline seed
    batch_size: int
    workers: int  # torch: DataLoader worker processes; dali: CPU threads
    prefetch: int  # batches in flight per worker (torch) / DALI queue depth
    keep_size: bool  # refill a batch that lost bad samples to batch_size (drop_last)
    on_error: str  # "skip" | "raise" (DALI diagnoses its own failures)
    load_masks: bool
    load_boxes: bool
    device: torch.device
    gpu_decode: bool  # torch: nvJPEG in the loader (data.torch_gpu_decode); dali: "mixed" decode
    profile: bool = False  # workers time each stage (HostBatch.stage_s)
    # Image headers, checked before decoding: the manifest's (Loader); without one, the packer's defaults.
    bounds: ImageBounds = field(default_factory=lambda: ImageBounds.of_manifest({}))

    @property
    def exts(self) -> tuple[str, ...]:
        """The members a sample is read with."""
        return ("jpg", "txt", "json") + (("png",) if self.load_masks else ())


# HostBatch fields sent from a worker process pickled inline as numpy arrays: a tensor would be
# moved to a shared-memory segment of its own (created, sent as a file descriptor over a socket,
# mapped, unmapped), ~0.1-0.5 ms each for a few hundred bytes of colour parameters or tokens.
_INLINE = ("colour", "input_ids", "attention_mask")
_INLINE_LISTS = ("boxes", "jpeg")


@dataclass
class HostBatch:
    """One planned batch as a backend produced it, before the loader's device step."""

    index: int  # batch number in the rank's epoch plan
    gids: list[int]  # global sample ids (pipeline/plan.py)
    keys: list[str]
    shards: list[str]
    texts: list[str]
    meta: list[dict]
    image: torch.Tensor | None  # uint8 [n, 1, H, W] (torch) | float [n, C, H, W] normalised (dali)
    normalised: bool = False
    colour: torch.Tensor | None = None  # [n, 2] (brightness, contrast) still to apply
    mask: torch.Tensor | None = None  # uint8 [n, 1, H, W] 0/255
    boxes: list[torch.Tensor] | None = None
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    jpeg: list[torch.Tensor] | None = None  # GPU-decode mode: undecoded bytes, uint8 [nbytes] each
    sizes: list[tuple[int, int]] | None = None  # GPU-decode mode: stored (w, h)
    params: list | None = None  # GPU-decode mode: SampleParams per row
    errors: list[dict] = field(default_factory=list)  # {"gid", "key", "shard", "reason"} removed rows
    filled: int = 0  # rows that are copies (keep_size refill)
    tokenize_s: float = 0.0
    work_s: float = 0.0  # time a worker/thread spent building it
    stage_s: dict[str, float] = field(default_factory=dict)  # CPU s per stage (profiling loaders only)

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in _INLINE:
            if isinstance(state[name], torch.Tensor):
                state[name] = state[name].numpy()
        for name in _INLINE_LISTS:
            if state[name] is not None:
                state[name] = [t.numpy() for t in state[name]]
        return state

    def __setstate__(self, state: dict) -> None:
        for name in _INLINE:
            if isinstance(state[name], np.ndarray):
                state[name] = torch.from_numpy(state[name])
        for name in _INLINE_LISTS:
            if state[name] is not None:
                state[name] = [torch.from_numpy(a) for a in state[name]]
        self.__dict__.update(state)

    def pin_memory(self) -> HostBatch:
        """Called by the DataLoader's pin-memory thread (CUDA only): page-locked host tensors make the
        host->device copies asynchronous."""
        for name in ("image", "colour", "mask", "input_ids", "attention_mask"):
            value = getattr(self, name)
            if value is not None and value.device.type == "cpu":
                setattr(self, name, value.pin_memory())
        return self

    def select(self, rows: list[int]) -> HostBatch:
        """Keep `rows` (in that order; repeats allowed) of every row-wise field."""
        idx = torch.as_tensor(rows, dtype=torch.long)

        def take(t):
            return None if t is None else t.index_select(0, idx.to(t.device))

        def pick(seq):
            return None if seq is None else [seq[r] for r in rows]

        self.gids, self.keys, self.shards = pick(self.gids), pick(self.keys), pick(self.shards)
        self.texts, self.meta = pick(self.texts), pick(self.meta)
        self.image, self.colour, self.mask = take(self.image), take(self.colour), take(self.mask)
        self.input_ids, self.attention_mask = take(self.input_ids), take(self.attention_mask)
        self.boxes, self.jpeg, self.sizes, self.params = (
            pick(self.boxes),
            pick(self.jpeg),
            pick(self.sizes),
            pick(self.params),
        )
        return self


def resolve_rows(ok: list[bool], keep_size: bool) -> tuple[list[int], int]:
    """Rows to keep for a batch whose rows `ok` says are good: (rows, number of refill copies)."""
    good = [i for i, flag in enumerate(ok) if flag]
    if not keep_size or not good or len(good) == len(ok):
        return good, 0
    missing = len(ok) - len(good)
    return good + [good[i % len(good)] for i in range(missing)], missing


@dataclass
class LoaderStats:
    samples: int = 0  # rows yielded (refill copies included)
    batches: int = 0
    skipped: int = 0  # bad samples removed from batches
    skipped_by_reason: Counter = field(default_factory=Counter)  # reason prefix ("jpg", "json", ...) -> n
    skipped_samples: list[dict] = field(default_factory=list)  # {"key", "shard", "reason", "epoch"}
    filled: int = 0  # refill copies added to keep the batch size
    data_wait_s: float = 0.0  # time the consumer spent waiting for the next batch
    tokenize_s: float = 0.0  # summed over the batches (in workers / the prefetch thread)
    worker_s: float = 0.0  # time spent producing batches, summed over workers/threads
    dali_rebuilds: int = 0  # DALI pipelines rebuilt after a decode failure
    stage_s: Counter = field(default_factory=Counter)  # worker CPU s per stage (build_loader(profile=True))

    def as_dict(self) -> dict:
        return {
            "samples": self.samples,
            "batches": self.batches,
            "skipped": self.skipped,
            "skipped_by_reason": dict(self.skipped_by_reason),
            "skipped_samples": list(self.skipped_samples),
            "filled": self.filled,
            "data_wait_s": self.data_wait_s,
            "tokenize_s": self.tokenize_s,
            "tokenize_s_per_batch": self.tokenize_s / max(1, self.batches),
            "worker_s": self.worker_s,
            "dali_rebuilds": self.dali_rebuilds,
            "stage_s": dict(self.stage_s),
        }


# ---- reading planned samples on the CPU -----------------------------------------------------------


class SampleReader:
    """Reads members of planned samples with pread at the offsets the index gives: tar members are
    read in memory, never extracted, and no tar parsing happens at read time. One descriptor per
    shard, opened lazily (so each worker process opens its own).

    A sample's members are adjacent in the tar (the writer puts them in MEMBER_ORDER), so one pread
    from the first member's header to the last member's end gets them all, headers included: each
    header is compared with the index (name and size), which costs no extra read and turns a stale
    index into an error with the right cause instead of "json invalid"."""

    def __init__(self, index: DatasetIndex):
        self.index = index
        self._fds: dict[str, int] = {}

    def read(self, gid: int, exts: tuple[str, ...]) -> dict[str, bytes]:
        shard, row = self.index.locate(gid)
        return self.read_row(shard, row, exts)

    def read_row(self, shard: ShardIndex, row: int, exts: tuple[str, ...]) -> dict[str, bytes]:
        fd = self._fds.get(shard.path)
        if fd is None:
            fd = self._fds[shard.path] = os.open(shard.path, os.O_RDONLY)
        # Plain ints from here: numpy reductions on 3-element rows cost more than the read itself.
        row_offsets, row_sizes = shard.offsets[row].tolist(), shard.sizes[row].tolist()
        offsets = [row_offsets[EXT_COLUMN[ext]] for ext in exts]
        sizes = [row_sizes[EXT_COLUMN[ext]] for ext in exts]
        start, stop = min(offsets) - TAR_BLOCK, max(o + n for o, n in zip(offsets, sizes))
        # Adjacent members: at most a header and < 1 block of padding per member besides the data.
        span = None
        if start >= 0 and stop - start <= sum(sizes) + 2 * TAR_BLOCK * len(exts):
            span = os.pread(fd, stop - start, start)
        out = {}
        for ext, offset, size in zip(exts, offsets, sizes):
            if span is not None:
                block = span[offset - TAR_BLOCK - start : offset + size - start]
            else:
                block = os.pread(fd, size + TAR_BLOCK, offset - TAR_BLOCK) if offset >= TAR_BLOCK else b""
            if len(block) != size + TAR_BLOCK:  # the tar shrank after the loader started
                raise SampleError(f"{ext}: short read ({max(0, len(block) - TAR_BLOCK)} of {size} bytes)")
            problem = check_member_header(block[:TAR_BLOCK], f"{shard.keys[row]}.{ext}", size)
            if problem is not None:
                raise SampleError(stale_index_message(shard.name, problem))
            out[ext] = block[TAR_BLOCK:]
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def text_and_meta(members: dict[str, bytes]) -> tuple[str, dict]:
    """The sample's text and json, after checking every member it has against the CRCs its json
    records (zlib: 3-5 us for a 256-px sample, bench-pipeline): damage that still decodes (zeroed bytes
    inside a JPEG's scan data) is a bad sample like any other, reason "<ext>: crc32 mismatch"."""
    meta = decode_meta(members["json"])
    problem = check_member_crcs(meta, members)
    if problem is not None:
        raise SampleError(problem)
    return decode_text(members["txt"]), meta


def decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleError(f"txt: not UTF-8 ({exc})") from None


def decode_meta(data: bytes) -> dict:
    try:
        meta = json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise SampleError(f"json: invalid ({exc})") from None
    if not isinstance(meta, dict):
        raise SampleError(f"json: expected an object, got {type(meta).__name__}")
    return meta


def open_gray(data: bytes, ext: str, draft_size=None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode an 8-bit grey image -> (image, stored (w, h)). `draft_size(w, h)` may return a size
    that lets libjpeg scale by 1/2, 1/4 or 1/8 in the DCT domain while staying >= it: several times
    cheaper than a full decode when the stored image is much larger than the output. The returned
    image is then smaller than the stored size, which geometry must still be computed from."""
    try:
        img = Image.open(io.BytesIO(data))
        size = img.size
        if draft_size is not None and img.format == "JPEG":
            img.draft("L", draft_size(*size))
        img.load()
        if img.mode != "L":
            img = img.convert("L")
    except DECODE_ERRORS as exc:
        raise SampleError(f"{ext}: cannot decode ({type(exc).__name__}: {exc})") from None
    return img, size


# cv2.imdecode flags per libjpeg DCT scale (1/1, 1/2, 1/4, 1/8); EXIF orientation ignored, as PIL does.
_CV_GRAY = {
    1: cv2.IMREAD_GRAYSCALE,
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT/JPG/DAC)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(w, h) from a JPEG's start-of-frame header (a few us, no decode); None unless `data` is a
    JPEG whose markers parse up to it."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _SOF:
            h, w = int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
            return (w, h) if w and h else None
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def decode_gray(data: bytes, ext: str, draft_size) -> tuple[np.ndarray, tuple[int, int]]:
    """`open_gray` as a [h, w] uint8 array: JPEGs by OpenCV's libjpeg-turbo (cv2.imdecode, with the
    same DCT scaling PIL's draft would pick), 0.11 vs 0.18 CPU-ms at 256 px, since the array needs no
    PIL image, plugin probing or copy out of it. Anything else, and any JPEG that does not end in its
    EOI marker (libjpeg only warns about truncated data) or that OpenCV rejects, goes through PIL, so
    a bad image fails with PIL's reason, as before."""
    size = jpeg_size(data)
    if size is not None and data.endswith(b"\xff\xd9"):
        want = draft_size(*size)
        ratio = min(size[0] // want[0], size[1] // want[1])
        scale = next((s for s in (8, 4, 2) if ratio >= s), 1)  # PIL's JpegImageFile.draft choice
        pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _CV_GRAY[scale] | cv2.IMREAD_IGNORE_ORIENTATION)
        if pixels is not None and pixels.shape == (-(-size[1] // scale), -(-size[0] // scale)):
            return pixels, size
    img, size = open_gray(data, ext, draft_size)
    return np.asarray(img), size


def peek_size(data: bytes, ext: str) -> tuple[int, int]:
    """(w, h) from the image header only (no decode)."""
    try:
        return Image.open(io.BytesIO(data)).size
    except DECODE_ERRORS as exc:
        raise SampleError(f"{ext}: cannot decode ({type(exc).__name__}: {exc})") from None


def check_sample(reader: SampleReader, gid: int, need_mask: bool, bounds: ImageBounds) -> str | None:
    """Full CPU decode of every member; the reason it is bad, or None. Finds the culprit when DALI
    fails a whole batch."""
    exts = ("jpg", "txt", "json") + (("png",) if need_mask else ())
    try:
        members = reader.read(gid, exts)
        _, meta = text_and_meta(members)
        size = bounds.check(members["jpg"], "jpg", meta)
        open_gray(members["jpg"], "jpg")
        if need_mask:
            bounds.check(members["png"], "png", meta, expected=size)
            open_gray(members["png"], "png")
    except SampleError as exc:
        return exc.reason
    return None


def boxes_of(meta: dict) -> np.ndarray:
    """json "boxes" [[x1, y1, x2, y2], ...] in stored pixels -> [n, 4] (no key: no boxes)."""
    try:
        boxes = np.asarray(meta.get("boxes", []), dtype=np.float32).reshape(-1, 4)
    except (TypeError, ValueError) as exc:
        raise SampleError(f"json: bad 'boxes' ({exc})") from None
    return boxes
