"""`make bench-train`: steps/s and img/s of the training step, ours vs the official G2D recipe.

Both arms run the same model and the same `train.step.TrainStep`; they differ only in the settings
the official code uses:
    ours      bf16 autocast on GPU (fp32 on CPU, where bf16 autocast is emulated), fused AdamW,
              channels_last, text padded per batch, frozen BERT prefix (embeddings + first N
              layers) run without autograd, DDP find_unused_parameters=False
    official  fp16 autocast + GradScaler (fp32 on CPU), plain (for-loop) AdamW, NCHW, text padded to 256 tokens,
              embeddings trained (autograd through every frozen layer), DDP find_unused_parameters=True
"Data excluded" feeds one pre-built batch again and again; "data included" reads the packed shards
through `pipeline.build_loader` (the packed synthetic corpus, `make shards`) in windows of ~2 epochs,
so every epoch's loader startup is counted (a toy corpus has few batches per epoch to amortise it).
Results: bench/results/train.json and the "## Training step" section of docs/performance.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP

from common.dist import DistInfo
from common.io import atomic_write_json
from model.registry import build_model, model_config
from model.text import build_tiny_text_model, load_tokenizer
from pipeline import build_loader
from pipeline.config import DataConfig
from shards.schema import read_manifest
from tools.make_tiny_bert import shard_texts
from tools.perfdoc import update_section
from train.optim import OptimConfig, build_optimizer
from train.step import TrainStep, make_scaler

RESULTS = {"cpu": Path("bench/results/train.json"), "cuda": Path("bench/results/train_gpu.json")}
SECTION = {"cpu": "Training step", "cuda": "Training step on a GPU"}


def arm_settings(arm: str, device: torch.device) -> dict:
    if arm == "ours":
        return {"precision": "bf16" if device.type == "cuda" else "fp32", "fused": True,
                "channels_last": True, "pad": "longest", "freeze_embeddings": True, "find_unused": False}
    # On a CPU, fp16 autocast is emulated and would exaggerate the gap: both arms run fp32 there.
    return {"precision": "fp16" if device.type == "cuda" else "fp32", "fused": False, "channels_last": False, "pad": "max_length",
            "freeze_embeddings": False, "find_unused": True}


def make_step(model_name: str, text_model: str, arm: str, device: torch.device):
    s = arm_settings(arm, device)
    # G2D's max_length of 256 for both arms: ours pads each batch to its longest report instead.
    cfg = model_config(model_name, text_model=text_model, text_freeze_embeddings=s["freeze_embeddings"],
                       max_text_length=256)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if s["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    # DDP in a 1-process group, so the official arm pays for find_unused_parameters' graph walk.
    model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=s["find_unused"])
    optim = build_optimizer(model, OptimConfig(fused=s["fused"], lr=1e-5))
    if not s["fused"]:  # the official recipe: torch.optim.AdamW defaults (no fused kernel)
        optim = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-8, foreach=False)
    scaler, fixed = make_scaler(device, s["precision"], skip_nonfinite=False)
    return TrainStep(model, optim, None, scaler, fixed, s["precision"], 0.0, s["channels_last"]), cfg, s


def synthetic_batch(cfg, tokenizer, texts: list[str], batch_size: int, pad: str, device):
    from pipeline import Batch

    tok = tokenizer(texts[:batch_size], truncation=True, max_length=cfg.max_text_length,
                    padding=pad, return_tensors="pt")
    image = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    return Batch(image=image, input_ids=tok["input_ids"].to(device),
                 attention_mask=tok["attention_mask"].to(device), keys=[""] * batch_size,
                 meta=[{}] * batch_size, texts=texts[:batch_size])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step_fn, batches, n_steps: int, warmup: int, device) -> float:
    """Seconds per step (median over 3 timed windows of n_steps, after warm-up)."""
    it = iter(batches())
    for i in range(warmup):
        step_fn([next(it)], 1000 + i)
    windows = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        for i in range(n_steps):
            step_fn([next(it)], 1000 + i)
        sync(device)
        windows.append((time.perf_counter() - t0) / n_steps)
    return statistics.median(windows)


def bench_model(model_name: str, text_model: str, batch_size: int, shards: str | None, n_steps: int,
                device: torch.device, texts: list[str]) -> dict:
    tokenizer = load_tokenizer(text_model)
    result = {"model": model_name, "batch_size": batch_size, "device": str(device)}
    for arm in ("ours", "official"):
        step_fn, cfg, s = make_step(model_name, text_model, arm, device)
        fixed = synthetic_batch(cfg, tokenizer, texts, batch_size, s["pad"], device)
        sec = time_steps(step_fn, lambda: iter(lambda: fixed, None), n_steps, 2, device)
        row = {"settings": s, "data_excluded": {"steps_per_s": 1 / sec, "img_per_s": batch_size / sec}}
        if shards:
            data_cfg = DataConfig(shards=shards, batch_size_per_gpu=batch_size, transform="g2d_train",
                                  image_size=cfg.image_size, max_text_length=cfg.max_text_length,
                                  text_padding=s["pad"], num_workers=min(8, len(os.sched_getaffinity(0))))
            dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
            loader = build_loader(data_cfg, "train", dist, tokenizer=tokenizer)

            def endless():
                epoch = 0
                while True:
                    loader.set_epoch(epoch)
                    yield from loader
                    epoch += 1
            # Windows of ~2 epochs (capped at 40 steps), so each includes its share of epoch startups
            # (DALI pipeline build / worker forks) instead of landing between two of them.
            steps = min(40, max(n_steps, 2 * len(loader)))
            sec = time_steps(step_fn, endless, steps, 2, device)
            row["data_included"] = {"steps_per_s": 1 / sec, "img_per_s": batch_size / sec, "window_steps": steps,
                                    "batches_per_epoch": len(loader), "backend": loader.backend}
        result[arm] = row
    for key in ("data_excluded", "data_included"):
        if key in result["ours"]:
            result[f"speedup_{key}"] = result["ours"][key]["img_per_s"] / result["official"][key]["img_per_s"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="data/shards/mimic")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tiny-batch", type=int, default=16)
    args = parser.parse_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    tdist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    shards = args.shards if Path(args.shards, "manifest.json").is_file() else None
    if shards:
        read_manifest(shards)
        texts = shard_texts(shards)
    else:
        print(f"[bench-train] no shards at {args.shards}: data-included timings skipped (run `make shards`)")
        texts = ["No acute cardiopulmonary process. Heart size is normal. Lungs are clear."] * 256
    texts = (texts * (1 + 256 // max(1, len(texts))))[:256]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny_bert = str(build_tiny_text_model(Path(tmp) / "tiny_bert", texts))
        runs.append(bench_model("g2d_tiny", tiny_bert, args.tiny_batch, shards, args.steps, device, texts))
        if cuda:
            # The real model: a ClinicalBERT-sized text tower (12 layers, 768 wide) with random weights
            # stands in for Bio_ClinicalBERT (no hub access); the FLOPs are the same.
            big_bert = str(build_tiny_text_model(Path(tmp) / "bert_base", texts, hidden=768, layers=12,
                                                 heads=12, vocab_size=28996))
            for bs in (64, 128):
                runs.append(bench_model("g2d_resnet50", big_bert, bs, shards, args.steps, device, texts))
    tdist.destroy_process_group()
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if cuda else None}
    results = RESULTS[device.type]
    atomic_write_json(results, {"runs": runs, "machine": machine})
    lines = ["| model | batch | device | arm | data excluded img/s | data included img/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        for arm in ("ours", "official"):
            inc = r[arm].get("data_included", {}).get("img_per_s")
            lines.append(f"| {r['model']} | {r['batch_size']} | {r['device']} | {arm} | "
                         f"{r[arm]['data_excluded']['img_per_s']:.1f} | {f'{inc:.1f}' if inc else 'n/a'} |")
        lines.append(f"| | | | **speedup** | **{r['speedup_data_excluded']:.2f}x** | "
                     f"{'**%.2fx**' % r['speedup_data_included'] if 'speedup_data_included' in r else 'n/a'} |")
    table = "\n".join(lines)
    print(table)
    body = (f"`make bench-train` on {machine['cpu_count']} CPU cores"
            f"{' + ' + machine['gpu'] if machine['gpu'] else ' (no GPU in this run)'}; "
            f"raw numbers in `{results}`.\n\n{table}\n")
    included = [(r["model"], r["batch_size"], r["ours"]["data_included"]) for r in runs if "data_included" in r["ours"]]
    if included:
        body += ("\nData included: " + "; ".join(f"{m} batch {bs}: {d['backend']} backend, {d['batches_per_epoch']} "
                                                f"batches per epoch, timed windows of {d['window_steps']} steps"
                                                for m, bs, d in included)
                 + " (every epoch's loader startup inside the windows).\n")
    update_section(Path("docs/performance.md"), SECTION[device.type], body)


if __name__ == "__main__":
    main()
