"""Write synthetic look-alikes of the six downstream datasets in their native formats.

    python -m tools.synth_downstream --out data/synthetic_downstream --n 120 --seed 0
writes <out>/<dataset>/ for rsna_pneumonia, siim_pneumothorax, chexpert, covidx, object_cxr and
chestxray14, each laid out like the real download (see shards/synthetic/downstream.py), ready for
`make shards DATASET=<name> SRC=<out>/<name>`.
"""
from __future__ import annotations

import argparse
import sys
import time

from shards.synthetic.downstream import DATASETS, write_all
from shards.writer import default_workers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=120, help="images per dataset (about; CheXpert adds laterals)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be >= 1")
    start = time.perf_counter()
    counts = write_all(args.out, args.n, args.seed, workers=args.workers, datasets=tuple(args.datasets))
    for name, count in counts.items():
        print(f"{name}: {count} images -> {args.out}/{name}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
