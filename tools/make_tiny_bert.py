"""`make tiny-bert`: a small random BERT + WordPiece tokenizer trained on the corpus's reports.

Bio_ClinicalBERT cannot be downloaded here; the demo and tests use this stand-in, saved with
save_pretrained so it loads exactly like a hub checkpoint (`model.text_model=runs/tiny_bert`).
Texts come from the packed shards' train split, read by offset through the pipeline's own index
and sample reader (the same header and crc32 checks as training reads; nothing extracted).
"""

from __future__ import annotations

from pathlib import Path

from common.cli import ArgumentParser, run_main
from model.text import build_tiny_text_model
from pipeline.reports import shard_texts


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
