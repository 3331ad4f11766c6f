"""`make verify-shards`: re-hash and fully decode every shard of a packed dataset.

Exit 0 with a summary when everything matches the manifest; exit 1 naming the first bad shard.
"""
from __future__ import annotations

import argparse
import sys

from shards.schema import ManifestError
from shards.verify import ShardError, verify_dataset
from shards.writer import default_workers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="packed dataset root (holds manifest.json)")
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args(argv)
    try:
        summary = verify_dataset(args.root, workers=args.workers)
    except (ShardError, ManifestError) as exc:
        print(f"verify_shards: FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"verify_shards: OK: {summary['num_samples']} samples, {summary['bytes'] / 1e6:.1f} MB in {args.root}")
    for split, rec in summary["splits"].items():
        print(f"  {split:<6} {rec['num_samples']:>8} samples in {rec['shards']} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
