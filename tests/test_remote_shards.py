"""Streamed shards (pipeline/stream.py): URL specs served by a local HTTP server, pipe: and file://.

The guarantees of docs/streaming.md, each against the local loader or an uninterrupted run: the same
samples decoded the same way, a plan independent of the URL form and of num_workers, exact resume,
disjoint ranks, and a clear error (naming the URL) for every way a remote read can fail.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError
from common.dist import DistInfo
from pipeline import CorruptSampleError, CorruptSampleWarning, DataConfig, build_loader, stream
from pipeline.config import is_url
from pipeline.stream import RemoteShardError, interleave, shuffle_buffer
from shards.schema import ManifestError
from tests.pipeline_fixtures import all_texts, corrupt_member, pack_tiny, tiny_tokenizer

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TRAIN_TARS = "train/train-{000000..000006}.tar"  # pack_tiny: 52 train samples, 8 per shard


class Handler(http.server.SimpleHTTPRequestHandler):
    """Static files; a path in `flaky` has its first transfer cut off halfway (a dropped connection)."""

    flaky: set[str] = set()
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
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(collect(build_loader(bare, "valid", CPU))) == 2
