"""The reports of a packed split, read by offset through the pipeline's own index and sample reader
(the same tar-header and crc32 checks as training reads; nothing extracted). Used to train the
tiny-BERT tokenizer (tools/make_tiny_bert.py) and by the benchmarks that need realistic texts."""

from __future__ import annotations

from pathlib import Path

from common.cli import UserError
from pipeline.batch import SampleError, SampleReader, text_and_meta
from pipeline.plan import DatasetIndex


def shard_texts(shards_root: str | Path, split: str = "train") -> list[str]:
    """Every report of `split` in shard order, then index order (the tar's own member order).
    A missing shard or index, or an index that does not match its tar, fails naming the file; a damaged
    report (crc32 mismatch, not UTF-8) fails naming shard and key."""
    index = DatasetIndex(shards_root, split)
    reader = SampleReader(index)
    texts = []
    try:
        for gid in range(index.num_samples):
            try:
                # json too: it holds the crc32 that tells a damaged report from a good one
                text, _ = text_and_meta(reader.read(gid, ("txt", "json")))
            except SampleError as exc:
                shard, _ = index.locate(gid)
                raise UserError(f"{shard.path}: sample {index.key(gid)}: {exc}; run `make verify-shards`") from exc
            texts.append(text)
    finally:
        reader.close()
    if not texts:
        raise UserError(f"no reports (.txt members) in the {split} split of {shards_root}")
    return texts
