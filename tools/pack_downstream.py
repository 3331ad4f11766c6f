"""Convert one downstream dataset from its native download into shards.

    python -m tools.pack_downstream --dataset rsna_pneumonia --src /data/rsna --out data/shards/downstream
writes <out>/<dataset>/{train,valid,test}/*.tar + .idx and <out>/<dataset>/manifest.json, then prints
the accounting summary (packed + rejected + filtered = input images). Exits 2 with one `error:` line
on a missing source/csv/column or bad argument, and when nothing at all could be packed (the
manifest then lists every rejection).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import ArgumentParser, UserError, run_main
from shards.downstream import DATASETS, DEFAULT_SAMPLES_PER_SHARD, convert
from shards.downstream.common import format_summary
from shards.image import add_image_limit_arguments
from shards.writer import default_workers


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, choices=DATASETS)
    ap.add_argument("--src", required=True, help="the dataset's native root directory")
    ap.add_argument("--out", required=True, help="output root; the dataset goes to <out>/<dataset>/")
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--quality", type=int, default=95)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--seed", type=int, default=0, help="split seed (subsets always use 42)")
    ap.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    add_image_limit_arguments(ap)
    args = ap.parse_args(argv)
    manifest = convert(
        args.dataset,
        args.src,
        args.out,
        max_side=args.max_side,
        quality=args.quality,
        workers=args.workers,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        min_side=args.min_side,
        max_pixels=args.max_pixels,
    )
    print(format_summary(manifest))
    if manifest["num_samples"] == 0:
        first = manifest["rejected"][0]["reason"] if manifest["rejected"] else "no usable rows"
        raise UserError(
            f"{args.dataset}: nothing packed from {args.src} ({len(manifest['rejected'])} rejected, "
            f"first: {first}); every reason is in {Path(args.out) / args.dataset / 'manifest.json'}"
        )
    return 0


if __name__ == "__main__":
    run_main(main)
