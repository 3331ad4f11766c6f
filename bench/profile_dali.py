"""Where does our DALI graph spend its time? Throughput of the graph cut after each stage.

bench-pipeline measures the whole DALI loader on an H200 (256-px shards) against plain libjpeg
decoding on 16 cores. This tool finds the stage that costs it: it builds the graph of
`pipeline/dali_backend.py` (g2d_train), fed by the backend's own external source (`_Feed`: checked
reads of the planned samples, per-sample parameters and warp matrices, looping over the plan), cut
after each stage, and times each cut in steady state (`--iters` iterations after `--warmup`). Each row
adds one stage to the previous:

    read         the feed alone: checked reads (tar headers, CRCs, json, text), drawn parameters,
                 warp matrices (the decoded size from the JPEG header); the jpg bytes as output
    decode       + fn.decoders.image (mixed = nvJPEG with a GPU, CPU otherwise), grey
    warp_const   + fn.warp_affine with one constant matrix (the GPU kernel alone)
    warp         the warp as ours: the feed's per-sample matrices
    jitter       + brightness / contrast about the image mean (fn.reductions.mean + arithmetic)
    normalise    + grey -> 3 channels + crop_mirror_normalize: our image output
    full         `dali_backend._build_pipeline` itself (adds the decoded-shape output)

Usage: python -m bench.profile_dali [--shards data/shards/mimic] [--device cuda|cpu] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from common.cli import run_main
from common.io import atomic_write_json
from pipeline.batch import BackendOptions
from pipeline.config import DataConfig
from pipeline.dali_backend import _build_pipeline, _Feed, _jitter, _normalise, _warp
from pipeline.plan import DatasetIndex, PlanArgs
from pipeline.transforms import build_spec

STAGES = ("read", "decode", "warp_const", "warp", "jitter", "normalise", "full")


class LoopingFeed(_Feed):
    """The backend's feed over one epoch's plan, started again at its end, so a cut runs any number
    of iterations; nothing is kept for unpacking."""

    def __call__(self, info):
        if self.next_batch >= len(self.plan):
            self.next_batch = 0
        out = super().__call__(info)
        self.fed.clear()
        return out


def build(stage: str, index: DatasetIndex, batch_size: int, threads: int, device_id: int | None, size: int):
    from nvidia.dali import Pipeline, fn, types

    spec = build_spec(DataConfig(shards=str(index.root), transform="g2d_train", image_size=size), "g2d_train")
    options = BackendOptions(
        spec=spec,
        seed=0,
        batch_size=batch_size,
        workers=threads,
        prefetch=2,
        keep_size=True,
        on_error="raise",
        load_masks=False,
        load_boxes=False,
        device=torch.device("cpu") if device_id is None else torch.device("cuda", device_id),
        gpu_decode=device_id is not None,
    )
    feed = LoopingFeed(index, options, {})
    feed.start(
        PlanArgs(seed=0, rank=0, world_size=1, batch_size=batch_size, shuffle=True, drop_last=True).make(index, 0), 0
    )
    gpu = device_id is not None
    if stage == "full":
        return _build_pipeline(feed, spec, batch_size, threads, device_id, 2, 0, with_mask=False)
    level = STAGES.index(stage)
    pipe = Pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id, prefetch_queue_depth=2, seed=0)
    with pipe:
        params = dict(
            zip(feed.names, fn.external_source(source=feed, num_outputs=len(feed.names), batch=True, batch_info=True))
        )
        jpg = params["jpg"]
        outputs = [jpg]
        if level >= STAGES.index("decode"):
            img = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.GRAY)
            outputs = [img]
        if level == STAGES.index("warp_const"):
            outputs = [_warp(img, [1.1, 0.1, 2.0, -0.1, 1.1, 3.0], spec, types.INTERP_LINEAR)]
        if level >= STAGES.index("warp"):
            img = _warp(img, params["matrix"], spec, types.INTERP_LINEAR)
            outputs = [img]
        if level >= STAGES.index("jitter"):
            img = _jitter(img, params["brightness"], params["contrast"], gpu)
            outputs = [img]
        if level >= STAGES.index("normalise"):
            img = _normalise(img, spec)
            outputs = [img]
        pipe.set_outputs(*outputs)
    pipe.build()
    return pipe


def time_stage(
    stage: str,
    index: DatasetIndex,
    batch_size: int,
    threads: int,
    device_id: int | None,
    size: int,
    warmup: int,
    iters: int,
) -> dict:
    t0 = time.perf_counter()
    pipe = build(stage, index, batch_size, threads, device_id, size)
    build_s = time.perf_counter() - t0
    for _ in range(warmup):
        pipe.run()
    t0 = time.perf_counter()
    for _ in range(iters):
        out = pipe.run()
    if device_id is not None:
        out[0].as_cpu()  # the last batch's data are on the host: every queued iteration finished
    seconds = time.perf_counter() - t0
    del pipe
    return {"img_per_s": round(iters * batch_size / seconds, 1), "build_s": round(build_s, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=Path("data/shards/mimic"))
    parser.add_argument("--split", default="train")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device_id = 0 if cuda else None
    index = DatasetIndex(args.shards, args.split)
    rows = {}
    for stage in args.stages:
        rows[stage] = time_stage(
            stage, index, args.batch_size, args.threads, device_id, args.image_size, args.warmup, args.iters
        )
        print(f"{stage:>10}: {rows[stage]['img_per_s']:9.1f} img/s (build {rows[stage]['build_s']:.2f} s)", flush=True)
    result = {
        "stages": rows,
        "setup": {
            "shards": str(args.shards),
            "images": index.num_samples,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "device": "cuda" if cuda else "cpu",
            "iters": args.iters,
        },
        "machine": {
            "cpu_count": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
        },
    }
    if args.out:
        atomic_write_json(args.out, result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run_main(main)
