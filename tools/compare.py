"""Is B better than A? The paired bootstrap difference of every metric of one task (`make compare`).

    python -m tools.compare --a A --b B --task rsna_linear [--fraction 1.0] [--data D] [key=value ...]

A and B are each either an evaluation run directory (runs/eval/<task>/<fraction>/<timestamp>/, holding
results.json and predictions.npz), or anything `make eval CKPT=` accepts (a pretraining checkpoint or
run directory, an exported .pth, another model's state dict, random, imagenet): that one is evaluated
first on TASK (key=value overrides go to those runs). Both runs must have scored the same test set:
the same keys, patients and labels per key, every per-image array one row per key; the first
difference, or a damaged results.json / predictions.npz, is one line `error: ...` (exit 2).
Output: per metric A, B, B - A with its 95% paired-bootstrap interval (the same resampled patients
scored for both) and the fraction of resamples where B is ahead; compare.json with every metric
(per class / per IoU threshold too) is written to --out (default runs/compare/<task>/<timestamp>/).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from common.cli import ArgumentParser, UserError, run_main
from common.io import atomic_write_json
from eval.bootstrap import N_RESAMPLES, paired_difference
from eval.pairing import check_predictions, first_difference
from eval.runner import PREDICTIONS_NAME, clean_json, load_predictions, new_run_dir, resolve_for, run_eval
from eval.tasks import get_task, load_task_config
from shards.ensure import ensure_data
from tools.eval import EVAL_USER_ERRORS


def run_directory(spec: str) -> Path | None:
    """`spec` as an evaluation run directory (results.json + predictions.npz), else None."""
    path = Path(spec)
    if (path / "results.json").is_file():
        if not (path / PREDICTIONS_NAME).is_file():
            raise UserError(
                f"{path}: has results.json but no {PREDICTIONS_NAME} (written by evaluations since "
                "predictions were recorded); re-run the evaluation"
            )
        return path
    return None


def load_run(path: Path, task: str, family: str) -> tuple[dict, dict]:
    """(results.json, predictions.npz) of a run, each checked: strict JSON object of `task`; plain
    arrays whose per-image rows match the keys (`check_predictions`). A damaged file is a UserError."""
    results_path = path / "results.json"
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{results_path}: not valid JSON ({exc})") from None
    if not isinstance(results, dict):
        raise UserError(f"{results_path}: not a JSON object (a {type(results).__name__})")
    if results.get("task") != task:
        raise UserError(f"{path}: is a {results.get('task')!r} run, not {task!r}")
    predictions = load_predictions(path / PREDICTIONS_NAME)
    check_predictions(path / PREDICTIONS_NAME, predictions, family)
    return results, predictions


def _field(results: dict, *path: str):
    """results[path[0]][path[1]]..., None where a level is absent or not an object (old or odd runs)."""
    value = results
    for name in path:
        value = value.get(name) if isinstance(value, dict) else None
    return value


def evaluate(spec: str, task: str, fraction: str, data: str, overrides: list[str], output_root: str | None) -> Path:
    """Evaluate checkpoint `spec` on `task` (checkpoint checked before any data is packed)."""
    cfg = load_task_config(task, fraction, data, overrides)
    weights = resolve_for(cfg, spec)
    ensure_data(data, [get_task(task).dataset])
    rec = run_eval(task, spec, fraction, data, overrides, output_root, weights=weights)
    return Path(rec["results_path"]).parent


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def format_comparison(task: str, a: str, b: str, diffs: dict[str, dict], unit: str) -> str:
    """The headline metrics (no per-class / per-threshold rows), percent points."""
    rows = [(k, v) for k, v in diffs.items() if "." not in k]
    lines = [
        f"{task}: B - A, 95% paired-bootstrap interval ({N_RESAMPLES} resamples of {unit}s)",
        f"  A = {a}",
        f"  B = {b}",
        f"{'metric':<20} {'A':>7} {'B':>7} {'B - A [95% CI]':>24} {'P(B > A)':>9}",
    ]
    for name, d in rows:
        ci = d["ci95"]
        interval = (
            f"{100 * d['diff']:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else f"{_fmt(d['diff'])} [n/a]"
        )
        lines.append(f"{name:<20} {_fmt(d['a']):>7} {_fmt(d['b']):>7} {interval:>24} {d['p_b_better']:>9.3f}")
    lines.append("An interval that excludes 0 is a difference this test set can resolve; one that spans 0 is not.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="evaluation run directory, or a checkpoint to evaluate")
    ap.add_argument("--b", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--fraction", default="1.0", choices=("0.01", "0.1", "1.0"))
    ap.add_argument("--data", default="data/shards/downstream")
    ap.add_argument("--output-root", default=None, help="where evaluations run here are written (default runs/eval)")
    ap.add_argument("--out", default=None, help="compare.json directory (default runs/compare/<task>/<timestamp>)")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for evaluations run here")
    args = ap.parse_args(argv)
    task = get_task(args.task)
    if not (args.a and args.b):
        raise UserError("give both A= and B= (run directories or checkpoints)")
    runs = {}
    for label, spec in (("A", args.a), ("B", args.b)):
        path = run_directory(spec) or evaluate(
            spec, task.name, args.fraction, args.data, args.overrides, args.output_root
        )
        runs[label] = (path, *load_run(path, task.name, task.family))
    (path_a, res_a, pred_a), (path_b, res_b, pred_b) = runs["A"], runs["B"]
    same_geometry = _field(res_a, "config", "data", "image_size") == _field(res_b, "config", "data", "image_size")
    difference = first_difference(pred_a, pred_b, same_geometry)
    if difference:
        raise UserError(f"A ({path_a}) and B ({path_b}) were not scored on the same test set: {difference}")
    try:
        diffs = paired_difference(task.family, pred_a, pred_b, seed=args.seed)
    except ValueError as exc:  # different test images: a user error, named
        raise UserError(f"{path_a} vs {path_b}: {exc}") from exc
    unit = "patient" if _field(res_a, "bootstrap", "unit") == "patient" else "image"
    print(format_comparison(task.name, str(path_a), str(path_b), diffs, unit))
    out_dir = Path(args.out) if args.out else new_run_dir(Path("runs/compare") / task.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        out_dir / "compare.json",
        clean_json(
            {
                "task": task.name,
                "a": {"run": str(path_a), "checkpoint": res_a.get("checkpoint")},
                "b": {"run": str(path_b), "checkpoint": res_b.get("checkpoint")},
                "resamples": N_RESAMPLES,
                "seed": args.seed,
                "unit": unit,
                "difference": "b - a",
                "metrics": diffs,
            }
        ),
    )
    print(f"-> {out_dir / 'compare.json'}")
    return 0


if __name__ == "__main__":
    run_main(main, extra_errors=EVAL_USER_ERRORS)
