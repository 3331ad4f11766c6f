"""`make tiny-bert`: a small random BERT + WordPiece tokenizer trained on the corpus's reports.

Bio_ClinicalBERT cannot be downloaded here; the demo and tests use this stand-in, saved with
save_pretrained so it loads exactly like a hub checkpoint (`model.text_model=runs/tiny_bert`).
Texts come from the packed shards' train split (`<key>.txt` members, read in memory).
"""
from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

from model.text import build_tiny_text_model
from shards.schema import read_manifest, split_shards


def shard_texts(shards_root: str | Path, split: str = "train") -> list[str]:
    texts = []
    for shard in split_shards(shards_root, read_manifest(shards_root), split):
        with tarfile.open(shard["path"], "r") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".txt"):
                    texts.append(tar.extractfile(member).read().decode("utf-8"))
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="data/shards/mimic", help="packed pretraining shards")
    parser.add_argument("--out", default="runs/tiny_bert")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=2000)
    args = parser.parse_args(argv)
    texts = shard_texts(args.shards)
    out = build_tiny_text_model(args.out, texts, hidden=args.hidden, layers=args.layers,
                                vocab_size=args.vocab_size)
    print(f"tiny BERT ({args.layers} layers, hidden {args.hidden}) + tokenizer from {len(texts)} reports -> {out}")


if __name__ == "__main__":
    main()
