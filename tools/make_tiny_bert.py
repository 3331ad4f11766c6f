"""`make tiny-bert`: a small random BERT + WordPiece tokenizer trained on the corpus's reports.

Bio_ClinicalBERT cannot be downloaded here; the demo and tests use this stand-in, saved with
save_pretrained so it loads exactly like a hub checkpoint (`model.text_model=runs/tiny_bert`).
Texts come from the packed shards' train split, read by offset through the pipeline's own index
and sample reader (the same header and crc32 checks as training reads; nothing extracted).

The output records what it was built from (`reports_fingerprint.json`: a sha256 over the reports in
the order the tokenizer saw them), so `make demo` reuses it only for the same reports (`ensure`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from common.cli import ArgumentParser, UserError, run_main
from common.io import atomic_write_json
from model.text import build_tiny_text_model
from pipeline.reports import shard_texts

FINGERPRINT_FILE = "reports_fingerprint.json"


def reports_fingerprint(texts: list[str]) -> str:
    """sha256 over the reports in order (the tokenizer's training depends on the order too)."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: no two lists hash alike
    return h.hexdigest()


def recorded_fingerprint(out: str | Path) -> dict | None:
    """The record `build` wrote into `out`, or None (no record, or not a readable one)."""
    try:
        record = json.loads((Path(out) / FINGERPRINT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("reports_sha256"), str) else None


def build(
    shards_root: str | Path,
    out: str | Path,
    hidden: int = 64,
    layers: int = 2,
    vocab_size: int = 2000,
    texts: list[str] | None = None,
) -> Path:
    """Train the tokenizer on the train split's reports (`texts`, read from the shards unless given)
    and save the random BERT + tokenizer in `out`, with the record of those reports written last:
    a build killed half-way leaves no record, so it is never reused as whole."""
    texts = shard_texts(shards_root) if texts is None else texts
    (Path(out) / FINGERPRINT_FILE).unlink(missing_ok=True)
    saved = build_tiny_text_model(out, texts, hidden=hidden, layers=layers, vocab_size=vocab_size)
    record = {"reports_sha256": reports_fingerprint(texts), "reports": len(texts), "shards": str(shards_root)}
    atomic_write_json(Path(saved) / FINGERPRINT_FILE, record)
    print(f"tiny BERT ({layers} layers, hidden {hidden}) + tokenizer from {len(texts)} reports -> {saved}")
    return Path(saved)


def ensure(shards_root: str | Path, out: str | Path) -> tuple[Path, bool]:
    """-> (`out`, whether it was (re)built): `out` as is when it was built from exactly the train
    reports of `shards_root`, else built anew, saying why. A text model in `out` with no record at all
    is not ours to overwrite (an older tiny BERT, or a real model placed there): UserError saying how
    to rebuild it."""
    out = Path(out)
    texts = shard_texts(shards_root)
    wanted = reports_fingerprint(texts)
    record = recorded_fingerprint(out)
    complete = (out / "config.json").is_file()
    if record is None and complete:
        raise UserError(
            f"{out} holds a text model with no record of the reports it was built from (made before tiny "
            f"BERTs recorded them, or another model): rebuild it with `python -m tools.make_tiny_bert "
            f"--shards {shards_root} --out {out}`, or remove it"
        )
    if record is not None and record["reports_sha256"] == wanted and complete:
        print(f"using {out} (built from these {len(texts)} reports)")
        return out, False
    if record is not None and record["reports_sha256"] != wanted:
        print(
            f"rebuilding {out}: it was built from other reports ({record.get('reports')} from "
            f"{record.get('shards')}, sha256 {record['reports_sha256'][:12]}...), not the {len(texts)} "
            f"of {shards_root} (sha256 {wanted[:12]}...)"
        )
    return build(shards_root, out, texts=texts), True


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
