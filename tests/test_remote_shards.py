"""Streamed shards (pipeline/stream.py): URL specs served by a local HTTP server, pipe: and file://.

The guarantees of docs/streaming.md, each against the local loader or an uninterrupted run: the same
samples decoded the same way, a plan independent of the URL form and of num_workers, exact resume,
disjoint ranks, a clear error (naming the URL) for every way a remote read can fail, and the local
loader's bounds (paths inside the dataset root, member sizes, image headers, a deadline per transfer).
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import tarfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError
from common.dist import DistInfo
from pipeline import CorruptSampleError, CorruptSampleWarning, DataConfig, build_loader, stream
from pipeline.batch import BackendOptions, ImageBounds, SampleError
from pipeline.config import is_url
from pipeline.stream import MAX_MEMBER_BYTES, RemoteShardError, TransferTimeout, interleave, shuffle_buffer
from shards.image import DEFAULT_MAX_PIXELS
from shards.schema import MEMBER_CRC_FIELD, ManifestError, member_crc32
from shards.writer import PackedSample, pack_splits
from tests.pipeline_fixtures import Item, all_texts, build_sample, corrupt_member, pack_tiny, tiny_tokenizer

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TRAIN_TARS = "train/train-{000000..000006}.tar"  # pack_tiny: 52 train samples, 8 per shard


class Handler(http.server.SimpleHTTPRequestHandler):
    """Static files; a path in `flaky` has its first transfer cut off halfway (a dropped connection), one
    in `trickle` is sent a byte every 0.1 s (each read well within the read timeout; the transfer never
    ends in time)."""

    flaky: set[str] = set()
    trickle: set[str] = set()
    requests: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        if self.path in self.flaky:
            self.flaky.discard(self.path)
            data = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path in self.trickle:
            data = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:  # the client gave up
                pass
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(served directory, base URL): the tiny dataset and a masked one, plus room for damaged copies."""
    top = tmp_path_factory.mktemp("served")
    pack_tiny(top / "tiny")
    pack_tiny(top / "masks", n_train=24, n_valid=8, masks=True, seed=3)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(top)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield top, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def tokenizer(served):
    return tiny_tokenizer(all_texts(served[0] / "tiny"))


@pytest.fixture
def no_retry_delay(monkeypatch):
    monkeypatch.setattr(stream, "RETRY_DELAY_S", 0.0)


def config(shards, **kw) -> DataConfig:
    base = dict(
        shards=str(shards),
        backend="torch",
        batch_size_per_gpu=4,
        num_workers=0,
        prefetch=2,
        seed=7,
        transform="g2d_train",
        stream_lanes=2,
        stream_buffer=8,
    )
    base.update(kw)
    return DataConfig(**base)


def collect(loader) -> list:
    return list(loader)


def by_key(batches) -> dict[str, torch.Tensor]:
    return {k: b.image[i] for b in batches for i, k in enumerate(b.keys)}


# ---- configuration ------------------------------------------------------------------------------


def test_url_specs_are_told_from_paths_and_dali_is_refused():
    for spec in ("https://h/x-{0..3}.tar", "pipe:aws s3 cp s3://b/x.tar -", "s3://b/x.tar", "file:///d/x.tar"):
        assert is_url(spec)
    for spec in ("data/shards/mimic", "/abs/path", "C:/data/shards"):
        assert not is_url(spec)
    with pytest.raises(ConfigError, match="DALI reads members by offset"):
        DataConfig(shards="https://h/x.tar", backend="dali")
    with pytest.raises(ConfigError, match="data.manifest is for streamed shards"):
        DataConfig(shards="data/shards/mimic", manifest="https://h/manifest.json")
    with pytest.raises(ConfigError, match="stream_lanes"):
        DataConfig(shards="https://h/x.tar", stream_lanes=0)


def test_interleave_and_shuffle_buffer_keep_every_item_once():
    runs = [np.arange(0, 3), np.arange(10, 12), np.arange(20, 24)]
    assert interleave(runs, 2).tolist() == [0, 10, 1, 11, 2, 20, 21, 22, 23]
    items = np.arange(50)
    out = shuffle_buffer(items, 8, np.random.default_rng(0))
    assert sorted(out.tolist()) == items.tolist() and out.tolist() != items.tolist()
    # A buffer of 8 cannot move an item earlier than its arrival minus 7 places.
    assert all(pos >= item - 7 for pos, item in enumerate(out.tolist()))


# ---- the same data as the local loader ---------------------------------------------------------


def test_every_url_form_streams_the_local_samples_decoded_identically(served, tokenizer):
    top, base = served
    local = build_loader(config(top / "tiny"), "train", CPU, tokenizer=tokenizer)
    local_batches = collect(local)
    want = by_key(local_batches)
    specs = [
        f"{base}/tiny",  # the dataset root
        f"{base}/tiny/{TRAIN_TARS}",
        f"pipe:cat {top}/tiny/{TRAIN_TARS}",
        f"file://{top}/tiny/{TRAIN_TARS}",
    ]
    runs = {}
    for spec in specs:
        for workers in (0, 2):
            loader = build_loader(config(spec, num_workers=workers), "train", CPU, tokenizer=tokenizer)
            assert len(loader) == len(local) == 52 // 4
            batches = collect(loader)
            assert all(len(b) == 4 and b.input_ids.shape[0] == 4 for b in batches)
            runs[spec, workers] = batches
    reference = runs[specs[0], 0]
    for batches in runs.values():  # the plan depends on neither the URL form nor the worker count
        assert [b.keys for b in batches] == [b.keys for b in reference]
        assert all(torch.equal(a.image, b.image) for a, b in zip(batches, reference))
    got = by_key(reference)
    assert set(got) == set(want)  # the same epoch's samples (drop_last keeps 52 of 52)
    for key, image in got.items():  # augmentation draws depend on (seed, epoch, key) only
        assert torch.equal(image, want[key]), key
    # A batch mixes shards (lanes read shard_mix=4 shards at once through the shuffle buffer).
    shards_per_batch = [len({int(k[2:]) // 8 for k in b.keys}) for b in reference]  # 8 keys per shard, in order
    assert max(shards_per_batch) >= 2


def test_another_split_is_read_from_beside_the_listed_tars(served):
    top, base = served
    cfg = config(f"{base}/tiny/{TRAIN_TARS}", shuffle=False, drop_last=False)
    keys = [k for b in build_loader(cfg, "valid", CPU) for k in b.keys]
    assert sorted(keys) == [f"va{i:04d}" for i in range(20)]


def test_epochs_reshuffle_and_a_subset_streams_only_its_keys(served):
    top, base = served
    loader = build_loader(config(f"{base}/tiny"), "train", CPU)
    epoch0 = [b.keys for b in collect(loader)]
    loader.set_epoch(1)
    epoch1 = [b.keys for b in collect(loader)]
    assert epoch0 != epoch1 and sorted(sum(epoch0, [])) == sorted(sum(epoch1, []))
    half = build_loader(config(f"{base}/tiny", subset="0.5", drop_last=False), "train", CPU)
    keys = [k for b in half for k in b.keys]
    assert sorted(keys) == [f"tr{i:04d}" for i in range(0, 52, 2)]
    # data.max_samples picks the same samples streamed as read locally (the keys' hashes alone).
    capped = dict(shuffle=False, drop_last=False, max_samples=7)
    streamed = [k for b in build_loader(config(f"{base}/tiny", **capped), "train", CPU) for k in b.keys]
    local = [k for b in build_loader(config(str(top / "tiny"), **capped), "train", CPU) for k in b.keys]
    assert len(streamed) == 7 and streamed == local


# ---- resume and ranks -----------------------------------------------------------------------------


def test_resume_mid_epoch_yields_the_tail_of_the_uninterrupted_epoch(served, tokenizer):
    top, base = served
    cfg = config(f"{base}/tiny", num_workers=2, stream_lanes=4)
    full_loader = build_loader(cfg, "train", CPU, tokenizer=tokenizer)
    full_loader.set_epoch(3)
    full = collect(full_loader)

    first = build_loader(cfg, "train", CPU, tokenizer=tokenizer)
    first.set_epoch(3)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()
    it.close()
    assert state["batches"] == 5 and state["stream"]["lanes"] == 4

    Handler.requests.clear()
    resumed = build_loader(config(f"{base}/tiny", num_workers=1, stream_lanes=4), "train", CPU, tokenizer=tokenizer)
    resumed.load_state_dict(state)
    tail = collect(resumed)
    assert [b.keys for b in head + tail] == [b.keys for b in full]
    assert all(torch.equal(a.image, b.image) for a, b in zip(head + tail, full))
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(head + tail, full))
    # Shards none of whose remaining samples is needed were not requested again.
    needed = {int(k[2:]) // 8 for b in tail for k in b.keys}
    fetched = {int(p.rsplit("-", 1)[1][:6]) for p in Handler.requests if p.endswith(".tar")}
    assert fetched == needed

    # Other streaming settings mean another plan: replay the epoch from its start, with a warning.
    other = build_loader(config(f"{base}/tiny", stream_lanes=2), "train", CPU)
    with pytest.warns(UserWarning, match="restarting epoch 3"):
        other.load_state_dict(state)
    assert other.state_dict()["batches"] == 0


def test_ranks_read_disjoint_blocks_of_equal_length(served):
    top, base = served
    cfg = config(f"{base}/tiny", batch_size_per_gpu=3)
    per_rank = []
    for rank in range(2):
        dist = DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        loader = build_loader(cfg, "train", dist)
        per_rank.append([k for b in loader for k in b.keys])
        assert len(loader) == 52 // (2 * 3)
    assert len(per_rank[0]) == len(per_rank[1]) == 8 * 3
    assert not set(per_rank[0]) & set(per_rank[1])


# ---- bad data and broken transfers -----------------------------------------------------------------


def test_a_corrupt_sample_is_skipped_and_recorded_or_raises(served, tmp_path):
    top, base = served
    copy = top / "corrupt"
    if not copy.exists():
        shutil.copytree(top / "tiny", copy)
        corrupt_member(copy, json.loads((copy / "manifest.json").read_text()), "tr0009", "jpg")
    loader = build_loader(config(f"{base}/corrupt"), "train", CPU)
    with pytest.warns(CorruptSampleWarning, match="tr0009"):
        batches = collect(loader)
    assert len(batches) == len(loader) and all(len(b) == 4 for b in batches)
    assert "tr0009" not in {k for b in batches for k in b.keys}
    stats = loader.stats.as_dict()
    assert stats["skipped"] == 1 and stats["skipped_by_reason"] == {"jpg": 1}
    strict = build_loader(config(f"{base}/corrupt", on_error="raise"), "train", CPU)
    with pytest.raises(CorruptSampleError, match=rf"{base}/corrupt/train/train-000001.tar: sample tr0009"):
        collect(strict)


def test_a_dropped_connection_is_retried_transparently(served, no_retry_delay):
    top, base = served
    cfg = config(f"{base}/tiny", shuffle=False)
    want = [b.keys for b in build_loader(cfg, "train", CPU)]
    Handler.flaky = {"/tiny/train/train-000002.tar", "/tiny/train/train-000005.tar"}
    assert [b.keys for b in build_loader(cfg, "train", CPU)] == want
    assert not Handler.flaky  # both were cut once


def test_remote_failures_name_the_url(served, tmp_path, no_retry_delay):
    top, base = served
    with pytest.raises(RemoteShardError, match=rf"{base}/nowhere/manifest.json: HTTP 404"):
        build_loader(config(f"{base}/nowhere"), "train", CPU)
    with pytest.raises(RemoteShardError, match="127.0.0.1:9/manifest.json: unreachable"):
        build_loader(config("http://127.0.0.1:9"), "train", CPU)
    with pytest.raises(ManifestError, match=r"train-000099.tar: not a shard .*manifest.json lists"):
        build_loader(config(f"{base}/tiny/train/train-000099.tar"), "train", CPU)
    with pytest.raises(RemoteShardError, match=r"s3://bucket/mimic/manifest.json: .*s3fs"):
        build_loader(config("s3://bucket/mimic/train/train-000000.tar"), "train", CPU)
    with pytest.raises(RemoteShardError, match=r"exit status 1: .*No such file"):
        build_loader(config(f"pipe:cat {tmp_path}/train/train-000000.tar"), "train", CPU)

    # A tar cut short (the server sends what it has): retried, then an error naming it.
    cut = top / "cut"
    if not cut.exists():
        shutil.copytree(top / "tiny", cut)
        tar = cut / "train" / "train-000003.tar"
        tar.write_bytes(tar.read_bytes()[:5000])
    with pytest.raises(RemoteShardError, match=rf"{base}/cut/train/train-000003.tar: .*retries failed|ended after"):
        collect(build_loader(config(f"{base}/cut"), "train", CPU))

    # A shard from another packing than the manifest's: its keys give it away.
    swapped = top / "swapped"
    if not swapped.exists():
        shutil.copytree(top / "tiny", swapped)
        shutil.copy(swapped / "train" / "train-000000.tar", swapped / "train" / "train-000001.tar")
    with pytest.raises(ManifestError, match=r"train-000001.tar: sample 0 is 'tr0000' where .* lists 'tr0008'"):
        collect(build_loader(config(f"{base}/swapped", shuffle=False, num_workers=2), "train", CPU))

    # Masks asked of a dataset without them: fatal, as the local index makes it.
    with pytest.raises(ManifestError, match=r"has no .png member \(data.load_masks needs a dataset with masks\)"):
        collect(build_loader(config(f"{base}/tiny", load_masks=True), "train", CPU))


def test_masks_stream_and_a_manifest_without_key_lists_still_reads(served, tmp_path):
    top, base = served
    cfg = config(f"{base}/masks", load_masks=True, shuffle=False, drop_last=False)
    local = build_loader(DataConfig(**{**cfg.__dict__, "shards": str(top / "masks")}), "train", CPU)
    want = {k: b.mask[i] for b in local for i, k in enumerate(b.keys)}
    streamed = collect(build_loader(cfg, "train", CPU))
    got = {k: b.mask[i] for b in streamed for i, k in enumerate(b.keys)}
    assert set(got) == set(want) and len(got) == 24
    assert all(torch.equal(got[k], want[k]) for k in want)

    # data.manifest points elsewhere; without `_shard_records` the keys are learnt as samples arrive.
    manifest = json.loads((top / "masks" / "manifest.json").read_text())
    del manifest["_shard_records"]
    (top / "masks_manifest.json").write_text(json.dumps(manifest))
    bare = DataConfig(**{**cfg.__dict__, "manifest": f"{base}/masks_manifest.json"})
    assert [b.keys for b in build_loader(bare, "train", CPU)] == [b.keys for b in streamed]
    with pytest.raises(ManifestError, match="data.subset needs the shards' key lists"):
        build_loader(DataConfig(**{**bare.__dict__, "subset": "0.5"}), "train", CPU)
    with pytest.raises(ManifestError, match="data.max_samples needs the shards' key lists"):
        build_loader(DataConfig(**{**bare.__dict__, "max_samples": 5}), "train", CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(collect(build_loader(bare, "valid", CPU))) == 2


# ---- the local loader's bounds ------------------------------------------------------------------


def test_a_manifest_entry_outside_the_root_is_refused_as_locally(served, tmp_path):
    """`../outside/evil.tar` in the manifest: refused over http://, file:// and pipe: with the local
    loader's message (the tar exists, so reading it would have worked)."""
    top, base = served
    evil = top / "evil"
    if not evil.exists():
        shutil.copytree(top / "tiny", evil)
        (top / "outside").mkdir()
        shutil.copy(evil / "valid" / "valid-000000.tar", top / "outside" / "evil.tar")
        shutil.copy(evil / "valid" / "valid-000000.idx", top / "outside" / "evil.idx")
        manifest = json.loads((evil / "manifest.json").read_text())
        entry = manifest["splits"]["valid"]["shards"][0]
        entry["name"], entry["index"] = "../outside/evil.tar", "../outside/evil.idx"
        (evil / "manifest.json").write_text(json.dumps(manifest))
    named = "split 'valid' names '../outside/evil.tar', which resolves to"
    with pytest.raises(ManifestError, match=f"{evil}/manifest.json: {named} .*, outside the shard root"):
        build_loader(config(evil), "valid", CPU)  # the local loader
    tars = "train/train-{000000..000006}.tar"
    for spec in (f"{base}/evil", f"file://{evil}", f"pipe:cat {evil}/{tars}", f"{base}/evil/{tars}"):
        with pytest.raises(ManifestError, match=f"manifest.json: {named} .*, outside the shard root") as exc:
            build_loader(config(spec), "valid", CPU)
        assert "\n" not in str(exc.value)
    # %-escaped dots decode to ".." on the server's side: refused too.
    escaped = json.loads((evil / "manifest.json").read_text())
    escaped["splits"]["valid"]["shards"][0]["name"] = "%2e%2e/outside/evil.tar"
    (top / "escaped.json").write_text(json.dumps(escaped))
    with pytest.raises(ManifestError, match="names '%2e%2e/outside/evil.tar'.*outside the shard root"):
        build_loader(config(f"{base}/evil", manifest=f"{base}/escaped.json"), "valid", CPU)


def test_a_member_header_claiming_a_gibibyte_fails_at_once_naming_shard_and_member(served):
    """A tar header whose size field says 1 GiB: one error naming the shard and the member, before
    anything of it is read (not retried: re-reading the same bytes cannot help)."""
    top, base = served
    huge = top / "huge"
    if not huge.exists():
        shutil.copytree(top / "tiny", huge)
        tar_path = huge / "train" / "train-000000.tar"
        out = bytearray()
        with tarfile.open(tar_path) as tar:
            for info in tar:
                data = tar.extractfile(info).read()
                header = info.tobuf(format=tarfile.USTAR_FORMAT)
                if info.name == "tr0001.jpg":  # the header lies; the bytes that follow are the real ones
                    info.size = 2**30
                    header = info.tobuf(format=tarfile.USTAR_FORMAT)
                out += header + data + bytes(-len(data) % 512)
        tar_path.write_bytes(bytes(out) + bytes(1024))
    Handler.requests = []
    t0 = time.monotonic()
    with pytest.raises(ManifestError) as exc:
        collect(build_loader(config(f"{base}/huge", shuffle=False), "train", CPU))
    message = str(exc.value)
    assert message.startswith(f"{base}/huge/train/train-000000.tar: member 'tr0001.jpg' declares 1073741824 bytes")
    assert f"over the {MAX_MEMBER_BYTES // 2**20} MiB" in message and time.monotonic() - t0 < 10
    assert Handler.requests.count("/huge/train/train-000000.tar") == 1


def sof_offset(jpeg: bytes) -> int:
    """Offset of the JPEG's start-of-frame marker (its height and width follow at +5 and +7)."""
    i = 2
    while jpeg[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(jpeg[i + 2 : i + 4], "big")
    return i


def with_header_size(jpeg: bytes, width: int, height: int) -> bytes:
    i = sof_offset(jpeg)
    return jpeg[: i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[i + 9 :]


BOMBS = {"tr0003": "json agrees", "tr0010": "json disagrees"}  # keys whose JPEG header says 30000x30000


def build_bomb_sample(item: Item) -> PackedSample:
    """The tiny fixture's sample; for BOMBS keys the JPEG's header claims 30000x30000 (a ~3 KB file),
    with the json's CRC recomputed (a consistent sample as a packer could write it)."""
    sample = build_sample(item)
    if item.key in BOMBS:
        jpg = with_header_size(sample.members["jpg"], 30000, 30000)
        meta = json.loads(sample.members["json"])
        if BOMBS[item.key] == "json agrees":
            meta["stored_size"] = [30000, 30000]
        meta.pop(MEMBER_CRC_FIELD, None)
        meta[MEMBER_CRC_FIELD] = {"jpg": member_crc32(jpg), "txt": member_crc32(sample.members["txt"])}
        sample = PackedSample(item.key, {**sample.members, "jpg": jpg, "json": json.dumps(meta).encode()})
    return sample


def test_an_image_header_beyond_the_packing_bounds_is_a_recorded_bad_sample(served):
    """A JPEG whose header says 30000x30000 (CRCs consistent) is rejected from its header, never
    decoded, and recorded with its reason like any bad sample: streamed and local alike."""
    top, base = served
    bombs = top / "bombs"
    if not bombs.exists():
        items = {"train": [Item(f"tr{i:04d}", i, False) for i in range(16)]}
        pack_splits(
            bombs, items, build_bomb_sample, samples_per_shard=8, workers=1, config={"max_side": 128}, progress=False
        )
    for shards in (f"{base}/bombs", str(bombs)):
        loader = build_loader(config(shards, num_workers=0), "train", CPU)
        t0 = time.process_time()
        with pytest.warns(CorruptSampleWarning):
            batches = collect(loader)
        assert time.process_time() - t0 < 5  # a 30000x30000 decode alone costs 1-2 s of CPU
        seen = {k for b in batches for k in b.keys}
        assert not seen & set(BOMBS) and len(seen) == 14 and all(b.image.shape[-1] == 256 for b in batches)
        reasons = {s["key"]: s["reason"] for s in loader.stats.skipped_samples}
        assert reasons["tr0003"] == "jpg: header says 30000x30000, beyond the packing's max_side 128 " + (
            "(stored images are reduced to it)"
        )
        assert (
            reasons["tr0010"]
            == "jpg: header says 30000x30000, json stored_size says ["
            + ", ".join(
                str(v) for v in json.loads(build_sample(Item("tr0010", 10, False)).members["json"])["stored_size"]
            )
            + "]"
        )
        assert loader.stats.skipped_by_reason == {"jpg": 2}


def test_image_bounds_without_a_max_side_fall_back_to_the_packers_max_pixels():
    jpg = with_header_size(build_sample(Item("k", 1, False)).members["jpg"], 30000, 30000)
    packer_default = ImageBounds.of_manifest({"config": {"tiny": 0}})
    assert (
        packer_default
        == ImageBounds(None, DEFAULT_MAX_PIXELS)
        == BackendOptions.__dataclass_fields__["bounds"].default_factory()
    )
    with pytest.raises(SampleError, match=r"jpg: header says 30000x30000 = 900000000 pixels > max_pixels 50000000"):
        packer_default.check(jpg, "jpg", {})
    assert packer_default.check(with_header_size(jpg, 100, 80), "jpg", {"stored_size": [100, 80]}) == (100, 80)
    recorded = ImageBounds.of_manifest({"config": {"max_side": 512, "max_pixels": 10_000}})
    with pytest.raises(SampleError, match=r"jpg: header says 200x100 = 20000 pixels > max_pixels 10000"):
        recorded.check(with_header_size(jpg, 200, 100), "jpg", {})


def test_a_transfer_that_outlives_its_deadline_fails_naming_the_url(served, no_retry_delay):
    """A server trickling a byte every 0.1 s never trips the 60 s read timeout; data.stream_deadline_s
    bounds the whole transfer: retried, then one error naming the URL."""
    top, base = served
    Handler.trickle = {"/tiny/train/train-000004.tar"}
    try:
        t0 = time.monotonic()
        with pytest.raises(RemoteShardError) as exc:
            collect(build_loader(config(f"{base}/tiny", shuffle=False, stream_deadline_s=0.6), "train", CPU))
        elapsed = time.monotonic() - t0
    finally:
        Handler.trickle = set()
    message = str(exc.value)
    assert message.startswith(f"{base}/tiny/train/train-000004.tar: stream broke at sample 0 of 8"), message
    assert "transfer not finished after 0.6 s (data.stream_deadline_s)" in message and "2 retries failed" in message
    assert elapsed < 15
    # A pipe: command that writes nothing: the same deadline, without any read returning.
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout, match="transfer not finished after 0.3 s"):
        stream.open_url("pipe:sleep 30", deadline_s=0.3).read(512)
    assert time.monotonic() - t0 < 5
    with pytest.raises(ConfigError, match="data.stream_deadline_s=0 must be > 0"):
        config(f"{base}/tiny", stream_deadline_s=0)


@pytest.mark.parametrize("damage", ["entry outside the root", "member header claiming 1 GiB"])
def test_streaming_bounds_reach_the_trainer_as_one_line(damage, mimic_shards, tiny_bert, tmp_path, capsys):
    """The same refusals through `python -m train.pretrain` (file:// shards): one `error:` line, exit 2."""
    import train.pretrain as pretrain
    from common.cli import run_main

    root = tmp_path / "mimic"
    shutil.copytree(mimic_shards, root)
    manifest = json.loads((root / "manifest.json").read_text())
    first = manifest["splits"]["train"]["shards"][0]
    if damage == "entry outside the root":
        (tmp_path / "outside").mkdir()
        shutil.copy(root / first["name"], tmp_path / "outside" / "evil.tar")
        first["name"] = "../outside/evil.tar"
        (root / "manifest.json").write_text(json.dumps(manifest))
        needles = ["split 'train' names '../outside/evil.tar'", "outside the shard root"]
    else:
        tar_path = root / first["name"]
        with tarfile.open(tar_path) as tar:
            infos = [(info, tar.extractfile(info).read()) for info in tar]
        out = bytearray()
        for n, (info, data) in enumerate(infos):
            header = info.tobuf(format=tarfile.USTAR_FORMAT)
            if n == 4:
                info.size = 2**30
                header = info.tobuf(format=tarfile.USTAR_FORMAT)
            out += header + data + bytes(-len(data) % 512)
        tar_path.write_bytes(bytes(out) + bytes(1024))
        needles = [f"{first['name']}: member '{infos[4][0].name}' declares 1073741824 bytes"]
    argv = [
        "--config",
        "configs/pretrain/demo.yaml",
        f"data.shards=file://{root}",
        f"model.text_model={tiny_bert}",
        "train.batch_size_per_gpu=4",
        "data.backend=torch",
        "data.num_workers=0",
        "data.shuffle=false",
        "train.val_every=0",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    with pytest.raises(SystemExit) as info:
        run_main(pretrain.main, argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert info.value.code == 2 and "Traceback" not in err and lines[-1].startswith("error: "), err
    assert all(needle in lines[-1] for needle in needles), lines[-1]
