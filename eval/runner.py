"""Run evaluation tasks and record them.

    run_eval(task, ckpt, fraction, data_root, overrides) -> record
        writes runs/eval/<task>/<fraction>/<timestamp>/results.json + predictions.npz + the task's
        PNGs + eval.log (the run's log lines)
    run_all(ckpt, fraction, data_root, overrides) -> summary
        every task for the checkpoint (both segmentation variants when it has a decoder) and for
        random init of the same architecture, then the paper-shaped tables (`format_tables`), written
        to runs/eval/all/<fraction>/<timestamp>/{summary.json, tables.txt}

results.json: task, family, dataset, fraction, metrics (undefined values are null), ci95 {metric:
[low, high]} (95% bootstrap intervals, eval/bootstrap.py), headline {name, value, ci95}, checkpoint
{kind, path, sha256, step, encoder}, data {root, manifest, manifest_sha256, splits (the manifest's
counts), test_scored (== splits[test], checked), skipped_samples {split: {count, samples: [{key,
shard, reason}]}} (unreadable train/valid samples left out; an unreadable TEST sample fails the run),
views: the image view each split really used}, seed, the resolved config, device, software versions, timing and the
PNG names. Beside it, predictions.npz: the test samples' keys, patient ids, targets and the model's
scores (per family, eval/bootstrap.py reads them), from which every metric can be recomputed.
A run that fails leaves no run directory behind.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import platform
import shutil
import time
import traceback
import zipfile
import zlib
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from common.cli import UserError
from common.config import config_to_dict
from common.io import atomic_open, atomic_write_json, atomic_write_text, sha256_file
from common.log import ROOT_LOGGER, setup_logging
from eval.bootstrap import N_RESAMPLES, confidence_intervals
from eval.checkpoint import NotApplicable, Pretrained, check_image_architecture, resolve_weights
from eval.paper_numbers import (
    TABLE1_G2D,
    TABLE1_RANDOM,
    TABLE2_G2D,
    TABLE3_G2D,
    TABLE3_G2D_PER_CLASS,
    TABLE3_RANDOM,
    TABLE4_G2D,
    TABLE4_RANDOM,
)
from eval.tasks import TASKS, TEXT_FAMILIES, applicable_overrides, get_task, load_task_config, run_task
from eval.tasks.data import CHECKPOINT_VIEW, dataset_root, recording_loaders, resolved_view, skipped_samples
from eval.tasks.fit import LOG, device_of, log_info, make_deterministic
from model.registry import model_config
from pipeline import CorruptSampleError
from shards.schema import MANIFEST_NAME, read_manifest


class DamagedData(UserError):
    """The evaluation data cannot give an honest result (an unreadable test sample, fewer test images
    scored than the manifest lists): the message names the task, and the shard, sample and reason."""


class BadPredictions(UserError):
    """A predictions.npz that is not a readable archive of plain arrays (truncated, not a zip, an
    object array that would need unpickling): the message names the file and the reason."""


def ensure_console_logging() -> None:
    """The project's console logging (common/log.py, as training sets it up) unless the caller (an
    entry point, a test) configured the "g2d" logger already."""
    if not logging.getLogger(ROOT_LOGGER).handlers:
        setup_logging(0)


@contextmanager
def run_log_file(path: Path):
    """Copy the project's log lines to `path` while the block runs (each run directory keeps its own
    account, as a training run's logs/rank0.log does)."""
    root = logging.getLogger(ROOT_LOGGER)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def clean_json(value):
    """nan/inf -> None (strict JSON; null = undefined), tuples -> lists, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


def new_run_dir(root: Path) -> Path:
    """root/<UTC timestamp>, suffixed -1, -2 ... if two runs start in the same second."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        path = root / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh run directory under {root}")


def resolve_for(cfg, ckpt: str | None) -> Pretrained:
    return resolve_weights(
        ckpt,
        baseline=model_config(cfg.model.baseline),
        imagenet_weights=cfg.model.imagenet_weights,
        prefix=cfg.ckpt.prefix,
    )


def run_eval(
    task_name: str,
    ckpt: str | None = None,
    fraction: str = "1.0",
    data_root: str | None = None,
    overrides: list[str] | None = None,
    output_root: str | None = None,
    weights: Pretrained | None = None,
    log=log_info,
) -> dict:
    """Run one task; returns the record written to results.json (+ "results_path"). Logs through
    `log` (default: the project's logger, console set up as training's when the caller has not) and
    copies the run's lines to <run dir>/eval.log."""
    ensure_console_logging()
    task = get_task(task_name)
    cfg = load_task_config(task_name, fraction, data_root, overrides)
    if output_root:
        cfg = dataclasses.replace(cfg, output_root=str(output_root))
    weights = weights or resolve_for(cfg, ckpt)
    check_image_architecture(weights)  # a mismatched file fails before any data is read
    if task.family in TEXT_FAMILIES and not weights.has_text:
        raise NotApplicable(
            f"{task_name} needs the text encoder, projector and attention pool of a pretraining "
            f"checkpoint; {weights.source} ({weights.kind}) has only image weights"
        )
    manifest_path = dataset_root(cfg) / MANIFEST_NAME
    manifest = read_manifest(dataset_root(cfg))
    runs_dir = Path(cfg.output_root) / task_name / fraction
    made = [p for p in (runs_dir, runs_dir.parent, runs_dir.parent.parent) if not p.exists()]  # innermost first
    out_dir = new_run_dir(runs_dir)
    try:
        with run_log_file(out_dir / "eval.log"):
            record = _run_in(out_dir, task, cfg, weights, manifest, manifest_path, log)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # no half-written run directory survives a failure
        for parent in made:  # <root>/<task>/<fraction> as far as this run made them
            try:
                parent.rmdir()
            except OSError:  # not empty: another run wrote there meanwhile
                break
        raise
    log(
        f"[eval] {task_name}: {record['headline']['name']} = {_pct(record['headline']['value'])}% "
        f"{_ci_text(record['headline']['ci95'])} -> {out_dir / 'results.json'}"
    )
    return {**record, "results_path": str(out_dir / "results.json")}


def _run_in(out_dir: Path, task, cfg, weights: Pretrained, manifest: dict, manifest_path: Path, log) -> dict:
    device = device_of()
    make_deterministic(cfg.seed)
    variant = getattr(getattr(cfg, "segmentation", None), "variant", "")
    log(
        f"[eval] {task.name}{f' ({variant})' if variant else ''} fraction {cfg.fraction} on {dataset_root(cfg)}; "
        f"weights {weights.kind} {weights.source}; device {device}"
    )
    t0 = time.perf_counter()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    with recording_loaders() as loaders:
        try:
            result = run_task(task, cfg, weights, out_dir, device, log)
        except CorruptSampleError as exc:
            raise DamagedData(
                f"{task.name}: the {cfg.data.test_split} split has an unreadable sample, {exc}; a test set must "
                "not shrink (the metric would move with it): re-pack or repair the dataset"
            ) from None
    skipped = skipped_samples(loaders)
    for split, s in skipped.items():  # a warning whatever `log` the caller chose: data was left out
        LOG.warning(
            f"[eval] {task.name}: skipped {s['count']} unreadable {split} sample(s): "
            f"{', '.join(x['key'] for x in s['samples'][:5])}{' ...' if s['count'] > 5 else ''} "
            "(listed in results.json data.skipped_samples)"
        )
    # Wall-clock time is not a metric: same seed, same machine must give identical `metrics`.
    train_seconds = result["metrics"].pop("train_seconds", None)
    predictions = result["predictions"]
    test_listed = manifest["splits"].get(cfg.data.test_split, {}).get("num_samples")
    test_scored = len(predictions["keys"])
    if test_scored != test_listed:
        raise DamagedData(
            f"{task.name}: scored {test_scored} test images but {manifest_path} lists {test_listed} in split "
            f"{cfg.data.test_split!r}; a test set must not shrink: re-pack the dataset"
        )
    save_predictions(out_dir / PREDICTIONS_NAME, predictions)
    t_ci = time.perf_counter()
    ci95 = confidence_intervals(task.family, predictions, seed=cfg.seed)
    log(f"[eval] {task.name}: 95% bootstrap intervals ({N_RESAMPLES} resamples) in {time.perf_counter() - t_ci:.1f} s")
    headline = result["headline"]
    d = cfg.data
    views = {"test": resolved_view(cfg, weights, d.eval_transform)}
    if task.family not in TEXT_FAMILIES:
        views["train"] = resolved_view(cfg, weights, d.train_transform)
    record = clean_json(
        {
            "task": task.name,
            "family": task.family,
            "dataset": task.dataset,
            "fraction": cfg.fraction,
            "variant": variant,
            "headline": {"name": headline, "value": result["metrics"].get(headline), "ci95": ci95.get(headline)},
            "metrics": result["metrics"],
            "ci95": ci95,
            "bootstrap": {
                "resamples": N_RESAMPLES,
                "seed": cfg.seed,
                "unit": "patient" if _has_patients(predictions) else "image",
            },
            "checkpoint": weights.describe(),
            "data": {
                "root": str(dataset_root(cfg)),
                "manifest": str(manifest_path),
                "manifest_sha256": sha256_file(manifest_path),
                "splits": {s: v["num_samples"] for s, v in manifest["splits"].items()},
                "test_scored": test_scored,
                "skipped_samples": skipped,
                "train_subset": _subset_size(manifest, cfg, task),
                "valid_images": _selected(loaders, cfg.data.valid_split),  # data.valid_max_images caps it
                "views": views,
                "checkpoint_view": d.eval_transform == CHECKPOINT_VIEW,
            },
            "seed": cfg.seed,
            "config": config_to_dict(cfg),
            "device": str(device),
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "started_at": started,
            "seconds": time.perf_counter() - t0,
            "train_seconds": train_seconds,
            **result.get("record", {}),  # a task's own notes on how it ran (detection: feature_cache)
            "plots": result["plots"],
            "predictions": PREDICTIONS_NAME,
        }
    )
    atomic_write_json(out_dir / "results.json", record)
    return record


PREDICTIONS_NAME = "predictions.npz"


def save_predictions(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """predictions.npz, written atomically; plain arrays only (strings as numpy unicode), so
    np.load(path) reads it without allow_pickle."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    with atomic_open(path, "wb") as fh:
        fh.write(buffer.getvalue())


def load_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """{name: array} of a predictions.npz. Never unpickles (allow_pickle=False): an object array is a
    `BadPredictions` error, as is a truncated or damaged archive (zip CRCs are checked on read)."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as exc:
        raise BadPredictions(f"{path}: not a readable predictions archive ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy under the .npz name
        raise BadPredictions(f"{path}: not an .npz archive (a single array)")
    with data:
        try:
            return {k: data[k] for k in data.files}
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as exc:
            raise BadPredictions(f"{path}: not a readable predictions archive ({type(exc).__name__}: {exc})") from None


def _has_patients(predictions: dict) -> bool:
    ids = np.asarray(predictions.get("patient_ids", []), dtype=str)
    return bool(ids.size) and not (ids == "").any()


def _ci_text(ci) -> str:
    return "" if not ci else f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def _selected(loaders: list, split: str) -> int | None:
    """How many samples the run's loader over `split` selected (after the subset and data.max_samples;
    unreadable ones it skipped are in skipped_samples); None when the task read no such split."""
    return next((loader.index.num_selected for name, loader in loaders if name == split), None)


def _subset_size(manifest: dict, cfg, task) -> dict | None:
    """How many training images the fraction selected (None for the tasks that do not train)."""
    if task.family in TEXT_FAMILIES:
        return None
    d = cfg.data
    table = manifest.get("task_subsets", {}).get(d.subset_task, {}) if d.subset_task else manifest.get("subsets", {})
    keys = table.get(d.train_split, {}).get(cfg.fraction)
    return {"task": d.subset_task or None, "fraction": cfg.fraction, "images": len(keys) if keys is not None else None}


# ---------------------------------------------------------------------------------------------
# every task + the paper's tables


def run_all(
    ckpt: str | None = None,
    fraction: str = "1.0",
    data_root: str | None = None,
    overrides: list[str] | None = None,
    output_root: str | None = None,
    with_random: bool = True,
    tasks: list[str] | None = None,
    log=log_info,
    weights: Pretrained | None = None,
) -> dict:
    """Every task (or `tasks`) for the checkpoint (+ random init of its architecture). A failing task
    is recorded with its error and the others still run; summary["failed"] lists them."""
    ensure_console_logging()
    overrides = list(overrides or [])
    selected = [get_task(name) for name in (tasks or TASKS)]
    first = load_task_config(selected[0].name, fraction, data_root, applicable_overrides(selected[0], overrides)[0])
    root = Path(output_root or first.output_root)
    weights = weights or resolve_for(first, ckpt)
    models = {"checkpoint": weights}
    if with_random and weights.kind != "random":
        models["random"] = weights.random_like()
    records, failed = [], []
    for task in selected:
        keep, skipped = applicable_overrides(task, overrides)
        if skipped:
            log(f"[eval] {task.name}: overrides not used by this task: {skipped}")
        for label, w in models.items():
            if task.family in TEXT_FAMILIES and not w.has_text:
                records.append({"task": task.name, "model": label, "variant": "", "status": "not applicable"})
                continue
            variants = [""]
            if task.family == "segmentation":
                variants = ["encoder", "encoder_decoder"] if (label == "checkpoint" and w.has_decoder) else ["encoder"]
            for variant in variants:
                extra = [f"segmentation.variant={variant}"] if variant else []
                try:
                    rec = run_eval(
                        task.name,
                        fraction=fraction,
                        data_root=data_root,
                        overrides=keep + extra,
                        output_root=str(root),
                        weights=w,
                        log=log,
                    )
                    records.append(
                        {
                            "task": task.name,
                            "model": label,
                            "variant": variant,
                            "status": "ok",
                            "metrics": rec["metrics"],
                            "ci95": rec["ci95"],
                            "skipped_samples": rec["data"]["skipped_samples"],
                            "results_path": rec["results_path"],
                        }
                    )
                except Exception as exc:  # one broken task must not hide the others' results
                    log(f"[eval] {task.name} ({label}{', ' + variant if variant else ''}) FAILED: {exc}")
                    log(traceback.format_exc(limit=3))
                    records.append(
                        {
                            "task": task.name,
                            "model": label,
                            "variant": variant,
                            "status": "failed",
                            "error": f"{type(exc).__name__}: {exc}",
                        }
                    )
                    failed.append(f"{task.name}/{label}{'/' + variant if variant else ''}")
    tables = format_tables(records, fraction, weights, data_root or first.data.root)
    out_dir = new_run_dir(root / "all" / fraction)
    summary = clean_json(
        {"fraction": fraction, "checkpoint": weights.describe(), "records": records, "failed": failed, "tables": tables}
    )
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_text(out_dir / "tables.txt", tables + "\n")
    log(tables)
    log(f"[eval] summary -> {out_dir / 'summary.json'}")
    return {**summary, "summary_path": str(out_dir / "summary.json")}


def _pct(v) -> str:
    """Our metrics are fractions in [0, 1]; tables print percent like the paper."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.1f}"


def _paper(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _lookup(records: list[dict], task: str, model: str, variant: str = "") -> dict | None:
    for r in records:
        if r["task"] == task and r["model"] == model and r.get("variant", "") == variant:
            return r
    return None


def _cell(rec: dict | None, keys: tuple[str, ...]) -> str:
    """'value [low, high]' per key (percent, 95% bootstrap interval), joined by ' / '."""
    if rec is None:
        return "not run"
    if rec["status"] != "ok":
        return rec["status"]
    ci = rec.get("ci95") or {}
    return " / ".join(f"{_pct(rec['metrics'].get(k))} {_ci_text(ci.get(k))}".rstrip() for k in keys)


def _table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()

    return "\n".join([title, line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def format_tables(records: list[dict], fraction: str, weights: Pretrained, data_root: str) -> str:
    """Tables shaped like the paper's 1, 2, 4 and 3: our checkpoint and our random init next to the
    paper's G2D (and Random Init) numbers, in percent."""
    ours = f"ours: {Path(weights.source).name if weights.kind != 'random' else 'random'}"
    out = [
        f"'ours' columns: measured here on DATA={data_root} (synthetic shards unless DATA points at the real "
        f"datasets), fraction {fraction}, as value [95% bootstrap interval]. 'paper' columns: the G2D paper's "
        "numbers on the REAL datasets, for orientation only: not comparable to synthetic-data results. Percent; "
        "paper '-' = below 1% or not reported.",
        "",
    ]
    head = ("task", "metric", ours, "ours: random init", f"paper G2D ({fraction})", f"paper Random Init ({fraction})")

    rows = []
    for (task, variant), paper in TABLE1_G2D.items():
        keys = ("map_mgca", "map_all_images") if "detection" in task else ("dice",)
        metric = "mAP (MGCA rule / all images)" if "detection" in task else "Dice"
        has_random = (task, variant) in TABLE1_RANDOM
        rows.append(
            (
                f"{task} ({variant})" if variant else task,
                metric,
                _cell(_lookup(records, task, "checkpoint", variant), keys),
                _cell(_lookup(records, task, "random", variant), keys) if has_random else "",
                _paper(paper[fraction]),
                _paper(TABLE1_RANDOM[(task, variant)][fraction]) if has_random else "",
            )
        )
    out += [_table("Table 1: segmentation (Dice) and detection (mAP)", head, rows), ""]

    rows = []
    for task, paper in TABLE2_G2D.items():
        keys = ("pointing", "iou", "dice") if task.startswith("grounding") else ("auc", "f1", "acc")
        metric = "pointing/IoU/Dice" if task.startswith("grounding") else "AUC/F1/ACC"
        rows.append(
            (
                task,
                metric,
                _cell(_lookup(records, task, "checkpoint"), keys),
                _cell(_lookup(records, task, "random"), keys),
                "/".join(_paper(paper[k]) for k in keys),
            )
        )
    out += [
        _table(
            "Table 2: zero-shot grounding (a) and classification (b) (no training data involved)",
            (*head[:4], "paper G2D"),
            rows,
        ),
        "",
    ]

    rows = []
    for table_g2d, table_random in ((TABLE4_G2D, TABLE4_RANDOM), (TABLE3_G2D, TABLE3_RANDOM)):
        for (task, _), paper in table_g2d.items():
            key = "accuracy" if task == "covidx_linear" else "auroc"
            rows.append(
                (
                    task,
                    "ACC" if key == "accuracy" else "AUC",
                    _cell(_lookup(records, task, "checkpoint"), (key,)),
                    _cell(_lookup(records, task, "random"), (key,)),
                    _paper(paper[fraction]),
                    _paper(table_random[(task, "")][fraction]),
                )
            )
    out += [_table("Table 4: linear classification / Table 3: ChestX-ray14 fine-tuning (mean AUC)", head, rows), ""]

    per_class = {label: _lookup(records, "chestxray14_finetune", label) for label in ("checkpoint", "random")}
    rows = []
    for name, paper in TABLE3_G2D_PER_CLASS[fraction].items():
        cells = []
        for rec in per_class.values():
            ok = rec is not None and rec["status"] == "ok"
            cells.append(_pct(rec["metrics"]["auroc_per_class"].get(name)) if ok else "")
        rows.append((name, "AUC", *cells, _paper(paper)))
    out += [
        _table("Table 3, per class (ChestX-ray14 fine-tuning)", ("label", *head[1:4], f"paper G2D ({fraction})"), rows)
    ]
    return "\n".join(out)
