"""Downstream evaluation CLI (`make eval` / `make eval-all`).

    python -m tools.eval --task rsna_segmentation [--ckpt C] [--fraction 0.01|0.1|1.0] [--data D] key=value ...
    python -m tools.eval --task all ...       every task for C and for random init + the paper's tables

--ckpt: a pretraining checkpoint (.pt), a run directory, an exported g2d_encoder*.pth, another
model's torchvision-layout ResNet state dict, a checkpoint with the encoder under a key prefix (with
the override ckpt.prefix=...), `random` or `imagenet`; default the newest checkpoint under
runs/pretrain*/ or runs/*/pretrain*/ (see eval/checkpoint.py). It is resolved and checked before
any data is rendered or packed; a bad file is one line `error: ...`, exit 2.
--data: the downstream shards root; default data/shards/downstream, which is generated
(tools.synth_downstream + shards.downstream) when a dataset is missing there. key=value overrides
the task config (configs/eval/<task>.yaml), e.g. train.epochs=2 linear.mode=fast
segmentation.variant=encoder_decoder. Results: runs/eval/<task>/<fraction>/<timestamp>/ (results.json
with 95% bootstrap intervals, predictions.npz, plots).
"""

from __future__ import annotations

import argparse
import sys

from common.cli import run_main
from common.config import ConfigError
from eval.checkpoint import (
    ArchitectureMismatch,
    BadCheckpoint,
    CheckpointNotFound,
    NotApplicable,
    WeightsUnavailable,
    check_image_architecture,
)
from eval.runner import resolve_for, run_all, run_eval
from eval.tasks import TASKS, UnknownTask, applicable_overrides, get_task, load_task_config
from shards.ensure import DEFAULT_DOWNSTREAM, ensure_data

DEFAULT_DATA = DEFAULT_DOWNSTREAM


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, help=f"one of: {', '.join(TASKS)}, or all")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--fraction", default="1.0", choices=("0.01", "0.1", "1.0"))
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--output-root", default=None, help="default runs/eval (config key output_root)")
    ap.add_argument("--no-random", action="store_true", help="--task all: skip the random-init baseline")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides of the task config")
    args = ap.parse_args(argv)
    names = list(TASKS) if args.task == "all" else [get_task(args.task).name]
    # The checkpoint first: a wrong CKPT must fail in a second, before any data is rendered or packed.
    first = load_task_config(
        names[0], args.fraction, args.data, applicable_overrides(get_task(names[0]), args.overrides)[0]
    )
    weights = resolve_for(first, args.ckpt)
    check_image_architecture(weights)
    ensure_data(args.data, [TASKS[n].dataset for n in names])
    if args.task == "all":
        summary = run_all(
            args.ckpt,
            args.fraction,
            args.data,
            args.overrides,
            args.output_root,
            with_random=not args.no_random,
            weights=weights,
        )
        if summary["failed"]:
            print(f"error: {len(summary['failed'])} task run(s) failed: {summary['failed']}", file=sys.stderr)
            return 1
        return 0
    run_eval(names[0], args.ckpt, args.fraction, args.data, args.overrides, args.output_root, weights=weights)
    return 0


# Bad input that the eval code raises as its own types (all name the file/key at fault).
EVAL_USER_ERRORS = (
    UnknownTask,
    CheckpointNotFound,
    BadCheckpoint,
    ArchitectureMismatch,
    NotApplicable,
    ConfigError,
    WeightsUnavailable,
)

if __name__ == "__main__":
    run_main(main, extra_errors=EVAL_USER_ERRORS)
