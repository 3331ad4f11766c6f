"""Convert one downstream dataset from its native download into shards.

    python -m tools.pack_downstream --dataset rsna_pneumonia --src /data/rsna --out data/shards/downstream
writes <out>/<dataset>/{train,valid,test}/*.tar + .idx and <out>/<dataset>/manifest.json, then prints
the accounting summary (packed + rejected + filtered = input images).
"""
from __future__ import annotations

import argparse
import sys

from shards.downstream import DATASETS, DEFAULT_SAMPLES_PER_SHARD, convert
from shards.downstream.common import SourceError, format_summary
from shards.writer import default_workers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, choices=DATASETS)
    ap.add_argument("--src", required=True, help="the dataset's native root directory")
    ap.add_argument("--out", required=True, help="output root; the dataset goes to <out>/<dataset>/")
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--quality", type=int, default=95)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--seed", type=int, default=0, help="split seed (subsets always use 42)")
    ap.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    args = ap.parse_args(argv)
    try:
        manifest = convert(args.dataset, args.src, args.out, max_side=args.max_side,
                           quality=args.quality, workers=args.workers, seed=args.seed,
                           samples_per_shard=args.samples_per_shard)
    except (SourceError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
