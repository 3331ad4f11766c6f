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

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import ArgumentParser, UserError, add_dataclass_arguments, dataclass_from_args, run_main
from shards.ensure import ensure_synthetic
from shards.mimic import DEFAULT_SAMPLES_PER_SHARD, SYNTHETIC_SAMPLES_PER_SHARD, PackOptions, pack_mimic
from shards.writer import default_workers


@dataclass(frozen=True)
class ShardsOptions(PackOptions):
    """This command's options: shards.mimic.PackOptions (the packing, with its defaults and help) with two
    defaults of its own (every core; the shard size by source) and the synthetic corpus's size. argparse
    builds `--<name>` from these fields (common.cli.add_dataclass_arguments) and the Makefile passes only
    the variables a user set, so every default is the one here or in PackOptions."""

    workers: int = field(default_factory=default_workers, metadata={"help": "packing processes"})
    samples_per_shard: int | None = field(
        default=None,
        metadata={"help": f"default {DEFAULT_SAMPLES_PER_SHARD} (real) / {SYNTHETIC_SAMPLES_PER_SHARD} (synthetic)"},
    )
    synth_n: int = field(default=400, metadata={"help": "synthetic studies to generate (--synthetic)"})
    synth_size: int = field(default=2048, metadata={"help": "synthetic image longer side (--synthetic)"})

    def packing(self, samples_per_shard: int) -> PackOptions:
        """The PackOptions these stand for, the shard size resolved for the source."""
        kept = {f.name: getattr(self, f.name) for f in dataclasses.fields(PackOptions)}
        return PackOptions(**{**kept, "samples_per_shard": self.samples_per_shard or samples_per_shard})


def pack(root: Path, out: Path, options: PackOptions, **inputs) -> dict:
    """pack_mimic(root, out, options, **inputs) plus this command's checks: nothing packed at all is a
    UserError naming the manifest with the reasons; otherwise one summary line. Returns the manifest."""
    manifest = pack_mimic(root, out, options, **inputs)
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
    add_dataclass_arguments(parser, ShardsOptions)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = dataclass_from_args(ShardsOptions, args)
    if opts.synth_n < 1 or opts.synth_size < 1:
        raise UserError(f"--synth-n {opts.synth_n} / --synth-size {opts.synth_size}: both must be >= 1")

    if args.synthetic is not None:
        root = ensure_synthetic(args.synthetic, opts.synth_n, opts.synth_size, opts.seed, opts.workers)
        packing = opts.packing(SYNTHETIC_SAMPLES_PER_SHARD)
    else:
        root = args.mimic
        packing = opts.packing(DEFAULT_SAMPLES_PER_SHARD)
    pack(root, args.out, packing, reports_dir=args.reports, master_csv=args.master_csv)
    return 0


if __name__ == "__main__":
    run_main(main)
