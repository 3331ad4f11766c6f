"""Downstream dataset converters: native download -> `<OUT>/<dataset>/` shards + manifest.

    CONVERTERS[name](src, seed) -> DatasetIndex      (read label files, assign splits; no pixels)
    convert(name, src, out, ...) -> manifest dict    (index + pack + subsets; see common.py for fields)

Registry names are also the directory names of the synthetic fixtures (tools/synth_downstream.py)
and of the packed output.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from common.cli import UserError
from shards.downstream import chestxray14, chexpert, covidx, object_cxr, rsna, siim
from shards.downstream.common import DatasetIndex, convert_index
from shards.image import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, ImageLimits
from shards.writer import check_pack_params

CONVERTERS: dict[str, Callable[[Path, int], DatasetIndex]] = {
    rsna.NAME: rsna.index_dataset,
    siim.NAME: siim.index_dataset,
    chexpert.NAME: chexpert.index_dataset,
    covidx.NAME: covidx.index_dataset,
    object_cxr.NAME: object_cxr.index_dataset,
    chestxray14.NAME: chestxray14.index_dataset,
}
DATASETS = tuple(CONVERTERS)
DEFAULT_SAMPLES_PER_SHARD = 1000


def convert(
    name: str,
    src: str | Path,
    out: str | Path,
    max_side: int = 512,
    quality: int = 95,
    workers: int = 1,
    seed: int = 0,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    progress: bool = True,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict:
    """Convert dataset `name` from its native root `src` into `<out>/<name>/`; returns the manifest.
    Images must resolve inside `src` (symlinks out of it are recorded rejections)."""
    if name not in CONVERTERS:
        raise UserError(f"unknown downstream dataset {name!r}; known: {list(CONVERTERS)}")
    check_pack_params(
        samples_per_shard=samples_per_shard,
        quality=quality,
        max_side=max_side,
        workers=workers,
        min_side=min_side,
        max_pixels=max_pixels,
    )
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{name}: source directory {src} not found")
    target = (Path(out) / name).resolve()
    if target == src.resolve() or src.resolve() in target.parents:
        # covidx's train/ and test/ image folders would share names with the shard folders.
        raise UserError(f"{name}: output {Path(out) / name} is inside the source {src}; choose another --out")
    index = CONVERTERS[name](src, seed)
    return convert_index(
        index,
        out,
        max_side,
        quality,
        workers,
        seed,
        samples_per_shard,
        progress,
        src_root=src,
        limits=ImageLimits(min_side, max_pixels),
    )
