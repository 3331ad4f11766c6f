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

import numpy as np

from common.cli import ArgumentParser, UserError, run_main
from common.io import atomic_write_json
from eval.bootstrap import N_RESAMPLES, paired_difference
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


# What each family's predictions.npz must hold (eval/bootstrap.py reads them; grounding's per-image
# arrays vary with the run's age, so only the keys are required there).
REQUIRED = {
    "linear": ("keys", "names", "kind", "targets", "scores"),
    "finetune": ("keys", "names", "kind", "targets", "scores"),
    "zeroshot_cls": ("keys", "names", "targets", "scores"),
    "segmentation": ("keys", "dice", "iou", "positive"),
    "grounding": ("keys",),
    "detection": ("keys", "pred_boxes", "pred_scores", "pred_image", "gt_boxes", "gt_image", "iou_thresholds"),
}
# Arrays with one row per test image (the rest: label names, flat box lists, thresholds).
PER_IMAGE = (
    "patient_ids",
    "targets",
    "scores",
    "dice",
    "dice_raw",
    "iou",
    "positive",
    "gt_area",
    "pred_area",
    "pointing",
    "pointing_cell",
    "pointing_chance",
    "pointing_attn_value",
    "pointing_projector",
    "medklip_iou",
    "medklip_dice",
)
# Detection's flat arrays: (box rows, the array naming each row's image).
BOX_LISTS = (("pred_boxes", "pred_image", ("pred_scores",)), ("gt_boxes", "gt_image", ()))


def check_predictions(path: Path, p: dict, family: str) -> None:
    """A predictions.npz that the bootstrap can score as it is: the family's arrays present, keys
    unique strings, every per-image array one row per key, detection's boxes naming existing images.
    Raises UserError naming the file and the first problem."""
    missing = [k for k in REQUIRED.get(family, ("keys",)) if k not in p]
    if missing:
        raise UserError(f"{path}: lacks the array(s) {missing} of a {family} run")
    keys = p["keys"]
    if keys.ndim != 1 or keys.dtype.kind != "U":
        raise UserError(f"{path}: keys is not a list of strings (dtype {keys.dtype}, shape {keys.shape})")
    n = len(keys)
    if len(set(keys.tolist())) != n:
        dup = next(k for i, k in enumerate(keys.tolist()) if k in keys.tolist()[:i])
        raise UserError(f"{path}: key {dup!r} appears more than once")
    for name in PER_IMAGE:
        if name in p and (p[name].ndim == 0 or len(p[name]) != n):
            rows = "a scalar" if p[name].ndim == 0 else f"{len(p[name])} rows"
            raise UserError(f"{path}: {name} has {rows} for {n} keys")
    if "scores" in p and "names" in p and (p["scores"].ndim != 2 or p["scores"].shape[1] != len(p["names"])):
        raise UserError(f"{path}: scores has shape {p['scores'].shape}, not [{n}, {len(p['names'])}] (one per name)")
    for rows, image, others in BOX_LISTS if family == "detection" else ():
        for name in (rows, *others):
            if len(p[name]) != len(p[image]):
                raise UserError(f"{path}: {name} has {len(p[name])} rows, {image} {len(p[image])}")
        index = p[image]
        if index.size and (index.dtype.kind not in "iu" or index.min() < 0 or index.max() >= n):
            raise UserError(f"{path}: {image} names images outside 0..{n - 1}")
    for name, value in p.items():
        if name not in ("keys", "patient_ids", "names", "kind") and value.dtype.kind not in "biuf":
            raise UserError(f"{path}: {name} is not numeric (dtype {value.dtype})")


def _rows_by_key(p: dict, name: str) -> dict[str, np.ndarray]:
    return dict(zip(p["keys"].tolist(), p[name]))


def _gt_boxes_by_key(p: dict) -> dict[str, np.ndarray]:
    """Detection ground truth per image key, rows sorted (the order boxes were listed is not a label)."""
    boxes, image = np.asarray(p["gt_boxes"]).reshape(-1, 4), p["gt_image"]
    return {k: np.array(sorted(map(tuple, boxes[image == i]))) for i, k in enumerate(p["keys"].tolist())}


def first_difference(pred_a: dict, pred_b: dict, same_geometry: bool) -> str:
    """ "" when A and B scored the same test set (same keys, patients and labels per key; label names
    and kind); else one phrase naming the first difference. Ground-truth areas and boxes are in the
    evaluated image's pixels, so they are compared only when both runs used the same image size
    (`same_geometry`); box counts and positivity always."""
    for name in ("names", "kind"):
        if name in pred_a and name in pred_b and pred_a[name].tolist() != pred_b[name].tolist():
            return f"label {name} differ: {pred_a[name].tolist()} in A, {pred_b[name].tolist()} in B"
    keys_a, keys_b = pred_a["keys"].tolist(), pred_b["keys"].tolist()
    if len(keys_a) != len(keys_b):
        return f"A scored {len(keys_a)} test images, B {len(keys_b)}"
    set_a, set_b = set(keys_a), set(keys_b)
    for key in keys_a:
        if key not in set_b:
            return f"key {key!r} is in A but not in B"
    for key in keys_b:
        if key not in set_a:
            return f"key {key!r} is in B but not in A"
    labels = ["patient_ids", "targets", "positive"] + (["gt_area"] if same_geometry else [])
    for name in labels:
        if (name in pred_a) != (name in pred_b):
            return f"{name} is recorded in {'A' if name in pred_a else 'B'} only"
        if name not in pred_a:
            continue
        rows_a, rows_b = _rows_by_key(pred_a, name), _rows_by_key(pred_b, name)
        for key in keys_a:
            if not np.array_equal(rows_a[key], rows_b[key]):
                return f"key {key!r} has {name} {rows_a[key].tolist()} in A, {rows_b[key].tolist()} in B"
    if "gt_boxes" in pred_a and "gt_boxes" in pred_b:
        boxes_a, boxes_b = _gt_boxes_by_key(pred_a), _gt_boxes_by_key(pred_b)
        for key in keys_a:
            a, b = boxes_a[key], boxes_b[key]
            if len(a) != len(b):
                return f"key {key!r} has {len(a)} ground-truth boxes in A, {len(b)} in B"
            if same_geometry and not np.allclose(a, b, atol=1e-3):
                return f"key {key!r} has ground-truth boxes {a.tolist()} in A, {b.tolist()} in B"
    return ""


def _image_size(results: dict):
    return (results.get("config") or {}).get("data", {}).get("image_size")


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
    same_geometry = _image_size(res_a) == _image_size(res_b)
    difference = first_difference(pred_a, pred_b, same_geometry)
    if difference:
        raise UserError(f"A ({path_a}) and B ({path_b}) were not scored on the same test set: {difference}")
    try:
        diffs = paired_difference(task.family, pred_a, pred_b, seed=args.seed)
    except ValueError as exc:  # different test images: a user error, named
        raise UserError(f"{path_a} vs {path_b}: {exc}") from exc
    unit = "patient" if res_a.get("bootstrap", {}).get("unit") == "patient" else "image"
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
