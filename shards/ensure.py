"""Inputs made on demand: the synthetic MIMIC-CXR-JPG corpus and the packed synthetic downstream
datasets, generated only where they are missing (tools, benches and the demo share these)."""

from __future__ import annotations

import json
from pathlib import Path

from common.cli import UserError
from shards.downstream import convert
from shards.downstream.common import format_summary
from shards.master import METADATA_CSV
from shards.schema import MANIFEST_NAME
from shards.synthetic.downstream import write_all
from shards.synthetic.mimic import CORPUS_NAME, generate_mimic
from shards.writer import default_workers

DEFAULT_DOWNSTREAM = "data/shards/downstream"
DEFAULT_DOWNSTREAM_SRC = "data/synthetic_downstream"
SYNTH_N, SYNTH_SEED, MAX_SIDE = 120, 0, 512  # the Makefile's synth-downstream / shards defaults


def ensure_data(data_root: str, datasets: list[str], log=print) -> None:
    """Every dataset must be packed under data_root. Only the default root is filled automatically
    (with the synthetic look-alikes); a user-given root missing a dataset is an error saying how to pack it."""
    root = Path(data_root)
    missing = [d for d in dict.fromkeys(datasets) if not (root / d / MANIFEST_NAME).is_file()]
    if not missing:
        return
    if root.resolve() != Path(DEFAULT_DOWNSTREAM).resolve():
        raise FileNotFoundError(
            f"no packed shards for {missing} under {root} (expected {root}/<dataset>/{MANIFEST_NAME}); pack them "
            f"with `make shards DATASET=<name> SRC=<native download> OUT={root}`, or leave DATA unset to use "
            "the synthetic downstream shards"
        )
    src = Path(DEFAULT_DOWNSTREAM_SRC)
    to_render = [d for d in missing if not (src / d).is_dir()]
    if to_render:
        log(f"[eval] writing synthetic downstream datasets {to_render} to {src} (n={SYNTH_N})")
        write_all(src, SYNTH_N, SYNTH_SEED, workers=default_workers(), datasets=tuple(to_render))
    for name in missing:
        log(f"[eval] packing {src / name} -> {root / name}")
        manifest = convert(name, src / name, root, max_side=MAX_SIDE, workers=default_workers(), seed=SYNTH_SEED)
        log(format_summary(manifest))


def ensure_synthetic(root: Path, n: int, size: int, seed: int, workers: int) -> Path:
    """Generate the synthetic MIMIC-CXR-JPG tree at `root` unless one is already there (an existing
    corpus is packed as it is, even if made with other parameters: regenerating is `make synth`'s job)."""
    if n < 1 or size < 1:  # worded for the packing CLI's flags, which the demo and benches pass through
        raise UserError(f"--synth-n {n} / --synth-size {size}: both must be >= 1")
    marker = root / CORPUS_NAME
    if (root / METADATA_CSV).is_file():
        try:
            made = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            made = {}  # a damaged marker only loses this informational line
        made = made if isinstance(made, dict) else {}
        if (made.get("n_studies"), made.get("size"), made.get("seed")) != (n, size, seed):
            print(
                f"synthetic corpus: {root} exists (n={made.get('n_studies')}, size={made.get('size')}, "
                f"seed={made.get('seed')}); packing it as it is"
            )
        return root
    print(f"synthetic corpus: generating {n} studies at {size} px in {root}")
    try:
        summary = generate_mimic(root, n=n, seed=seed, size=size, workers=workers)
    except FileExistsError as exc:  # a non-empty folder that is not a corpus: never replaced
        raise UserError(str(exc)) from exc
    print(f"synthetic corpus: {summary['images']} images in {summary['seconds']:.1f} s")
    return root
