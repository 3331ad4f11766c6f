"""Tiny packed datasets and a tiny tokenizer for the pipeline tests (built in tmp dirs, seconds).

Images are smooth grey scenes (gradient + ellipse "lungs" + one bright rectangle) of varied sizes, so
interpolation differences between backends stay small and geometry is visible; the rectangle is also
the sample's box (json "boxes") and, with masks, its png mask.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.image import encode_jpeg, encode_png
from shards.schema import MEMBER_CRC_FIELD, MEMBER_ORDER, member_crc32, parse_dali_index
from shards.writer import PackedSample, pack_splits

ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a test's subprocess: the repo importable, ahead of (not instead of) the caller's
    PYTHONPATH, which may hold the packages themselves (as on the lent GPU machine)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def make_variables() -> set[str]:
    """The variables the Makefile exports to its recipes (USER_VARS)."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    block = re.search(r"^USER_VARS := ((?:.*\\\n)*.*)$", text, re.M)
    return set(block.group(1).replace("\\\n", " ").split()) if block else set()


def shell_env(**extra: str) -> dict[str, str]:
    """child_env as a user's shell has it: without what an enclosing make (`make test`, as CI runs the
    suite) exports to its recipes, so a make the test starts sees only the variables the test sets."""
    drop = make_variables() | {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"}
    return {k: v for k, v in child_env(**extra).items() if k not in drop or k in extra}


# make's own closing line after a failed recipe: `make: *** [...] Error 2` (`make[1]: ...` when nested).
MAKE_ERROR_LINE = re.compile(r"^make(\[\d+\])?: \*\*\*")


WORDS = (
    "no acute cardiopulmonary process heart size normal lungs clear pleural effusion small left "
    "right basilar atelectasis mild pulmonary edema stable cardiomegaly pneumothorax is seen "
    "support devices in place consolidation opacity"
).split()


@dataclass
class Item:
    key: str
    seed: int
    masks: bool


def scene(seed: int) -> tuple[np.ndarray, list[int]]:
    """[h, w] uint8 image and its bright rectangle [x1, y1, x2, y2]."""
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(64, 129)), int(rng.integers(64, 129))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 40 + 60 * xx / w + 30 * yy / h
    for cx in (0.3, 0.7):
        inside = ((xx / w - cx) / 0.17) ** 2 + ((yy / h - 0.5) / 0.33) ** 2 < 1
        img[inside] -= 25 + 10 * rng.random()
    x1, y1 = int(rng.integers(4, w // 2)), int(rng.integers(4, h // 2))
    x2, y2 = x1 + int(rng.integers(8, w // 3)), y1 + int(rng.integers(8, h // 3))
    img[y1:y2, x1:x2] = 230
    return np.clip(img, 1, 255).astype(np.uint8), [x1, y1, x2, y2]


def report(seed: int) -> str:
    rng = np.random.default_rng(seed + 10_000)
    n = int(rng.integers(3, 12)) if seed % 13 else 120  # every 13th report is long (truncation)
    return " ".join(rng.choice(WORDS, size=n)) + "."


def build_sample(item: Item) -> PackedSample:
    img, box = scene(item.seed)
    h, w = img.shape
    meta = {
        "dataset": "tiny",
        "key": item.key,
        "index": item.seed,
        "stored_size": [w, h],
        "labels": {"Pleural Effusion": float(item.seed % 2), "Edema": float(item.seed % 3 == 0)},
        "boxes": [box],
    }
    members = {"jpg": encode_jpeg(img, quality=95), "txt": report(item.seed).encode()}
    if item.masks:
        mask = np.zeros_like(img)
        mask[box[1] : box[3], box[0] : box[2]] = 255
        members["png"] = encode_png(mask)
    # The per-member CRCs the shard writer records (shards/schema.py), set here so that the read-side
    # checks are tested whichever writer packed the fixture.
    meta[MEMBER_CRC_FIELD] = {ext: member_crc32(data) for ext, data in members.items()}
    members["json"] = json.dumps(meta).encode()
    return PackedSample(item.key, {ext: members[ext] for ext in MEMBER_ORDER if ext in members})


def pack_tiny(
    root: Path, n_train: int = 52, n_valid: int = 20, per_shard: int = 8, masks: bool = False, seed: int = 0
) -> dict:
    """Pack a tiny dataset under `root`; the train split has a "0.5" subset."""
    items = {
        "train": [Item(f"tr{i:04d}", seed * 1000 + i, masks) for i in range(n_train)],
        "valid": [Item(f"va{i:04d}", seed * 1000 + 500 + i, masks) for i in range(n_valid)],
    }
    subset = [it.key for it in items["train"][::2]]
    return pack_splits(
        root,
        items,
        build_sample,
        samples_per_shard=per_shard,
        workers=1,
        config={"tiny": seed, "masks": masks},
        extra_manifest={"subsets": {"train": {"0.5": subset}}},
        progress=False,
    )


def all_texts(root: Path, split: str = "train") -> list[str]:
    texts = []
    for tar_path in sorted((root / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    texts.append(tar.extractfile(member).read().decode())
    return texts


def tiny_tokenizer(texts: list[str]):
    """A WordPiece BERT-style fast tokenizer trained on `texts`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def member_span(shard: Path, sample: int, ext: str) -> tuple[str, int, int]:
    """(key, data offset, size) of the `ext` member of the shard's `sample`-th sample, from its index."""
    idx_path = shard.with_suffix(".idx")
    for member_ext, offset, size, name in parse_dali_index(idx_path.read_text(), str(idx_path))[sample]:
        if member_ext == ext:
            return name.partition(".")[0], offset, size
    raise KeyError(f"{shard} sample {sample}: no {ext} member")


def find_member(root: Path, manifest: dict, key: str, ext: str) -> tuple[str, int, int]:
    """(shard name, offset, size) of `key`'s `ext` member."""
    for rec in manifest["_shard_records"]:
        if key in rec["keys"]:
            _, offset, size = member_span(root / rec["name"], rec["keys"].index(key), ext)
            return rec["name"], offset, size
    raise KeyError(key)


def corrupt_member(root: Path, manifest: dict, key: str, ext: str, payload: bytes | None = None) -> str:
    """Overwrite the start of `key`'s `ext` member in its shard (same size, so the index still fits).
    Returns the shard name."""
    name, offset, size = find_member(root, manifest, key, ext)
    data = payload if payload is not None else b"\x00" * min(size, 64)
    with open(root / name, "r+b") as fh:
        fh.seek(offset)
        fh.write(data[:size])
    return name
