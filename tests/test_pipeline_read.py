"""pipeline/ read side of the shard contract: per-member CRCs, stale indexes, member names, manifest
entries outside the shard root (issue #11). Each test damages a copy of a tiny packed dataset itself.
"""

from __future__ import annotations

import io
import json
import shutil
import warnings

import pytest
import torch
from PIL import Image

from common.dist import DistInfo
from pipeline import CorruptSampleError, CorruptSampleWarning, DataConfig, build_loader
from pipeline.plan import DatasetIndex
from shards.schema import ManifestError
from tests.pipeline_fixtures import corrupt_member, find_member, pack_tiny

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
BACKENDS = ("torch", "dali")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_read")
    return root, pack_tiny(root, n_train=24, n_valid=8, per_shard=8)


def config(root, **kw) -> DataConfig:
    base = dict(shards=str(root), batch_size_per_gpu=4, num_workers=1, prefetch=2, seed=3, transform="g2d_train")
    return DataConfig(**{**base, **kw})


def zero_scan_bytes(root, manifest, key: str, n: int = 300) -> tuple[str, bytes]:
    """Zero `n` bytes in the middle of `key`'s JPEG entropy-coded data (after the SOS marker): the
    damage decoders accept without complaint. Returns (shard name, the damaged jpg)."""
    name, offset, size = find_member(root, manifest, key, "jpg")
    with open(root / name, "r+b") as fh:
        fh.seek(offset)
        data = bytearray(fh.read(size))
        sos = data.index(b"\xff\xda")
        scan_start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
        middle = (scan_start + size - 2) // 2 - n // 2
        assert middle > scan_start and middle + n < size - 2, "scan data too short for the test"
        data[middle : middle + n] = bytes(n)
        fh.seek(offset)
        fh.write(data)
    return name, bytes(data)


def largest_jpg_key(root, manifest) -> str:
    keys = [k for rec in manifest["_shard_records"] if rec["name"].startswith("train/") for k in rec["keys"]]
    return max(keys[1:-1], key=lambda k: find_member(root, manifest, k, "jpg")[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_damage_that_still_decodes_is_caught_by_the_crc(tiny, tmp_path, backend):
    root, manifest = tiny
    copy = tmp_path / "damaged"
    shutil.copytree(root, copy)
    jpg_key = largest_jpg_key(copy, manifest)
    shard, damaged = zero_scan_bytes(copy, manifest, jpg_key)
    Image.open(io.BytesIO(damaged)).load()  # the decoder alone accepts it
    # A report with one letter changed: still UTF-8, still a plausible text, but not what was packed.
    txt_key = "tr0013"
    _, offset, _ = find_member(copy, manifest, txt_key, "txt")
    with open(copy / find_member(copy, manifest, txt_key, "txt")[0], "r+b") as fh:
        fh.seek(offset)
        first = fh.read(1)
        fh.seek(offset)
        fh.write(b"x" if first != b"x" else b"y")

    loader = build_loader(config(copy, backend=backend), "train", CPU)
    with pytest.warns(CorruptSampleWarning):
        keys = [k for b in loader for k in b.keys]
    assert jpg_key not in keys and txt_key not in keys
    stats = loader.stats.as_dict()
    assert stats["skipped"] == 2 and stats["skipped_by_reason"] == {"jpg": 1, "txt": 1}
    reasons = {s["key"]: s["reason"] for s in stats["skipped_samples"]}
    assert reasons == {jpg_key: "jpg: crc32 mismatch (damaged bytes)", txt_key: "txt: crc32 mismatch (damaged bytes)"}

    strict = build_loader(config(copy, backend=backend, on_error="raise"), "train", CPU)
    with pytest.raises(CorruptSampleError, match=r"train-0000\d\d\.tar: sample tr00\d\d: (jpg|txt): crc32 mismatch"):
        list(strict)


def _rewrite_index(path, edit) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


def test_index_of_another_packing_with_the_same_keys_is_reported_stale(tiny, tmp_path):
    root, _ = tiny
    other = tmp_path / "repacked"
    pack_tiny(other, n_train=24, n_valid=8, per_shard=8, seed=5)  # same keys, other images
    for idx in root.glob("train/*.idx"):
        shutil.copy(idx, other / "train" / idx.name)  # indexes left from the first packing
    for backend in BACKENDS:
        with pytest.raises(
            ManifestError,
            match=r"^stale index for train/train-000000\.tar: run make "
            r"verify-shards / repack \(the tar has 'tr0000\.\w+'",
        ):
            build_loader(config(other, backend=backend), "train", CPU)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stale_row_inside_a_shard_stops_reading_even_when_skipping(tiny, tmp_path, backend):
    """First and last rows agree with the tar (the start-up check passes), a middle row points at
    another sample's members: the read finds it, with the stale-index cause, whatever on_error says."""
    root, manifest = tiny
    copy = tmp_path / "stale_row"
    shutil.copytree(root, copy)
    rec = next(r for r in manifest["_shard_records"] if r["name"] == "train/train-000001.tar")
    a, b = rec["keys"][3], rec["keys"][4]

    def point_a_at_b(lines):
        lines[1 + 3] = lines[1 + 4].replace(f"{b}.", f"{a}.")
        return lines

    _rewrite_index((copy / rec["name"]).with_suffix(".idx"), point_a_at_b)
    loader = build_loader(config(copy, backend=backend, on_error="skip"), "train", CPU)
    with pytest.raises(
        ManifestError,
        match=rf"^stale index for train/train-000001\.tar: .*the tar has "
        rf"'{b}\.\w+' .* where the index puts '{a}\.\w+'",
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CorruptSampleWarning)
            list(loader)


@pytest.mark.parametrize("name", ["../tr0001.jpg", "tr.0001.jpg", "tr$0001.jpg"])
def test_member_names_outside_the_key_pattern_are_an_error_naming_shard_and_member(tiny, tmp_path, name):
    root, _ = tiny
    copy = tmp_path / "names"
    shutil.copytree(root, copy)
    idx = copy / "train" / "train-000002.idx"
    _rewrite_index(idx, lambda lines: [lines[0], lines[1].replace("tr0016.jpg", name)] + lines[2:])
    with pytest.raises(
        ManifestError,
        match=r"train-000002\.idx:2: member .* of shard .*train-000002\.tar "
        r"is not <key>\.jpg",
    ):
        DatasetIndex(copy, "train")


@pytest.mark.parametrize("outside", ["../elsewhere/train-000000.tar", "/etc/passwd", "train/../../x.tar"])
def test_manifest_entry_outside_the_shard_root_is_an_error(tiny, tmp_path, outside):
    root, _ = tiny
    copy = tmp_path / "escape"
    shutil.copytree(root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["name"] = outside
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ManifestError,
        match=rf"split 'train' names '{outside}', which resolves to .*, outside "
        r"the shard root",
    ):
        DatasetIndex(copy, "train")
    # An index entry may not leave the root either.
    manifest["splits"]["train"]["shards"][0]["name"] = "train/train-000000.tar"
    manifest["splits"]["train"]["shards"][0]["index"] = outside
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="outside the shard root"):
        DatasetIndex(copy, "train")


def test_header_of_a_damaged_jpeg_member_is_still_a_skipped_sample_not_a_stale_index(tiny, tmp_path):
    """Damage to the member's bytes is the sample's problem; only the tar headers speak for the index."""
    root, manifest = tiny
    copy = tmp_path / "jpg_header"
    shutil.copytree(root, copy)
    corrupt_member(copy, manifest, "tr0010", "jpg")
    loader = build_loader(config(copy, backend="torch"), "train", CPU)
    with pytest.warns(CorruptSampleWarning):
        keys = [k for b in loader for k in b.keys]
    assert "tr0010" not in keys and loader.stats.skipped_by_reason == {"jpg": 1}
