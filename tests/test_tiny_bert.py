"""tools/make_tiny_bert reads its training texts through the pipeline's own index and sample reader
(pipeline.plan.DatasetIndex + pipeline.batch.SampleReader), not a tar parser of its own."""

import shutil
import tarfile

import pytest

from common.cli import UserError
from pipeline.reports import shard_texts
from shards.schema import read_manifest, split_shards
from tests.pipeline_fixtures import corrupt_member, pack_tiny


def _tar_texts(root, split):
    """Oracle: every .txt member of the split's shards, in manifest then tar order, read with tarfile
    (what the tool did before it used the pipeline reader)."""
    texts = []
    for shard in split_shards(root, read_manifest(root), split):
        with tarfile.open(shard["path"]) as tar:
            texts += [tar.extractfile(m).read().decode() for m in tar if m.isfile() and m.name.endswith(".txt")]
    return texts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return root, pack_tiny(root, n_train=30, n_valid=10, per_shard=7)


def test_texts_are_the_shards_reports_in_order(tiny):
    # The tokenizer trainer sees the same texts in the same order as before, so the tool's output is
    # unchanged (the trainer itself ties merges by hash order: huggingface/tokenizers#1794).
    root, _ = tiny
    for split, n in (("train", 30), ("valid", 10)):
        texts = shard_texts(root, split)
        assert len(texts) == n and len(set(texts)) > n // 2
        assert texts == _tar_texts(root, split)


def test_damaged_report_names_shard_and_key(tiny, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny[0], root)
    manifest = tiny[1]
    key = manifest["_shard_records"][1]["keys"][2]
    shard = corrupt_member(root, manifest, key, "txt", payload=b"XXXX")
    with pytest.raises(UserError, match=rf"{shard}: sample {key}: txt: crc32 mismatch"):
        shard_texts(root, "train")


def test_missing_split_or_index_fails_naming_it(tiny, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny[0], root)
    with pytest.raises(UserError, match="split 'test'"):
        shard_texts(root, "test")
    idx = next((root / "train").glob("*.idx"))
    idx.unlink()
    with pytest.raises(UserError, match=f"index file missing: .*{idx.name}"):
        shard_texts(root, "train")
