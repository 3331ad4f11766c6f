"""`make bench-train`: steps/s and img/s of the training step, ours vs the official G2D recipe.

Both arms run the same model and the same `train.step.TrainStep`; they differ only in the settings
the official code uses:
    ours      bf16 autocast on GPU (fp32 on CPU, where bf16 autocast is emulated), fused AdamW,
              channels_last, text padded per batch, frozen BERT prefix (embeddings + first N
              layers) run without autograd, DDP find_unused_parameters=False
    official  fp16 autocast + GradScaler (fp32 on CPU), plain (for-loop) AdamW, NCHW, text padded to 256 tokens,
              embeddings trained (autograd through every frozen layer), DDP find_unused_parameters=True
Lever arms (`--arms`) are "ours" plus one change each: compile (torch.compile of the image tower,
BERT layers and PA loss), graphs (compile + CUDA graphs + text lengths bucketed to 16; CUDA only),
bucket16, eager_attn (BERT attention without SDPA, to see what SDPA pays), and the CPU precision levers
bf16 (bf16 autocast: oneDNN's AMX / AVX512-BF16 kernels where the CPU has them), nchw and bf16_nchw
(each without channels_last). Every arm reports model
FLOPs per sample (FlopCounterMode, once), MFU against the device's peak (train/flops.py) and, on a
GPU, peak memory per sample; `--max-batch` finds the largest batch per GPU that fits (binary search
over OOMs, CUDA only) and `--profile` saves a torch.profiler summary of one step of "ours".
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

from bench.perfdoc import update_section
from common.cli import UserError, run_main
from common.dist import DistInfo
from common.io import atomic_open, atomic_write_json
from model.export import unwrap
from model.registry import build_model, model_config
from model.text import build_tiny_text_model, load_tokenizer
from pipeline import build_loader
from pipeline.config import DataConfig
from pipeline.reports import shard_texts
from shards.schema import read_manifest
from train.flops import count_step_flops, mfu, peak_flops
from train.optim import OptimConfig, build_optimizer
from train.step import TrainStep, compile_for_speed, make_scaler

RESULTS = {"cpu": Path("bench/results/train.json"), "cuda": Path("bench/results/train_gpu.json")}
SECTION = {"cpu": "Training step", "cuda": "Training step on a GPU"}


# Each lever arm is "ours" with these settings changed (one lever, or one combination, per arm).
LEVER_ARMS = {
    "compile": {"compile": True},
    "graphs": {"compile": True, "cuda_graphs": True, "pad_multiple": 16},  # static shapes for replay
    "bucket16": {"pad_multiple": 16},
    "eager_attn": {"attn": "eager"},
    # CPU precision levers (on a GPU "ours" is bf16 already): bf16 autocast, and each without channels_last.
    "bf16": {"precision": "bf16"},
    "nchw": {"channels_last": False},
    "bf16_nchw": {"precision": "bf16", "channels_last": False},
}
ARMS = ("ours", "official", *LEVER_ARMS)


def arm_settings(arm: str, device: torch.device) -> dict:
    if arm == "ours" or arm in LEVER_ARMS:
        ours = {
            "precision": "bf16" if device.type == "cuda" else "fp32",
            "fused": True,
            "channels_last": True,
            "pad": "longest",
            "pad_multiple": 8,
            "freeze_embeddings": True,
            "find_unused": False,
            "attn": "sdpa",
            "compile": False,
            "cuda_graphs": False,
        }
        return {**ours, **LEVER_ARMS.get(arm, {})}
    if arm != "official":
        raise ValueError(f"unknown arm {arm!r}; choose from {ARMS}")
    # On a CPU, fp16 autocast is emulated and would exaggerate the gap: both arms run fp32 there.
    # Eager BERT attention: the transformers of G2D's code had no SDPA path for BERT.
    return {
        "precision": "fp16" if device.type == "cuda" else "fp32",
        "fused": False,
        "channels_last": False,
        "pad": "max_length",
        "pad_multiple": 1,
        "freeze_embeddings": False,
        "find_unused": True,
        "attn": "eager",
        "compile": False,
        "cuda_graphs": False,
    }


def make_step(model_name: str, text_model: str, arm: str, device: torch.device, image_size: int = 0):
    s = arm_settings(arm, device)
    # G2D's max_length of 256 for both arms: ours pads each batch to its longest report instead.
    cfg = model_config(
        model_name,
        **({"image_size": image_size} if image_size else {}),
        text_model=text_model,
        text_freeze_embeddings=s["freeze_embeddings"],
        max_text_length=256,
        text_attn_implementation=s["attn"],
    )
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if s["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    # DDP in a 1-process group, so the official arm pays for find_unused_parameters' graph walk.
    model = DDP(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=s["find_unused"]
    )
    optim = build_optimizer(model, OptimConfig(fused=s["fused"], lr=1e-5))
    if not s["fused"]:  # the official recipe: torch.optim.AdamW defaults (no fused kernel)
        optim = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-8, foreach=False)
    scaler, fixed = make_scaler(device, s["precision"], skip_nonfinite=False)
    return TrainStep(model, optim, None, scaler, fixed, s["precision"], 0.0, s["channels_last"]), cfg, s


def synthetic_batch(cfg, tokenizer, texts: list[str], batch_size: int, pad: str, device, pad_multiple: int = 1):
    from pipeline import Batch

    texts = (texts * (1 + batch_size // max(1, len(texts))))[:batch_size]
    tok = tokenizer(
        texts,
        truncation=True,
        max_length=cfg.max_text_length,
        padding=pad,
        pad_to_multiple_of=pad_multiple if pad_multiple > 1 else None,
        return_tensors="pt",
    )
    image = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    return Batch(
        image=image,
        input_ids=tok["input_ids"].to(device),
        attention_mask=tok["attention_mask"].to(device),
        keys=[""] * batch_size,
        meta=[{}] * batch_size,
        texts=texts[:batch_size],
    )


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


def prepare_arm(
    model_name: str,
    text_model: str,
    arm: str,
    batch_size: int,
    device,
    tokenizer,
    texts,
    compile_backend: str = "inductor",
    image_size: int = 0,
):
    """-> (step, cfg, settings, the fixed synthetic batch, FLOPs per sample, compile note). FLOPs are
    counted on the plain model before it is compiled (FlopCounterMode does not see inside compiled code)."""
    step_fn, cfg, s = make_step(model_name, text_model, arm, device, image_size)
    fixed = synthetic_batch(cfg, tokenizer, texts, batch_size, s["pad"], device, s["pad_multiple"])
    flops = count_step_flops(unwrap(step_fn.model), fixed, 1000, step_fn.autocast, s["channels_last"]) / batch_size
    step_fn.cuda_graphs, note = compile_for_speed(
        step_fn.model, s["compile"], s["cuda_graphs"], device, compile_backend
    )
    return step_fn, cfg, s, fixed, flops, note


def bench_model(
    model_name: str,
    text_model: str,
    batch_size: int,
    shards: str | None,
    n_steps: int,
    device: torch.device,
    texts: list[str],
    arms=("ours", "official"),
    compile_backend: str = "inductor",
    on_arm=None,
    image_size: int = 0,
) -> dict:
    """One model at one batch size, every arm. `on_arm(result so far)` after each arm: the caller
    saves partial results, so a time limit that cuts a slow (compiling) arm keeps the earlier ones."""
    tokenizer = load_tokenizer(text_model)
    result = {"model": model_name, "batch_size": batch_size, "device": str(device)}
    for arm in arms:
        s = arm_settings(arm, device)
        if s["cuda_graphs"] and device.type != "cuda":
            result[arm] = {"settings": s, "skipped": "CUDA graphs need a CUDA device"}
            continue
        step_fn, cfg, s, fixed, flops, note = prepare_arm(
            model_name, text_model, arm, batch_size, device, tokenizer, texts, compile_backend, image_size
        )
        peak, peak_source = peak_flops(device, s["precision"])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sec = time_steps(step_fn, lambda f=fixed: iter(lambda: f, None), n_steps, 2, device)
        row = {
            "settings": s,
            "data_excluded": {
                "steps_per_s": 1 / sec,
                "img_per_s": batch_size / sec,
                "mfu": mfu(flops, batch_size / sec, peak),
            },
            "gflops_per_sample": flops / 1e9,
            "image_size": cfg.image_size,
            "text_length": fixed.input_ids.shape[1],
            "peak_tflops": peak / 1e12 if peak else None,
            "peak_source": peak_source,
            # Peak allocated bytes (weights, optimiser state and activations) / batch; CUDA only:
            # a CPU process's max RSS says nothing per arm.
            "peak_mem_mb_per_sample": (
                torch.cuda.max_memory_allocated(device) / 2**20 / batch_size if device.type == "cuda" else None
            ),
        }
        if note:
            row["compile"] = note
        if shards:
            data_cfg = DataConfig(
                shards=shards,
                batch_size_per_gpu=batch_size,
                transform="g2d_train",
                image_size=cfg.image_size,
                max_text_length=cfg.max_text_length,
                text_padding=s["pad"],
                text_pad_multiple=s["pad_multiple"],
                num_workers=min(8, len(os.sched_getaffinity(0))),
            )
            dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
            loader = build_loader(data_cfg, "train", dist, tokenizer=tokenizer)

            def endless(loader=loader):
                epoch = 0
                while True:
                    loader.set_epoch(epoch)
                    yield from loader
                    epoch += 1

            # Windows of ~2 epochs (capped at 40 steps), so each includes its share of epoch startups
            # (DALI pipeline build / worker forks) instead of landing between two of them.
            steps = min(40, max(n_steps, 2 * len(loader)))
            sec = time_steps(step_fn, endless, steps, 2, device)
            row["data_included"] = {
                "steps_per_s": 1 / sec,
                "img_per_s": batch_size / sec,
                "window_steps": steps,
                "batches_per_epoch": len(loader),
                "backend": loader.backend,
                "mfu": mfu(flops, batch_size / sec, peak),
                # the loader's whole cost, epoch boundaries included (goal >= 0.97)
                "vs_data_excluded": (batch_size / sec) / row["data_excluded"]["img_per_s"],
                "load_avg_1min": round(os.getloadavg()[0], 2),
            }
            loader.close()  # its persistent workers, before the next arm starts its own
        result[arm] = row
        if on_arm is not None:
            on_arm(result)
        step_fn = fixed = None  # free this arm's model and batch before the next arm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for key in ("data_excluded", "data_included"):
        if "ours" in result and "official" in result and key in result["ours"] and key in result["official"]:
            result[f"speedup_{key}"] = result["ours"][key]["img_per_s"] / result["official"][key]["img_per_s"]
    return result


def fits(step_fn, cfg, s, tokenizer, texts, batch_size: int, device) -> bool:
    """Two optimiser steps at `batch_size` without running out of GPU memory?"""
    try:
        batch = synthetic_batch(cfg, tokenizer, texts, batch_size, s["pad"], device, s["pad_multiple"])
        for i in range(2):
            step_fn([batch], 1000 + i)
        sync(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        batch = None
        step_fn.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def search_max_batch(fits_fn, start: int, limit: int) -> tuple[int, int | None, list]:
    """Largest batch for which `fits_fn(batch)` holds: doubling from `start` to the first failure,
    then bisection to within ~6%, below `start` too if that fails (each probe costs two training
    steps). -> (largest that fits (0: none), smallest that failed (None: none up to `limit`),
    [(size, fits), ...])."""
    good, bad, probes = 0, None, []
    size = start
    while bad is None and size <= limit:
        ok = fits_fn(size)
        probes.append((size, ok))
        good, bad, size = (size, None, size * 2) if ok else (good, size, size)
    while bad is not None and bad - good > max(1, good // 16):
        mid = (good + bad) // 2
        ok = fits_fn(mid)
        probes.append((mid, ok))
        good, bad = (mid, bad) if ok else (good, mid)
    return good, bad, probes


def max_batch(
    model_name: str, text_model: str, arm: str, device, texts: list[str], start: int = 64, limit: int = 8192
) -> dict:
    """Largest batch per GPU that trains (`search_max_batch` over out-of-memory errors).
    CUDA only: a CPU has no fixed memory budget to search against."""
    if device.type != "cuda":
        return {"arm": arm, "max_batch": None, "note": "n/a: CUDA only"}
    tokenizer = load_tokenizer(text_model)
    step_fn, cfg, s = make_step(model_name, text_model, arm, device)
    good, bad, probes = search_max_batch(lambda b: fits(step_fn, cfg, s, tokenizer, texts, b, device), start, limit)
    return {
        "arm": arm,
        "max_batch": good,
        "first_oom": bad,
        "probes": probes,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30,
    }


def profile_step(step_fn, batch, device, out_stem: Path, rows: int = 25) -> dict:
    """torch.profiler over one step (after 3 warm-up steps): top ops by self time and, on a GPU, the
    time the GPU sat idle inside the step (CPU launch gaps). Writes <out_stem>.txt and .json."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(3):
        step_fn([batch], 1000 + i)
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        step_fn([batch], 1003)
        sync(device)
    wall_us = (time.perf_counter() - t0) * 1e6
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    top = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:rows]
    summary = {
        "device": str(device),
        "step_wall_ms": wall_us / 1e3,
        "sort": key,
        "top_ops": [{"name": e.key, "self_ms": getattr(e, key) / 1e3, "calls": e.count} for e in top],
    }
    if device.type == "cuda":
        # Union of kernel intervals vs the step's span: what is left is the GPU waiting for the CPU.
        spans = sorted(
            (e.time_range.start, e.time_range.end)
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA
        )
        busy, end = 0.0, None
        for a, b in spans:
            if end is None or a > end:
                busy, end = busy + (b - a), b
            elif b > end:
                busy, end = busy + (b - end), b
        first, last = (spans[0][0], max(b for _, b in spans)) if spans else (0, 0)
        summary.update(
            kernels=len(spans),
            gpu_busy_ms=busy / 1e3,
            gpu_span_ms=(last - first) / 1e3,
            gpu_idle_in_span_ms=((last - first) - busy) / 1e3,
        )
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_stem.with_suffix(".json"), summary)
    with atomic_open(out_stem.with_suffix(".txt"), "w") as fh:
        fh.write(averages.table(sort_by=key, row_limit=rows))
    return summary


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, tuple[str, ...]]:
    """The options and the checked `--arms` list."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="data/shards/mimic")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tiny-batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=0, help="input side (0: each model's own; multiple of 32)")
    parser.add_argument("--batch-sizes", default="64,128", help="g2d_resnet50 batches (CUDA only)")
    parser.add_argument("--models", default="auto", help="auto (g2d_tiny; + g2d_resnet50 on CUDA) or a comma list")
    parser.add_argument("--arms", default="ours,official", help=f"comma list of {', '.join(ARMS)}")
    parser.add_argument("--max-batch", action="store_true", help="find the largest batch per GPU (CUDA only)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler summary of one step of 'ours'")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile arms")
    parser.add_argument("--results-dir", default=None, help="where the JSON goes (default bench/results)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/performance.md")
    args = parser.parse_args(argv)
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise UserError(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    return args, arms


def bench_texts(shards_arg: str) -> tuple[str | None, list[str]]:
    """The packed shards (None when absent: data-included timings are skipped) and 256 report texts."""
    shards = shards_arg if Path(shards_arg, "manifest.json").is_file() else None
    if shards:
        read_manifest(shards)
        texts = shard_texts(shards)
    else:
        print(f"[bench-train] no shards at {shards_arg}: data-included timings skipped (run `make shards`)")
        texts = ["No acute cardiopulmonary process. Heart size is normal. Lungs are clear."] * 256
    return shards, (texts * (1 + 256 // max(1, len(texts))))[:256]


def text_towers(tmp: str, texts: list[str]) -> dict:
    """Per model name, a builder of its text tower (built only for the models benchmarked)."""
    return {
        "g2d_tiny": lambda: str(build_tiny_text_model(Path(tmp) / "tiny_bert", texts)),
        # The real model: a ClinicalBERT-sized text tower (12 layers, 768 wide) with random
        # weights stands in for Bio_ClinicalBERT (no hub access); the FLOPs are the same.
        "g2d_resnet50": lambda: str(
            build_tiny_text_model(Path(tmp) / "bert_base", texts, hidden=768, layers=12, heads=12, vocab_size=28996)
        ),
    }


def run_models(args, models, berts: dict, arms, shards, texts, device, results: Path) -> tuple[list, tuple | None]:
    """Every model x batch size through every arm (results.json rewritten after each arm, marked
    partial); also returns (model, text tower, last batch size) of the last model for the extras."""
    runs, last = [], None
    for name in models:
        if name not in berts:
            raise UserError(f"--models: {name!r} is not one of {sorted(berts)}")
        bert = berts[name]()
        sizes = [args.tiny_batch] if name == "g2d_tiny" else [int(b) for b in args.batch_sizes.split(",")]
        for bs in sizes:

            def save(partial: dict) -> None:
                atomic_write_json(results, {"runs": [*runs, partial], "partial": True})

            runs.append(
                bench_model(
                    name,
                    bert,
                    bs,
                    shards,
                    args.steps,
                    device,
                    texts,
                    arms,
                    args.compile_backend,
                    on_arm=save,
                    image_size=args.image_size,
                )
            )
            print(
                f"[bench-train] {name} batch {bs}: "
                + ", ".join(
                    f"{a} {runs[-1][a]['data_excluded']['img_per_s']:.1f} img/s"
                    for a in arms
                    if "data_excluded" in runs[-1][a]
                ),
                flush=True,
            )
        last = (name, bert, sizes[-1])
    return runs, last


def extras(args, last: tuple | None, device, texts: list[str], results_dir: Path) -> dict:
    """`--max-batch` and `--profile`, on the last model benchmarked."""
    extra = {}
    if args.max_batch and last:
        extra["max_batch"] = max_batch(last[0], last[1], "ours", device, texts, start=last[2])
        print(f"[bench-train] max batch per GPU ({last[0]}, ours): {extra['max_batch']}")
    if args.profile and last:
        tokenizer = load_tokenizer(last[1])
        step_fn, _, _, fixed, _, _ = prepare_arm(last[0], last[1], "ours", last[2], device, tokenizer, texts)
        stem = results_dir / f"train_profile_{'gpu' if device.type == 'cuda' else 'cpu'}"
        summary = profile_step(step_fn, fixed, device, stem)
        extra["profile"] = {
            "model": last[0],
            "batch_size": last[2],
            "files": [str(stem) + ".json", str(stem) + ".txt"],
            **{k: v for k, v in summary.items() if k != "top_ops"},
            "top_ops": summary["top_ops"][:10],
        }
        print(f"[bench-train] profile of one step: {stem}.txt")
    return extra


def results_table(runs: list[dict], arms: tuple[str, ...]) -> str:
    """Markdown: one row per model x batch x arm, + the speedup row of ours vs official."""
    lines = [
        "| model | batch | device | arm | data excluded img/s | MFU | data included img/s | peak MiB/sample |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        for arm in arms:
            row = r[arm]
            if "skipped" in row:
                lines.append(f"| {r['model']} | {r['batch_size']} | {r['device']} | {arm} | {row['skipped']} | | | |")
                continue
            inc = row.get("data_included", {}).get("img_per_s")
            m = row["data_excluded"]["mfu"]
            mem = row["peak_mem_mb_per_sample"]
            lines.append(
                f"| {r['model']} | {r['batch_size']} | {r['device']} | {arm} | "
                f"{row['data_excluded']['img_per_s']:.1f} | {f'{100 * m:.1f}%' if m is not None else 'n/a'} | "
                f"{f'{inc:.1f}' if inc else 'n/a'} | {f'{mem:.1f}' if mem is not None else 'n/a'} |"
            )
        if "speedup_data_excluded" in r:
            included = r.get("speedup_data_included")
            included = f"**{included:.2f}x**" if included is not None else "n/a"
            lines.append(f"| | | | **speedup** | **{r['speedup_data_excluded']:.2f}x** | | {included} | |")
    return "\n".join(lines)


def doc_body(machine: dict, results: Path, table: str, runs: list[dict]) -> str:
    """docs/performance.md's training-step section: the machine, the table, how data was included."""
    body = (
        f"`make bench-train` on {machine['cpu_count']} CPU cores"
        f"{' + ' + machine['gpu'] if machine['gpu'] else ' (no GPU in this run)'}; "
        f"raw numbers in `{results}`.\n\n{table}\n"
    )
    included = [
        (r["model"], r["batch_size"], r["ours"]["data_included"]) for r in runs if "data_included" in r.get("ours", {})
    ]
    if included:
        body += (
            "\nData included: "
            + "; ".join(
                f"{m} batch {bs}: {d['backend']} backend, {d['batches_per_epoch']} "
                f"batches per epoch, timed windows of {d['window_steps']} steps"
                for m, bs, d in included
            )
            + " (every epoch's loader startup inside the windows).\n"
        )
    return body


def main(argv: list[str] | None = None) -> None:
    args, arms = parse_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    models = ["g2d_tiny", *(["g2d_resnet50"] if cuda else [])] if args.models == "auto" else args.models.split(",")
    tdist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    shards, texts = bench_texts(args.shards)
    results_dir = Path(args.results_dir) if args.results_dir else RESULTS[device.type].parent
    results = results_dir / RESULTS[device.type].name
    with tempfile.TemporaryDirectory() as tmp:
        berts = text_towers(tmp, texts)
        runs, last = run_models(args, models, berts, arms, shards, texts, device, results)
        extra = extras(args, last, device, texts, results_dir)
    tdist.destroy_process_group()
    machine = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }
    atomic_write_json(results, {"runs": runs, "machine": machine, **extra})
    table = results_table(runs, arms)
    print(table)
    if args.no_doc:
        return
    update_section(Path("docs/performance.md"), SECTION[device.type], doc_body(machine, results, table, runs))


if __name__ == "__main__":
    run_main(main)
