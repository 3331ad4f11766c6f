"""`make synth`: render a synthetic corpus in the exact MIMIC-CXR-JPG 2.0.0 layout.

    python -m tools.synth_mimic --out data/synthetic_mimic --n 400 --seed 0 [--size 2048] [--workers N]

Same arguments -> byte-identical tree, whatever --workers; see shards/synthetic/mimic.py for the layout.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.cli import ArgumentParser, UserError, run_main
from shards.synthetic.mimic import MAX_SIZE, generate_mimic


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="corpus root to create")
    parser.add_argument("--n", type=int, required=True, help="number of studies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=2048, help=f"image longer side, 64..{MAX_SIZE}")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing synthetic corpus")
    args = parser.parse_args(argv)
    try:
        s = generate_mimic(
            args.out, n=args.n, seed=args.seed, size=args.size, workers=args.workers, overwrite=args.overwrite
        )
    except FileExistsError as exc:
        raise UserError(str(exc)) from exc
    if s["reused"]:
        print(f"synth_mimic: {args.out} already holds this corpus (n={args.n}, seed={args.seed}, size={args.size})")
        return 0
    print(
        f"synth_mimic: {s['n_studies']} studies, {s['subjects']} subjects, {s['images']} images "
        f"in {s['seconds']:.1f} s ({args.workers} workers) -> {args.out}"
    )
    print("  views:   " + ", ".join(f"{k} {v}" for k, v in s["views"].items()))
    print("  splits:  " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()))
    print(f"  normal studies {s['normal_studies']}, uncertain mentions {s['uncertain_mentions']}")
    print("  studies with: " + ", ".join(f"{k} {v}" for k, v in s["studies_with"].items()))
    print("  regions:      " + ", ".join(f"{k} {v}" for k, v in s["regions"].items()))
    print("  report styles: " + ", ".join(f"{k} {v}" for k, v in s["report_styles"].items()))
    return 0


if __name__ == "__main__":
    run_main(main)
