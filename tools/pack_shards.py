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

from pathlib import Path

from common.cli import ArgumentParser, UserError, run_main
from shards.ensure import ensure_synthetic
from shards.image import add_image_limit_arguments
from shards.mimic import (
    DEFAULT_MAX_SIDE,
    DEFAULT_QUALITY,
    DEFAULT_SAMPLES_PER_SHARD,
    SYNTHETIC_SAMPLES_PER_SHARD,
    pack_mimic,
)
from shards.sections import DEFAULT_MAX_REPORT_BYTES
from shards.writer import default_workers


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


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--mimic", type=Path, help="MIMIC-CXR-JPG 2.0.0 root (csvs + files/)")
    source.add_argument("--synthetic", type=Path, help="synthetic corpus dir (generated if absent)")
    parser.add_argument("--reports", type=Path, help="report tree (default: <root>/files, as MGCA expects)")
    parser.add_argument("--master-csv", type=Path, help="use this MGCA master.csv instead of the csvs + reports")
    parser.add_argument("--synth-n", type=int, default=400, help="synthetic studies to generate")
    parser.add_argument("--synth-size", type=int, default=2048, help="synthetic image longer side")
    parser.add_argument("--out", type=Path, default=Path("data/shards/mimic"))
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, help="stored images' longer side")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality of stored images")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--seed", type=int, default=42, help="shuffle seed (also the synthetic corpus seed)")
    parser.add_argument(
        "--samples-per-shard",
        type=int,
        default=None,
        help=f"default {DEFAULT_SAMPLES_PER_SHARD} (real) / {SYNTHETIC_SAMPLES_PER_SHARD} (synthetic)",
    )
    parser.add_argument(
        "--keep-test", action="store_true", help="keep `test` as its own split (MGCA merges it into valid)"
    )
    parser.add_argument("--crop-threshold", type=int, default=0, help="pixels <= this count as black border")
    add_image_limit_arguments(parser)
    parser.add_argument(
        "--max-report-bytes",
        type=int,
        default=DEFAULT_MAX_REPORT_BYTES,
        help="reject reports (and training texts) larger than this",
    )
    args = parser.parse_args(argv)
    if args.synth_n < 1 or args.synth_size < 1:
        raise UserError(f"--synth-n {args.synth_n} / --synth-size {args.synth_size}: both must be >= 1")

    if args.synthetic is not None:
        root = ensure_synthetic(args.synthetic, args.synth_n, args.synth_size, args.seed, args.workers)
        per_shard = args.samples_per_shard or SYNTHETIC_SAMPLES_PER_SHARD
    else:
        root = args.mimic
        per_shard = args.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD
    pack(
        root,
        args.out,
        reports_dir=args.reports,
        master_csv=args.master_csv,
        max_side=args.max_side,
        quality=args.quality,
        samples_per_shard=per_shard,
        workers=args.workers,
        seed=args.seed,
        keep_test=args.keep_test,
        crop_threshold=args.crop_threshold,
        min_side=args.min_side,
        max_pixels=args.max_pixels,
        max_report_bytes=args.max_report_bytes,
    )
    return 0


if __name__ == "__main__":
    run_main(main)
