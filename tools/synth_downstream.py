"""Write synthetic look-alikes of the six downstream datasets in their native formats.

    python -m tools.synth_downstream --out data/synthetic_downstream --n 120 --seed 0
writes <out>/<dataset>/ for rsna_pneumonia, siim_pneumothorax, chexpert, covidx, object_cxr and
chestxray14, each laid out like the real download (see shards/synthetic/downstream.py), ready for
`make shards DATASET=<name> SRC=<out>/<name>`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common.cli import ArgumentParser, UserError, run_main
from shards.synthetic.downstream import DATASETS, write_all
from shards.writer import default_workers


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=120, help="images per dataset (about; CheXpert adds laterals)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    args = ap.parse_args(argv)
    if args.n < 1 or args.workers < 1:
        raise UserError(f"--n {args.n} / --workers {args.workers}: both must be >= 1")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} exists and is not a directory")
    start = time.perf_counter()
    counts = write_all(args.out, args.n, args.seed, workers=args.workers, datasets=tuple(args.datasets))
    for name, count in counts.items():
        print(f"{name}: {count} images -> {args.out}/{name}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
