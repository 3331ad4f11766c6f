"""`make demo`: the whole job on the embedded synthetic MIMIC-format corpus, on CPU.

synthetic corpus -> shards (+ verify) -> tiny BERT -> pretrain g2d_tiny -> evaluate the trained model
AND the same model at random init, measured the same way: retrieval and zero-shot AUC on the
pretraining valid split, then small downstream tasks (zero-shot classification, grounding, a linear
probe, a segmentation) on synthetic RSNA/SIIM look-alikes -> tables + plot paths.
Every stage is idempotent: a rerun reuses the corpus, the shards, the tiny BERT (only when it was
built from these shards' reports: its recorded fingerprint) and a finished pretraining run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from common.cli import ArgumentParser, UserError, run_main
from common.config import config_to_dict
from common.dist import DistInfo, seed_everything
from common.io import atomic_write_json
from common.run_layout import CHECKPOINT_DIR, checkpoint_path, list_checkpoints
from eval.runner import run_all
from model.image import load_strict
from model.registry import build_model
from model.text import load_tokenizer
from shards.ensure import ensure_data, ensure_synthetic
from shards.mimic import SYNTHETIC_SAMPLES_PER_SHARD, PackOptions
from shards.writer import default_workers
from tools import make_tiny_bert, pack_shards, verify_shards
from train.checkpoint import load_checkpoint
from train.config import load_pretrain_config
from train.pretrain import train
from train.validate import validate

CONFIG = "configs/pretrain/demo.yaml"
DOWNSTREAM = "data/shards/downstream"
DEMO_TASKS = ["zeroshot_rsna", "zeroshot_siim", "grounding_rsna", "grounding_siim", "rsna_linear", "siim_segmentation"]
# Small versions of the tasks: the tiny model's resolution, a few epochs.
HEADLINES = {
    "zeroshot_rsna": ("auc", "f1"),
    "zeroshot_siim": ("auc", "f1"),
    "grounding_rsna": ("pointing", "pointing_cell", "iou", "dice"),
    "grounding_siim": ("pointing", "pointing_cell", "iou", "dice"),
    "rsna_linear": ("auroc",),
    "siim_segmentation": ("dice", "dice_positive"),
}
DEMO_EVAL_ARGS = [
    "data.image_size=128",
    "data.crop_size=128",
    "train.epochs=8",
    "train.patience=4",
    "data.num_workers=0",
]


def stage(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def pretraining_metrics(cfg, dist: DistInfo, checkpoint: Path | None) -> dict:
    """Validation metrics of the g2d_tiny model: trained weights from `checkpoint`, or random init."""
    seed_everything(cfg.train.seed)
    model = build_model(cfg.resolved_model).to(dist.device)
    if checkpoint is not None:
        load_strict(model, load_checkpoint(checkpoint)["model"], str(checkpoint), "g2d_tiny model of the demo config")
    tokenizer = load_tokenizer(cfg.model.text_model)
    return validate(model, cfg, tokenizer, dist)


def downstream_table(records: list[dict]) -> str:
    """task | metric | random init | trained, from run_all's records: percent with the 95% bootstrap
    interval of each value (the test splits are small: an interval that overlaps the other column's
    value is no difference at all)."""

    def cell(task, model, variant, key):
        rec = next((r for r in records if (r["task"], r["model"], r["variant"]) == (task, model, variant)), None)
        if rec is None or rec["status"] != "ok":
            return "-" if rec is None else rec["status"]
        value, ci = rec["metrics"].get(key), (rec.get("ci95") or {}).get(key)
        text = "nan" if value is None else f"{100 * value:.1f}"
        return f"{text} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else text

    rows = [f"{'task':<32} {'metric':<14} {'random init':>20} {'G2D trained':>20}"]
    for task, keys in HEADLINES.items():
        variants = ["encoder", "encoder_decoder"] if task.endswith("segmentation") else [""]
        for v in variants:
            name = f"{task} ({v})" if v else task
            for key in keys:
                random_cell = cell(task, "random", v, key) if v != "encoder_decoder" else "-"
                rows.append(f"{name:<32} {key:<14} {random_cell:>20} {cell(task, 'checkpoint', v, key):>20}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=800, help="synthetic studies to render")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "overrides",
        nargs="*",
        help="pretraining overrides, e.g. train.epochs=2, or the Table 5a ablation: "
        "model.pa_weight=0 train.output_dir=runs/demo/pretrain_no_pa",
    )
    args = parser.parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(max(1, args.workers))

    cfg = load_pretrain_config(CONFIG, args.overrides)
    shards = cfg.data.shards
    stage("1/6 synthetic MIMIC-CXR-JPG corpus -> WebDataset shards")
    corpus = ensure_synthetic(Path("data/synthetic_mimic_demo"), args.studies, 512, 0, args.workers)
    options = PackOptions(
        max_side=256, quality=95, samples_per_shard=SYNTHETIC_SAMPLES_PER_SHARD, workers=args.workers, seed=0
    )
    pack_shards.pack(corpus, Path(shards), options)
    stage("2/6 verify shards")
    if verify_shards.verify(shards, default_workers()):
        raise SystemExit("shard verification failed")
    stage("3/6 tiny BERT + WordPiece tokenizer from the training reports")
    # Reused only when built from these very reports (its recorded fingerprint), else rebuilt.
    _, rebuilt = make_tiny_bert.ensure(shards, cfg.model.text_model)

    stage("4/6 pretrain g2d_tiny (G2D: VLA + pseudo-segmentation)")
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    out_dir = Path(cfg.train.output_dir)
    if rebuilt and list_checkpoints(out_dir / CHECKPOINT_DIR):
        # Its checkpoints hold the old BERT's weights, which the new tokenizer's ids no longer fit.
        raise UserError(
            f"{out_dir} holds a pretraining run made with the previous {cfg.model.text_model}; move it away "
            "(or give train.output_dir=<new folder>) to pretrain with the rebuilt one"
        )
    checkpoint = checkpoint_path(out_dir, train(cfg, dist)["step"])  # this run's own last checkpoint

    stage("5/6 evaluate: trained vs random init (valid split, same code path)")
    trained = pretraining_metrics(cfg, dist, checkpoint)
    random_init = pretraining_metrics(cfg, dist, None)
    keys = [k for k in trained if k != "num_samples"]
    rows = [f"{'metric':<28} {'random init':>12} {'G2D trained':>12}"]
    for k in keys:
        rows.append(f"{k:<28} {random_init.get(k, float('nan')):>12.3f} {trained[k]:>12.3f}")
    n = trained["num_samples"]
    table = "\n".join(rows)
    print(
        f"\nPretraining on the synthetic corpus, evaluated on {n} valid images "
        f"(retrieval chance level: top1 {1 / n:.3f}, top5 {min(1.0, 5 / n):.3f}; AUC chance 0.5)"
    )
    print(table)

    stage("6/6 downstream tasks on synthetic RSNA / SIIM: trained vs random init")
    ensure_data(DOWNSTREAM, ["rsna_pneumonia", "siim_pneumothorax"])
    eval_root = out_dir.parent / f"eval_{out_dir.name}"
    downstream = run_all(
        ckpt=str(checkpoint),
        fraction="1.0",
        data_root=DOWNSTREAM,
        overrides=DEMO_EVAL_ARGS,
        output_root=str(eval_root),
        tasks=DEMO_TASKS,
    )
    print("\nDownstream tasks on synthetic RSNA/SIIM (percent [95% bootstrap interval]; small test splits):")
    print(downstream_table(downstream["records"]))
    plots = sorted((out_dir / "plots").glob("*.png"))
    summary = {
        "config": config_to_dict(cfg),
        "checkpoint": str(checkpoint),
        "trained": trained,
        "random_init": random_init,
        "plots": [str(p) for p in plots],
        "downstream": downstream["summary_path"],
        "exports": [str(out_dir / "g2d_encoder.pth"), str(out_dir / "g2d_encoder_decoder.pth")],
        "seconds": time.time() - t_start,
    }
    atomic_write_json(out_dir / "demo_summary.json", summary)
    steps_png = [p for p in plots if p.name.startswith("step_")]
    print("\nattention / pseudo-mask plots:", *(f"  {p}" for p in steps_png[-3:]), sep="\n")
    print(f"loss curves (each term + lr vs step): {out_dir / 'plots' / 'loss_curves.png'}")
    print(f"downstream results (per task results.json + PNGs): {eval_root}/; tables: {downstream['summary_path']}")
    print(f"metrics log: {out_dir / 'metrics.jsonl'}; summary: {out_dir / 'demo_summary.json'}")
    print(f"exports: {summary['exports'][0]}, {summary['exports'][1]}")
    print(f"demo finished in {summary['seconds'] / 60:.1f} min")
    print(json.dumps({"top1_trained": trained.get("retrieval_top1"), "top1_random": random_init.get("retrieval_top1")}))


if __name__ == "__main__":
    run_main(main)
