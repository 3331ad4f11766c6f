"""`make bench-detection`: what running detection's frozen encoder once per split saves.

    python -m bench.detection_cache [--ckpt C] [--data D] [--fraction 0.1] [--epochs 4]
                                    [--results R] [--doc docs/performance.md] [key=value ...]

The same rsna_detection run twice in one process, back to back, so both see the same machine:
streaming (`detection.feature_cache_gib=0`: decode + encoder on every training batch and, twice, on
every validation batch, each epoch) and cached (the default: the encoder once per split,
eval/tasks/detection.py `CachedFeatures`). Early stopping is off (patience = epochs), so both run every
epoch. Reported: each arm's head-training seconds (`train_seconds`, the epochs) and whole-run seconds,
their ratio, the cache's one-off fill (images, MiB, seconds) and each arm's headline; the headlines
are the same protocol but not the same number (the training batches come in another order).
Writes JSON (default bench/results/detection_cache.json) and its docs/performance.md section.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import perfdoc
from common.cli import UserError, run_main
from common.config import layered_overrides
from common.io import atomic_write_json
from eval.checkpoint import check_image_architecture
from eval.runner import resolve_for, run_eval
from eval.tasks import get_task, load_task_config
from shards.ensure import DEFAULT_DOWNSTREAM, ensure_data
from tools.eval import EVAL_USER_ERRORS

TASK = "rsna_detection"
SECTION = "Detection: the frozen encoder once per split"
ARMS = {"streaming": ["detection.feature_cache_gib=0"], "cached": []}


def run_arms(ckpt: str | None, data: str, fraction: str, epochs: int, overrides: list[str], out: Path) -> dict:
    """{arm: {train_seconds, seconds, headline, feature_cache, epochs_run}} for both arms."""
    # The bench's epochs and no early stopping replace the same keys among the user's overrides.
    fixed = layered_overrides(overrides, [f"train.epochs={epochs}", f"train.patience={epochs}"])
    weights = resolve_for(load_task_config(TASK, fraction, data, fixed), ckpt)
    check_image_architecture(weights)
    ensure_data(data, [get_task(TASK).dataset])
    arms = {}
    for arm, extra in ARMS.items():
        rec = run_eval(TASK, ckpt, fraction, data, [*fixed, *extra], str(out / arm), weights=weights)
        m = rec["metrics"]
        arms[arm] = {
            "train_seconds": rec["train_seconds"],
            "seconds": rec["seconds"],
            "epochs_run": m["epochs_run"],
            "headline": {"name": rec["headline"]["name"], "value": rec["headline"]["value"]},
            "feature_cache": rec["feature_cache"],
        }
    return arms


def markdown(result: dict) -> str:
    s, c = result["arms"]["streaming"], result["arms"]["cached"]
    fill = c["feature_cache"]
    filled = ", ".join(f"{k} {v['images']} images {v['mib']:.0f} MiB in {v['seconds']:.1f} s" for k, v in fill.items())
    return (
        f"`make bench-detection` ({TASK} at fraction {result['fraction']}, {result['epochs']} epochs without "
        f"early stopping, checkpoint `{result['checkpoint']}`, overrides `{' '.join(result['overrides']) or '-'}`; "
        "both arms in one run, back to back).\n\n"
        "| arm | head training (s) | whole run (s) | headline |\n| --- | --- | --- | --- |\n"
        + "".join(
            f"| {arm} | {a['train_seconds']:.1f} | {a['seconds']:.1f} | {a['headline']['name']} "
            f"{100 * (a['headline']['value'] or 0):.1f} |\n"
            for arm, a in result["arms"].items()
        )
        + f"\nHead training {s['train_seconds'] / c['train_seconds']:.2f}x faster cached; the cache's one-off fill: "
        f"{filled or 'none (a split passed the cap)'}. Raw: `{result['results']}`.\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default=None, help="as `make eval` (default: the newest pretraining checkpoint)")
    ap.add_argument("--data", default=DEFAULT_DOWNSTREAM)
    ap.add_argument("--fraction", default="0.1", choices=("0.01", "0.1", "1.0"))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--results", default="bench/results/detection_cache.json")
    ap.add_argument("--doc", default="docs/performance.md", help="'' writes no doc section")
    ap.add_argument("--output-root", default="runs/bench_detection", help="the two evaluation runs")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides of the task config, both arms")
    args = ap.parse_args(argv)
    if args.epochs < 1:
        raise UserError(f"--epochs {args.epochs}: at least 1")
    arms = run_arms(args.ckpt, args.data, args.fraction, args.epochs, args.overrides, Path(args.output_root))
    result = {
        "benchmark": "bench-detection",
        "task": TASK,
        "fraction": args.fraction,
        "epochs": args.epochs,
        "checkpoint": args.ckpt or "newest",
        "overrides": args.overrides,
        "arms": arms,
        "train_speedup": arms["streaming"]["train_seconds"] / arms["cached"]["train_seconds"],
        "results": args.results,
    }
    atomic_write_json(Path(args.results), result)
    if args.doc:
        perfdoc.update_section(Path(args.doc), SECTION, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    run_main(main, extra_errors=EVAL_USER_ERRORS)
