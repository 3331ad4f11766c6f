"""`make verify-shards`: re-hash and fully decode every shard of a packed dataset.

Exit 0 with a summary when everything matches the manifest; exit 1 naming the first bad shard (and
the damaged sample when its checksum says which); exit 2 with one `error:` line when there is no
packed dataset at the path (missing directory or manifest) or an argument is wrong.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common.cli import ArgumentParser, UserError, run_main
from shards.schema import ManifestError, read_manifest
from shards.verify import ShardError, verify_dataset
from shards.writer import default_workers


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="packed dataset root (holds manifest.json)")
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be >= 1")
    if not Path(args.root).is_dir():
        raise UserError(f"no packed dataset at {args.root}: directory not found")
    try:
        read_manifest(args.root)
    except ManifestError as exc:
        raise UserError(str(exc)) from exc
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
    run_main(main)
