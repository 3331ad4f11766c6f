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


def verify(root: str | Path, workers: int) -> int:
    """Check `root` against its manifest and print the summary: 0 when it matches, 1 (the bad shard on
    stderr) when it does not; no packed dataset there or workers < 1 is a UserError."""
    if workers < 1:
        raise UserError(f"--workers {workers}: must be >= 1")
    if not Path(root).is_dir():
        raise UserError(f"no packed dataset at {root}: directory not found")
    try:
        read_manifest(root)
    except ManifestError as exc:
        raise UserError(str(exc)) from exc
    try:
        summary = verify_dataset(root, workers=workers)
    except (ShardError, ManifestError) as exc:
        print(f"verify_shards: FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"verify_shards: OK: {summary['num_samples']} samples, {summary['bytes'] / 1e6:.1f} MB in {root}")
    for split, rec in summary["splits"].items():
        print(f"  {split:<6} {rec['num_samples']:>8} samples in {rec['shards']} shards")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="packed dataset root (holds manifest.json)")
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args(argv)
    return verify(args.root, args.workers)


if __name__ == "__main__":
    run_main(main)
