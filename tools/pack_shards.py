"""`make shards`: pack MIMIC-CXR-JPG (real, or the synthetic stand-in) into WebDataset shards.

    python -m tools.pack_shards --mimic /data/mimic-cxr-jpg/2.0.0 --out data/shards/mimic
    python -m tools.pack_shards --mimic ROOT --reports /data/mimic-cxr-reports/files --out ...
    python -m tools.pack_shards --mimic ROOT --master-csv /data/mgca/master.csv --out ...
    python -m tools.pack_shards --synthetic data/synthetic_mimic --synth-n 400 --synth-size 1024 --out ...

Reruns keep every shard whose bytes still match the manifest (same inputs and parameters). Bad
samples are recorded rejections; a missing root/csv/column, a damaged csv, a bad argument, another
packer holding --out, or nothing packed at all end in one line `error: ...` and exit status 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.cli import ArgumentParser, UserError, add_dataclass_arguments, dataclass_from_args, run_main
from shards.ensure import ensure_synthetic
from shards.image import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
from shards.mimic import (
    DEFAULT_MAX_SIDE,
    DEFAULT_QUALITY,
    DEFAULT_SAMPLES_PER_SHARD,
    SYNTHETIC_SAMPLES_PER_SHARD,
    pack_mimic,
)
from shards.sections import DEFAULT_MAX_REPORT_BYTES
from shards.writer import default_workers


def _option(default, help_text: str, **kw):
    return field(default=default, metadata={"help": help_text}, **kw)


@dataclass
class PackOptions:
    """The packing options of `make shards` and this command, in one place: argparse builds its
    `--<name>` options from these fields (common.cli.add_dataclass_arguments) and the Makefile passes
    only the variables a user set, so every default is the one here. Ranges are checked by
    shards.mimic.pack_mimic (and `synth_*` below)."""

    max_side: int = _option(DEFAULT_MAX_SIDE, "stored images' longer side")
    quality: int = _option(DEFAULT_QUALITY, "JPEG quality of stored images")
    workers: int = field(default_factory=default_workers, metadata={"help": "packing processes"})
    seed: int = _option(42, "shuffle seed (also the synthetic corpus seed)")
    samples_per_shard: int | None = _option(
        None, f"default {DEFAULT_SAMPLES_PER_SHARD} (real) / {SYNTHETIC_SAMPLES_PER_SHARD} (synthetic)"
    )
    keep_test: bool = _option(False, "keep `test` as its own split (MGCA merges it into valid)")
    crop_threshold: int = _option(0, "pixels <= this count as black border")
    min_side: int = _option(DEFAULT_MIN_SIDE, "reject source images with a side shorter than this (pixels)")
    max_pixels: int = _option(
        DEFAULT_MAX_PIXELS, "reject source images with more pixels than this (checked before decoding)"
    )
    max_report_bytes: int = _option(DEFAULT_MAX_REPORT_BYTES, "reject reports (and training texts) larger than this")
    synth_n: int = _option(400, "synthetic studies to generate (--synthetic)")
    synth_size: int = _option(2048, "synthetic image longer side (--synthetic)")


def pack(root: Path, out: Path, **options) -> dict:
    """pack_mimic(root, out, **options) plus this command's checks: nothing packed at all is a
    UserError naming the manifest with the reasons; otherwise one summary line. Returns the manifest."""
    manifest = pack_mimic(root, out, **options)
    if manifest["num_samples"] == 0:
        raise UserError(
            f"nothing packed from {root}: {len(manifest['rejected'])} rows rejected, "
            f"{sum(manifest.get('filtered', {}).values())} filtered (reasons in "
            f"{out / 'manifest.json'})"
        )
    print(
        f"pack_shards: {manifest['num_samples']} samples in {out} "
        f"({len(manifest['rejected'])} rejected, listed in {out / 'manifest.json'})"
    )
    return manifest


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--mimic", type=Path, help="MIMIC-CXR-JPG 2.0.0 root (csvs + files/)")
    source.add_argument("--synthetic", type=Path, help="synthetic corpus dir (generated if absent)")
    parser.add_argument("--reports", type=Path, help="report tree (default: <root>/files, as MGCA expects)")
    parser.add_argument("--master-csv", type=Path, help="use this MGCA master.csv instead of the csvs + reports")
    parser.add_argument("--out", type=Path, default=Path("data/shards/mimic"))
    add_dataclass_arguments(parser, PackOptions)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = dataclass_from_args(PackOptions, args)
    if opts.synth_n < 1 or opts.synth_size < 1:
        raise UserError(f"--synth-n {opts.synth_n} / --synth-size {opts.synth_size}: both must be >= 1")

    if args.synthetic is not None:
        root = ensure_synthetic(args.synthetic, opts.synth_n, opts.synth_size, opts.seed, opts.workers)
        per_shard = opts.samples_per_shard or SYNTHETIC_SAMPLES_PER_SHARD
    else:
        root = args.mimic
        per_shard = opts.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD
    packing = {k: v for k, v in vars(opts).items() if not k.startswith("synth_")}
    pack(
        root,
        args.out,
        reports_dir=args.reports,
        master_csv=args.master_csv,
        **{**packing, "samples_per_shard": per_shard},
    )
    return 0


if __name__ == "__main__":
    run_main(main)
