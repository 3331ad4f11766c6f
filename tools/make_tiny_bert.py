"""`make tiny-bert`: a small random BERT + WordPiece tokenizer trained on the corpus's reports.

Bio_ClinicalBERT cannot be downloaded here; the demo and tests use this stand-in, saved with
save_pretrained so it loads exactly like a hub checkpoint (`model.text_model=runs/tiny_bert`).
Texts come from the packed shards' train split, read by offset through the pipeline's own index
and sample reader (the same header and crc32 checks as training reads; nothing extracted).
"""

from __future__ import annotations

from pathlib import Path

from common.cli import ArgumentParser, UserError, run_main
from model.text import build_tiny_text_model
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


def build(shards_root: str | Path, out: str | Path, hidden: int = 64, layers: int = 2, vocab_size: int = 2000) -> Path:
    """Train the tokenizer on the train split's reports and save the random BERT + tokenizer in `out`."""
    texts = shard_texts(shards_root)
    saved = build_tiny_text_model(out, texts, hidden=hidden, layers=layers, vocab_size=vocab_size)
    print(f"tiny BERT ({layers} layers, hidden {hidden}) + tokenizer from {len(texts)} reports -> {saved}")
    return Path(saved)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="data/shards/mimic", help="packed pretraining shards")
    parser.add_argument("--out", default="runs/tiny_bert")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=2000)
    args = parser.parse_args(argv)
    build(args.shards, args.out, hidden=args.hidden, layers=args.layers, vocab_size=args.vocab_size)


if __name__ == "__main__":
    run_main(main)
