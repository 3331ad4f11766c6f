"""`make bench-pipeline [SHARDS=<dir>]`: image throughput of our loader vs the loaders it replaces.

Same samples, same worker count, 256-px output with G2D's training augmentations, images only (no
tokenisation: the baselines tokenise in the model), delivered where training consumes them: CPU
tensors without a GPU; with `--device cuda` every loader's batches end on the GPU (baselines: pinned
memory + non-blocking copy, as a training loop does). Each loader iterates whole epochs of the train
split (drop_last), `--epochs` per run, timed with each epoch's startup (DALI pipeline build / worker
forks happen every epoch in every loader, as in training) and, apart, at steady state (`Timing`);
medians of `--runs` interleaved runs.

    dali         our loader, DALI backend (nvJPEG "mixed" decode + GPU augmentation with CUDA,
                 all-CPU graph without)
    torch        our loader, torch backend (DataLoader workers: OpenCV decode + warp; colour +
                 normalise on the GPU with CUDA)
    dali_cpu     (CUDA only) DALI decoding on the CPU (data.dali_decode=cpu)
    torch_gpu_decode  (CUDA only) torch backend with torchvision.io.decode_jpeg(device="cuda")
    dali_graph   (diagnostic) our DALI graph alone, without the loader's unpacking thread
    g2d_npy      G2D's official loader: one (N, 256, 256) uint8 .npy memmap, PIL "RGB", torchvision
                 RandomAffine(15, shear=15) + ColorJitter(0.2, 0.2) + ToTensor + Normalize in workers
    mgca_files   MGCA's loader: one JPEG per sample at the original size, full decode, longer side to
                 256 + zero pad, RandomCrop(224), ToTensor, Normalize(0.5)
    raw_decode   the limit: libjpeg (PIL) full decode of the stored JPEGs, single process, x cores

The npy and the per-sample JPEGs are built from the same samples under --work-dir (MGCA files are the
synthetic corpus originals the shards were packed from when the manifest names them, else the
stored images upscaled to --mgca-size). Missing shards are packed first with `tools.pack_shards`
(`make shards` defaults). Writes bench/results/pipeline.json and the "Data pipeline" section of
docs/performance.md (with CUDA: pipeline_gpu.json, "Data pipeline on a GPU").
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import io
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from bench.perfdoc import update_section
from common.cli import run_main
from common.dist import DistInfo
from common.io import atomic_write_json, atomic_write_text
from common.machine import cpu_model
from pipeline import DataConfig, build_loader
from pipeline.batch import SampleReader, decode_meta, decode_text
from pipeline.dali_backend import dali_available
from pipeline.plan import DatasetIndex
from shards.ensure import ensure_synthetic
from shards.mimic import SYNTHETIC_SAMPLES_PER_SHARD, PackOptions
from tools.pack_shards import pack

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ---- baselines -----------------------------------------------------------------------------------


class G2DNpy(Dataset):
    """G2D's pretraining dataset, image side: npy row -> PIL RGB -> affine -> jitter -> tensor."""

    def __init__(self, path: Path):
        self.path = path
        self.images = None
        self.n = int(np.load(path, mmap_mode="r").shape[0])
        self.transform = T.Compose(
            [
                T.CenterCrop(256),
                T.RandomAffine(degrees=15, shear=15),
                T.ColorJitter(brightness=0.2, contrast=0.2),
                T.ToTensor(),
                T.Normalize(*IMAGENET),
            ]
        )

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.images is None:  # memmap opened per worker, as np.load(mmap_mode="r") in G2D
            self.images = np.load(self.path, mmap_mode="r")
        img = Image.fromarray(np.asarray(self.images[i])).convert("RGB")
        return self.transform(img)  # [3, 256, 256]


class MGCAFiles(Dataset):
    """MGCA's dataset, image side: full JPEG decode, longer side -> 256, zero pad, RandomCrop(224)."""

    def __init__(self, paths: list[Path], size: int = 256, crop: int = 224):
        self.paths, self.size = paths, size
        self.transform = T.Compose([T.RandomCrop(crop), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = Image.open(self.paths[i]).convert("L")
        w, h = img.size
        s = self.size / max(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
        canvas = Image.new("L", (self.size, self.size))
        canvas.paste(img, ((self.size - img.size[0]) // 2, (self.size - img.size[1]) // 2))
        return self.transform(canvas.convert("RGB"))  # [3, 224, 224]


# ---- inputs --------------------------------------------------------------------------------------


def ensure_shards(shards: Path, workers: int) -> None:
    if (shards / "manifest.json").is_file():
        return

    print(f"bench-pipeline: no shards at {shards}; packing the synthetic corpus (make shards defaults)")
    root = ensure_synthetic(Path("data/synthetic_mimic"), 400, 2048, 0, workers)
    pack(root, shards, PackOptions(samples_per_shard=SYNTHETIC_SAMPLES_PER_SHARD, workers=workers, seed=0))


def stored_samples(index: DatasetIndex) -> tuple[list[bytes], list[dict], list[str]]:
    reader = SampleReader(index)
    jpgs, metas, texts = [], [], []
    for gid in range(index.num_samples):
        m = reader.read(gid, ("jpg", "txt", "json"))
        jpgs.append(m["jpg"])
        metas.append(decode_meta(m["json"]))
        texts.append(decode_text(m["txt"]))
    reader.close()
    return jpgs, metas, texts


def build_npy(path: Path, jpgs: list[bytes]) -> None:
    """G2D's format: every image squashed to 256x256 uint8 in one array (from the stored images)."""
    if path.is_file() and np.load(path, mmap_mode="r").shape[0] == len(jpgs):
        return
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(jpgs), 256, 256))
    for i, data in enumerate(jpgs):
        arr[i] = np.asarray(Image.open(io.BytesIO(data)).convert("L").resize((256, 256), Image.Resampling.BILINEAR))
    arr.flush()
    del arr


def build_report_csv(path: Path, metas: list[dict], texts: list[str]) -> None:
    """The report table the npy (G2D) and the per-file JPEGs (MGCA) are read with: one row per image,
    the columns G2D's dataset and MGCA's master.csv use. Counted in their disk bytes, because our
    shards hold the reports too."""
    rows = [
        {
            "dicom_id": m.get("dicom_id", ""),
            "subject_id": m.get("subject_id", ""),
            "study_id": m.get("study_id", ""),
            "ViewPosition": m.get("view", ""),
            "impression": m.get("impression", t),
            "findings": m.get("findings", ""),
        }
        for m, t in zip(metas, texts)
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def build_mgca_files(
    out: Path, manifest: dict, jpgs: list[bytes], metas: list[dict], size: int
) -> tuple[list[Path], str]:
    """One JPEG per sample: the corpus originals if the manifest names a corpus that is present,
    otherwise the stored images upscaled to `size` (longer side)."""
    root = manifest.get("config", {}).get("root")
    if root:
        paths = [
            Path(root)
            / "files"
            / f"p{m['subject_id'][:2]}"
            / f"p{m['subject_id']}"
            / f"s{m['study_id']}"
            / f"{m['dicom_id']}.jpg"
            for m in metas
        ]
        if all(p.is_file() for p in paths):
            return paths, f"synthetic corpus originals ({root})"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(jpgs):
        path = out / f"{i:06d}.jpg"
        if not path.is_file():
            img = Image.open(io.BytesIO(data)).convert("L")
            s = size / max(img.size)
            img.resize((round(img.size[0] * s), round(img.size[1] * s)), Image.Resampling.BICUBIC).save(
                path, quality=95
            )
        paths.append(path)
    return paths, f"stored images upscaled to {size} px"


# ---- timing --------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time of this process (DALI threads included) and of its reaped children (loader workers,
    joined after every epoch): the load-independent cost, where wall time depends on other jobs."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timing:
    """One timed run. Per epoch: the startup (asking for the iterator until the first batch is in hand:
    DALI pipeline build, worker forks, first decodes) and the steady rate, counted only after the first
    `in_flight` batches - those a loader may have prepared concurrently during the startup (workers x
    prefetch for DataLoader workers, the queue depths for DALI). An epoch with no batch beyond those
    (a toy epoch, many workers) gives no steady rate: the loader never reached its steady state."""

    def __init__(self, device: torch.device, in_flight: int):
        self.device, self.in_flight = device, in_flight
        self.n, self.epochs, self.startup_s, self.steady_n, self.steady_s = 0, 0, 0.0, 0, 0.0
        self.t0, self.c0 = time.perf_counter(), cpu_seconds()

    def epoch(self, batches, since: float | None = None) -> None:
        start = time.perf_counter() if since is None else since
        mark = None
        for i, x in enumerate(batches):
            if i == 0:
                sync(self.device)
                self.startup_s += time.perf_counter() - start
            if i == self.in_flight:
                sync(self.device)
                mark = time.perf_counter()
            elif i > self.in_flight:
                self.steady_n += x.shape[0]
            self.n += x.shape[0]
        if mark is not None:
            sync(self.device)
            self.steady_s += time.perf_counter() - mark
        self.epochs += 1

    def done(self) -> dict:
        sync(self.device)
        wall, cpu = time.perf_counter() - self.t0, cpu_seconds() - self.c0
        return {
            "with_startup": self.n / wall,
            "steady": self.steady_n / self.steady_s if self.steady_n else None,
            "startup_s": self.startup_s / self.epochs,
            "cpu_ms": 1000 * cpu / self.n,
            "in_flight": self.in_flight,
        }


def bench_loader(
    backend: str,
    shards: Path,
    workers: int,
    batch: int,
    seed: int,
    device: torch.device,
    tokenizer=None,
    profile: bool = False,
    **data,
):
    """The loader every timing of ours runs: the train split of `shards` through g2d_train at 256 px,
    in one process (rank 0 of 1); `data`: further DataConfig fields of a variant."""
    cfg = DataConfig(
        shards=str(shards),
        backend=backend,
        batch_size_per_gpu=batch,
        num_workers=workers,
        transform="g2d_train",
        image_size=256,
        seed=seed,
        **data,
    )
    return build_loader(cfg, "train", DistInfo(rank=0, world_size=1, local_rank=0, device=device), tokenizer, profile)


def time_ours(
    backend: str, shards: Path, workers: int, batch: int, epochs: int, seed: int, device: torch.device, **data
) -> dict:
    loader = bench_loader(backend, shards, workers, batch, seed, device, **data)
    prefetch = loader.cfg.prefetch
    # DALI: its prefetch queue + the unpacking thread's queue; torch: every worker's prefetch.
    timing = Timing(device, 2 * prefetch if loader.backend == "dali" else max(1, workers) * prefetch)
    warm = None
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        timing.epoch(b.image for b in loader)
        if epoch == 0:
            warm = (live_cpu_seconds(loader), timing.n)
    steady_cpu = (live_cpu_seconds(loader) - warm[0], timing.n - warm[1])
    loader.close()  # workers joined, so that their CPU time is counted
    result = timing.done()
    # Per image once the workers run (epochs after the first): the one-off worker start of a run
    # (fork, imports: ~0.1 s per worker per training run) left out, as a MIMIC-sized run amortises it.
    result["cpu_ms_warm"] = 1000 * steady_cpu[0] / steady_cpu[1] if steady_cpu[1] else result["cpu_ms"]
    return result


def live_cpu_seconds(loader) -> float:
    """CPU seconds so far of this process (its threads: DALI, the unpacking thread) and of the
    loader's live worker processes (read from /proc: they are only reaped, and counted in
    RUSAGE_CHILDREN, when the loader closes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    iterator = getattr(getattr(loader._workers, "loader", None), "_iterator", None)
    for proc in getattr(iterator, "_workers", []):
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def time_dali_graph(shards: Path, workers: int, batch: int, epochs: int, seed: int, device: torch.device) -> dict:
    """Diagnostic: our DALI graph alone (the plugin iterator's outputs, on the GPU with CUDA), without
    the loader's unpacking of keys/text/labels and its prefetch thread: how much the graph gives."""
    from pipeline.dali_backend import DaliBatches

    loader = bench_loader("dali", shards, workers, batch, seed, device)
    run = DaliBatches(loader.index, dataclasses.replace(loader.options, on_error="raise"), None, {}, None)
    timing = Timing(device, loader.cfg.prefetch)
    for epoch in range(epochs):
        plan = loader.plan(epoch)
        t = time.perf_counter()
        run.feed.start(plan, 0)
        it = run._iterator()  # the graph and its feed, as the loader runs them, without unpacking
        run._open = True
        timing.epoch((out[0]["image"] for _, out in zip(range(len(plan)), it)), since=t)
        for _ in it:  # the feed's end of the pass
            pass
    run.close()
    return timing.done()


def time_dataloader(dataset: Dataset, workers: int, batch: int, epochs: int, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers, pin_memory=cuda)
    timing = Timing(device, max(1, workers) * (loader.prefetch_factor or 1))
    for _ in range(epochs):
        it = iter(loader)
        # [B, 3, 256, 256] where training would use it
        timing.epoch(x.to(device, non_blocking=cuda) for x in it)
        it._shutdown_workers()  # workers joined (and their CPU time counted) every epoch
    return timing.done()


def time_raw_decode(jpgs: list[bytes], repeats: int) -> float:
    """Images/s of one process doing PIL full decodes of the stored JPEGs."""
    t0 = time.perf_counter()
    for _ in range(repeats):
        for data in jpgs:
            Image.open(io.BytesIO(data)).load()
    return repeats * len(jpgs) / (time.perf_counter() - t0)


def du(paths) -> int:
    total = 0
    for p in paths:
        p = Path(p)
        total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return total


def our_variants(cuda: bool) -> dict[str, tuple[str, str, dict]]:
    """name -> (table label, backend, extra DataConfig fields)."""
    if not cuda:
        return {
            "dali": ("our loader, DALI (CPU)", "dali", {}),
            "torch": ("our loader, torch workers (OpenCV decode + warp)", "torch", {}),
        }
    return {
        "dali": ("our loader, DALI (nvJPEG + GPU augmentation)", "dali", {}),
        "dali_cpu": ("our loader, DALI (CPU decode, data.dali_decode=cpu)", "dali", {"dali_decode": "cpu"}),
        "torch": ("our loader, torch workers (OpenCV decode + warp; colour + normalise on GPU)", "torch", {}),
        "torch_gpu_decode": ("our loader, torch + torchvision nvJPEG decode", "torch", {"torch_gpu_decode": True}),
    }


def one_shard_variants(cuda: bool) -> dict[str, tuple[str, dict]]:
    """name -> (backend, DataConfig fields): our default loaders reading one shard at a time
    (shard_mix=1, the plan before batches mixed shards), to price the mixing in the same run."""
    return {
        f"{v}_one_shard": (backend, {**extra, "shard_mix": 1})
        for v, (_, backend, extra) in our_variants(cuda).items()
        if v in ("dali", "torch")
    }


def stage_breakdown(shards: Path, batch: int, epochs: int, seed: int, tokenizer) -> dict:
    """CPU ms per image of each stage of the torch backend (g2d_train, 256 px), one worker process,
    profiled (`build_loader(profile=True)`: thread CPU time per stage, ~1.5% overhead), tokenising
    with `tokenizer`, after a warm-up epoch; "other" is what the stages leave unexplained of the
    whole CPU time (worker glue, IPC, the consumer's side)."""
    loader = bench_loader("torch", shards, 1, batch, seed, torch.device("cpu"), tokenizer, profile=True)
    loader.set_epoch(0)
    for _ in loader:  # warm-up: the worker's start (fork, imports) is not a per-image cost
        pass
    loader.stats = type(loader.stats)()
    c0 = live_cpu_seconds(loader)
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        for _ in loader:
            pass
    total = 1000 * (live_cpu_seconds(loader) - c0) / loader.stats.samples
    loader.close()
    stages = {k: 1000 * v / loader.stats.samples for k, v in loader.stats.stage_s.items()}
    from pipeline.torch_backend import STAGES

    out = {k: round(stages.get(k, 0.0), 3) for k in STAGES}
    out["other"] = round(total - sum(stages.values()), 3)
    out["total"] = round(total, 3)
    return out


def floor_ms(jpgs: list[bytes], keys: list[str], size: int = 256, decoder: str = "loader") -> float:
    """The floor of a g2d_train sample, CPU ms per image on one core: decode + one OpenCV bilinear
    warp to size x size by the sample's own g2d_train matrix (`transforms.apply_geometry`'s single
    warp; the matrices are computed before timing). `decoder`: "loader" decodes as the torch backend
    does (`batch.decode_gray`: OpenCV's libjpeg-turbo), "pil" as it did before (PIL, with the same DCT
    draft), the floor's earlier definition."""
    from pipeline.batch import decode_gray
    from pipeline.transforms import _warp_array, build_spec, draw_params, geometry_matrix

    spec = build_spec(DataConfig(transform="g2d_train", image_size=size), "g2d_train")

    def decode_pil(data: bytes) -> np.ndarray:
        img = Image.open(io.BytesIO(data))
        img.draft("L", (size, size))
        img.load()
        return np.asarray(img.convert("L") if img.mode != "L" else img)

    def decode_loader(data: bytes) -> np.ndarray:
        return decode_gray(data, "jpg", lambda w, h: (size, size))[0]

    decode = decode_loader if decoder == "loader" else decode_pil
    shapes = [decode(data).shape for data in jpgs]
    matrices = [geometry_matrix(spec, draw_params(spec, 0, 0, k), w, h) for k, (h, w) in zip(keys, shapes)]
    t0 = time.process_time()
    for data, matrix in zip(jpgs, matrices):
        _warp_array(decode(data), matrix, size, nearest=False)
    return 1000 * (time.process_time() - t0) / len(jpgs)


def inprocess_cpu_ms(shards: Path, batch: int, epochs: int, seed: int, shard_mix: int) -> float:
    """CPU ms per image of the torch backend run in this process (no workers, no tokeniser), after a
    warm-up epoch: a load-independent price of a plan setting (wall-clock rates on shared cores vary
    by tens of percent from round to round)."""
    loader = bench_loader("torch", shards, 0, batch, seed, torch.device("cpu"), shard_mix=shard_mix)
    loader.set_epoch(0)
    for _ in loader:
        pass
    n0, t0 = loader.stats.samples, time.process_time()
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        for _ in loader:
            pass
    return 1000 * (time.process_time() - t0) / (loader.stats.samples - n0)


def crc_us(index: DatasetIndex) -> float:
    """Microseconds per sample of the read-side CRC check (jpg + txt), the cost issue #11 asked to price."""
    from shards.schema import member_crc32

    reader = SampleReader(index)
    members = [reader.read(gid, ("jpg", "txt")) for gid in range(index.num_samples)]
    reader.close()
    t0 = time.process_time()
    for m in members:
        member_crc32(m["jpg"]), member_crc32(m["txt"])
    return 1e6 * (time.process_time() - t0) / len(members)


def shards_per_batch(index: DatasetIndex, batch: int, epochs: int, seed: int, shard_mix: int) -> dict:
    """Distinct shards per batch of the training plan (world size 1), over `epochs` epochs."""
    from pipeline.plan import PlanArgs, distinct_shards

    args = PlanArgs(
        seed=seed, rank=0, world_size=1, batch_size=batch, shuffle=True, drop_last=True, shard_mix=shard_mix
    )
    counts = np.concatenate([distinct_shards(index, args.make(index, e)) for e in range(epochs)])
    return {
        "mean": round(float(counts.mean()), 2),
        "min": int(counts.min()),
        "shards": len(index.shards),
        "goal": min(8, len(index.shards)),
    }


def bench_tokenizer(texts: list[str], work_dir: Path):
    """A fast WordPiece tokenizer trained on the shards' reports (Bio_ClinicalBERT's cannot be
    downloaded here; the cost per report is of the same kind)."""
    from transformers import AutoTokenizer

    from model.text import build_tiny_text_model

    out = work_dir / "tokenizer"
    if not (out / "tokenizer.json").is_file():
        build_tiny_text_model(out, texts, vocab_size=4000)
    return AutoTokenizer.from_pretrained(out)


def cost_text(costs: dict, batch: int) -> str:
    """The CPU-cost paragraph of the doc section: stage table, floor ratio, CRC and mixing prices."""
    breakdown, floor, floor_pil, ours_ms = costs["breakdown"], costs["floor"], costs["floor_pil"], costs["ours_ms"]
    crc, mixing = costs["crc"], costs["mixing"]
    rows = ["| stage (torch backend, one worker, profiled) | CPU ms/image |", "|---|---|"]
    rows += [f"| {k.replace('_', ' + ' if k == 'jitter_normalise' else ' ')} | {v:.3f} |" for k, v in breakdown.items()]
    mixed, single = costs["spread"]["mixed (shard_mix=0)"], costs["spread"]["one shard at a time (shard_mix=1)"]
    device_step = breakdown["jitter_normalise"]
    return (
        f"CPU per image, torch backend (g2d_train, 256 px): {ours_ms:.2f} ms in the timed runs once the "
        f"workers run (epochs after the first: the workers' one-off start is not per image; no tokeniser; "
        f"process and workers), against a floor of {floor:.2f} ms (decode as the loader does, OpenCV's "
        f"libjpeg-turbo, + one OpenCV warp of the same images by their own g2d_train matrices, one core): "
        f"{ours_ms / floor:.2f}x (goal <= 1.5x; <= 0.7 ms absolute on a quiet core); {ours_ms / floor_pil:.2f}x "
        f"the floor as first defined, with PIL's decode ({floor_pil:.2f} ms); {ours_ms - device_step:.2f} ms, "
        f"{(ours_ms - device_step) / floor:.2f}x, without the CPU device step (jitter + normalisation to "
        f"float, {device_step:.2f} ms, which a GPU run does on the GPU). The stages, from a profiled run (one "
        f"worker; it also tokenises, with a WordPiece tokenizer trained on the reports):\n\n" + "\n".join(rows) + "\n\n"
        f"Read-side checks: the CRC-32 of jpg + txt costs {crc:.1f} us per sample ({crc / 10 / ours_ms:.1f}% "
        f"of the torch backend's CPU); the tar-header check rides on the same read. Batches mixed across "
        f"shards: {mixed['mean']:.1f} distinct shards per batch of {batch} on average (min {mixed['min']}, "
        f"goal >= {mixed['goal']} of {mixed['shards']} shards), vs {single['mean']:.1f} reading one shard at "
        f"a time (shard_mix=1). Cost of the mixing (goal < 5%): in CPU time, torch backend in-process, "
        f"interleaved rounds, {100 * mixing['torch_cpu']:+.1f}%; in the steady rates above (1 - mixed / "
        f"one-shard; wall clock on shared cores, noisy): "
        + ", ".join(f"{v} {100 * c:+.1f}%" for v, c in mixing.items() if v != "torch_cpu")
        + "."
    )


def shard_bytes(index: DatasetIndex) -> int:
    return du([s.path for s in index.shards] + [Path(s.path).with_suffix(".idx") for s in index.shards])


# ---- the run: inputs, timed rounds, CPU costs, results, doc section -------------------------------


def parse_args(argv: list[str] | None, cores: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=Path("data/shards/mimic"))
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where batches are delivered (auto: cuda when available)",
    )
    parser.add_argument("--workers", type=int, default=cores, help="loader workers / DALI threads, all loaders")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per timed run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--also-shards",
        type=Path,
        action="append",
        default=[],
        help="another packing of the same samples (e.g. --max-side 512): our loaders only",
    )
    parser.add_argument("--mgca-size", type=int, default=2048, help="longer side of upscaled MGCA files")
    parser.add_argument("--work-dir", type=Path, default=Path("data/bench/pipeline"))
    parser.add_argument(
        "--results", type=Path, help="default bench/results/pipeline.json (pipeline_gpu.json with CUDA)"
    )
    parser.add_argument("--doc", type=Path, default=Path("docs/performance.md"))
    return parser.parse_args(argv)


@dataclasses.dataclass
class Inputs:
    """The train split's stored samples and the baselines' files built from them."""

    index: DatasetIndex
    jpgs: list[bytes]
    metas: list[dict]
    texts: list[str]
    npy: Path  # G2D's (N, 256, 256) uint8 array
    report_csv: Path
    mgca_paths: list[Path]  # MGCA's one JPEG per sample
    mgca_source: str
    mgca_side: int  # median longer side, px
    stored_side: int


def prepare_inputs(args: argparse.Namespace) -> Inputs:
    ensure_shards(args.shards, args.workers)
    index = DatasetIndex(args.shards, "train")
    jpgs, metas, texts = stored_samples(index)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    npy, report_csv = args.work_dir / "g2d_256.npy", args.work_dir / "reports.csv"
    build_npy(npy, jpgs)
    build_report_csv(report_csv, metas, texts)
    mgca_paths, mgca_source = build_mgca_files(
        args.work_dir / "mgca_files", index.manifest, jpgs, metas, args.mgca_size
    )
    return Inputs(
        index=index,
        jpgs=jpgs,
        metas=metas,
        texts=texts,
        npy=npy,
        report_csv=report_csv,
        mgca_paths=mgca_paths,
        mgca_source=mgca_source,
        mgca_side=int(np.median([max(Image.open(p).size) for p in mgca_paths])),
        stored_side=int(np.median([max(Image.open(io.BytesIO(d)).size) for d in jpgs])),
    )


def loader_runs(args: argparse.Namespace, inputs: Inputs, device: torch.device, cuda: bool) -> dict:
    """name -> one timed run (round number -> Timing.done() dict) of every loader compared: ours (per
    shard set, `name@k` for the k-th --also-shards), ours one shard at a time, the DALI graph alone,
    the G2D and MGCA baselines."""
    w, b, e = args.workers, args.batch_size, args.epochs
    loaders = {}
    for k, shards in enumerate([args.shards] + list(args.also_shards)):
        ensure_shards(shards, args.workers)
        for name, (_, backend, extra) in our_variants(cuda).items():
            loaders[name if k == 0 else f"{name}@{k}"] = lambda r, be=backend, sh=shards, ex=extra: time_ours(
                be, sh, w, b, e, r, device, **ex
            )
    for name, (backend, extra) in one_shard_variants(cuda).items():
        loaders[name] = lambda r, be=backend, ex=extra: time_ours(be, args.shards, w, b, e, r, device, **ex)
    if dali_available():
        loaders["dali_graph"] = lambda r: time_dali_graph(args.shards, w, b, e, r, device)
    loaders["g2d_npy"] = lambda r: time_dataloader(G2DNpy(inputs.npy), w, b, e, device)
    loaders["mgca_files"] = lambda r: time_dataloader(MGCAFiles(inputs.mgca_paths), w, b, e, device)
    return loaders


def run_rounds(loaders: dict, runs: int) -> dict[str, list[dict]]:
    """Interleaved rounds: every loader sees the same background load, round after round."""
    timings = {name: [] for name in loaders}
    for r in range(runs):
        for name, fn in loaders.items():
            t = fn(r)
            timings[name].append(t)
            gc.collect()
            print(
                f"round {r}: {name:>18} {t['steady']:8.1f} img/s steady, {t['with_startup']:8.1f} with "
                f"startup ({t['startup_s']:.2f} s/epoch), {t['cpu_ms']:5.2f} CPU-ms/img",
                flush=True,
            )
    return timings


def r1(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


@dataclasses.dataclass
class Summary:
    """Medians over the rounds, per loader name; `rates` (what the ratios use) adds raw_decode."""

    runs: dict
    steady: dict
    with_startup: dict
    startup: dict
    cpu: dict
    cpu_warm: dict
    basis: str
    rates: dict


def summarise(timings: dict[str, list[dict]], jpgs: list[bytes], runs: int, cores: int) -> Summary:
    def median(name: str, field: str) -> float | None:
        values = [t[field] for t in timings[name]]
        return None if None in values else statistics.median(values)

    steady = {name: median(name, "steady") for name in timings}
    with_startup = {name: median(name, "with_startup") for name in timings}
    # Ratios compare like with like: steady rates when every loader reached its steady state, else
    # the rates with each epoch's startup included.
    basis = "steady" if all(v is not None for v in steady.values()) else "with startup"
    summary = Summary(
        runs={name: [r1(t["steady"]) for t in ts] for name, ts in timings.items()},
        steady=steady,
        with_startup=with_startup,
        startup={name: round(median(name, "startup_s"), 3) for name in timings},
        cpu={name: median(name, "cpu_ms") for name in timings},
        cpu_warm={name: median(name, "cpu_ms_warm") for name in timings if "cpu_ms_warm" in timings[name][0]},
        basis=basis,
        rates=dict(steady if basis == "steady" else with_startup),
    )
    per_core = statistics.median(time_raw_decode(jpgs, 2) for _ in range(runs))
    summary.rates["raw_decode"] = per_core * cores
    summary.cpu["raw_decode"] = 1000 / per_core
    print(f"raw decode: {summary.rates['raw_decode']:7.1f} img/s ({per_core:.1f} per core x {cores} cores)")
    return summary


def cpu_costs(args: argparse.Namespace, inputs: Inputs, summary: Summary) -> dict:
    """Where the torch backend's CPU goes against the floor (decode + one warp), the CRC's price and
    the shard mixing's (spread and cost), all in this same run."""
    index, b, e = inputs.index, args.batch_size, args.epochs
    keys = [index.key(g) for g in range(index.num_samples)]
    floor = statistics.median(floor_ms(inputs.jpgs, keys) for _ in range(args.runs))
    floor_pil = statistics.median(floor_ms(inputs.jpgs, keys, decoder="pil") for _ in range(args.runs))
    breakdown = stage_breakdown(args.shards, b, e, 0, bench_tokenizer(inputs.texts, args.work_dir))
    rates = summary.rates
    mixing = {
        v: round(1 - rates[v] / rates[f"{v}_one_shard"], 3) for v in ("dali", "torch") if f"{v}_one_shard" in rates
    }
    # The same price in CPU time, torch backend in this process, settings interleaved round by round.
    ab = {mix: [] for mix in (0, 1)}
    for _ in range(args.runs):
        for mix in ab:
            ab[mix].append(inprocess_cpu_ms(args.shards, b, e, 0, mix))
    mixing["torch_cpu"] = round(statistics.median(ab[0]) / statistics.median(ab[1]) - 1, 3)
    costs = {
        "breakdown": breakdown,
        "floor": floor,
        "floor_pil": floor_pil,
        "ours_ms": summary.cpu_warm["torch"],
        "crc": crc_us(index),
        "mixing": mixing,
        "spread": {
            "mixed (shard_mix=0)": shards_per_batch(index, b, e, 0, 0),
            "one shard at a time (shard_mix=1)": shards_per_batch(index, b, e, 0, 1),
        },
    }
    print(
        f"torch backend: {costs['ours_ms']:.2f} CPU-ms/img, floor {floor:.2f} ({costs['ours_ms'] / floor:.2f}x; "
        f"PIL-decode floor {floor_pil:.2f}); stages {breakdown}; CRC {costs['crc']:.1f} us/sample; "
        f"mixing cost {mixing}; shards per batch {costs['spread']}"
    )
    return costs


def other_shard_results(args: argparse.Namespace, summary: Summary, cuda: bool, cores: int) -> list[dict]:
    """Our loaders on each --also-shards packing; their entries move out of `summary`'s tables."""
    variants = our_variants(cuda)
    extras = []
    for k, shards in enumerate(args.also_shards, start=1):
        ex_index = DatasetIndex(shards, "train")
        ex_jpgs = stored_samples(ex_index)[0]
        ex_core = statistics.median(time_raw_decode(ex_jpgs, 2) for _ in range(args.runs))
        extras.append(
            {
                "shards": str(shards),
                "images": len(ex_jpgs),
                "stored_longer_side": int(np.median([max(Image.open(io.BytesIO(d)).size) for d in ex_jpgs])),
                "img_per_s": {
                    **{v: r1(summary.rates.pop(f"{v}@{k}")) for v in variants},
                    "raw_decode": round(ex_core * cores, 1),
                },
                "img_per_s_steady": {v: r1(summary.steady.pop(f"{v}@{k}")) for v in variants},
                "img_per_s_with_startup": {v: r1(summary.with_startup.pop(f"{v}@{k}")) for v in variants},
                "startup_s_per_epoch": {v: summary.startup.pop(f"{v}@{k}") for v in variants},
                "cpu_ms_per_img": {v: round(summary.cpu.pop(f"{v}@{k}"), 2) for v in variants},
                "disk_bytes": shard_bytes(ex_index),
            }
        )
        for v in variants:
            summary.runs[f"{shards}:{v}"] = summary.runs.pop(f"{v}@{k}")
    return extras


def machine_info(cores: int, cuda: bool) -> dict:
    machine = {
        "cpu_count": cores,
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "gpu": torch.cuda.get_device_name(0) if cuda else "none (DALI on CPU)",
    }
    try:
        import nvidia.dali as dali

        machine["dali"] = dali.__version__
    except ImportError:
        pass
    return machine


def disk_usage(inputs: Inputs) -> tuple[dict, dict]:
    """(bytes each loader reads to train, the parts)."""
    reports = du([inputs.report_csv])
    disk = {
        "shards": shard_bytes(inputs.index),
        "g2d_npy": du([inputs.npy]) + reports,
        "mgca_files": du(inputs.mgca_paths) + reports,
    }
    detail = {
        "g2d_npy_images": du([inputs.npy]),
        "mgca_files_images": du(inputs.mgca_paths),
        "reports_csv": reports,
        "shards_jpg_members": int(sum(len(j) for j in inputs.jpgs)),
    }
    return disk, detail


def results_json(args, inputs: Inputs, summary: Summary, costs: dict, extras, disk, detail, machine, device) -> dict:
    n_images, ours_ms, floor = len(inputs.jpgs), costs["ours_ms"], costs["floor"]
    return {
        "img_per_s": {k: r1(v) for k, v in summary.rates.items()},
        "rate_basis": summary.basis,
        "img_per_s_steady": {k: r1(v) for k, v in summary.steady.items()},
        "img_per_s_with_startup": {k: r1(v) for k, v in summary.with_startup.items()},
        "startup_s_per_epoch": summary.startup,
        "runs_img_per_s_steady": summary.runs,
        "cpu_ms_per_img": {k: round(v, 2) for k, v in summary.cpu.items()},
        "cpu_ms_per_img_warm": {k: round(v, 3) for k, v in summary.cpu_warm.items()},
        "disk_bytes": disk,
        "disk_bytes_detail": detail,
        "other_shards": extras,
        "cpu_breakdown_ms_per_img": costs["breakdown"],
        "floor_ms_per_img": round(floor, 3),
        "floor_pil_decode_ms_per_img": round(costs["floor_pil"], 3),
        "torch_cpu_ms_per_img": round(ours_ms, 3),
        "torch_vs_floor": round(ours_ms / floor, 2),
        "torch_vs_floor_pil_decode": round(ours_ms / costs["floor_pil"], 2),
        "crc_us_per_sample": round(costs["crc"], 1),
        "crc_share_of_torch_cpu": round(costs["crc"] / 1000 / ours_ms, 4),
        "mixing_cost": costs["mixing"],
        "shards_per_batch": costs["spread"],
        "setup": {
            "shards": str(args.shards),
            "train_images": n_images,
            "workers": args.workers,
            "batch_size": args.batch_size,
            "batches_per_epoch": n_images // args.batch_size,
            "epochs_per_run": args.epochs,
            "runs": args.runs,
            "stored_longer_side": inputs.stored_side,
            "mgca_longer_side": inputs.mgca_side,
            "mgca_source": inputs.mgca_source,
            "device": str(device),
        },
        "machine": machine,
    }


def table_row(
    label: str,
    rate: float,
    g2d: float,
    raw_rate: float,
    cpu_ms: float,
    size: int | None,
    n: int,
    rate_steady: float | None = None,
    rate_startup: float | None = None,
    startup_s: float | None = None,
) -> str:
    """One row of the doc's loader table."""
    if rate_startup is None:  # raw decode: no loader, so no startup
        timing = f"{rate:.0f} | - | - |"
    else:
        timing = (
            f"{rate_steady:.0f}" if rate_steady is not None else "n/a"
        ) + f" | {rate_startup:.0f} | {startup_s:.2f} |"
    return f"| {label} | {timing} {rate / g2d:.2f}x | {rate / raw_rate:.0%} | {cpu_ms:.2f} | " + (
        f"{size / 1e6:.1f} | {size / n / 1e3:.1f} KB |" if size else "- | - |"
    )


def loader_table(summary: Summary, extras: list[dict], disk: dict, inputs: Inputs, cuda: bool, cores: int):
    """The doc's loader table (lines) and a note per --also-shards packing."""
    rates, cpu, g2d, raw = summary.rates, summary.cpu, summary.rates["g2d_npy"], summary.rates["raw_decode"]
    variants, n_images = our_variants(cuda), len(inputs.jpgs)

    def timed(name: str) -> dict:
        return {
            "rate_steady": summary.steady[name],
            "rate_startup": summary.with_startup[name],
            "startup_s": summary.startup[name],
        }

    table = [
        "| loader | images/s steady | images/s with startup | startup s/epoch | vs G2D npy | vs raw decode "
        "| CPU ms/image | disk (MB) | per sample |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    table += [
        table_row(label, rates[v], g2d, raw, cpu[v], disk["shards"], n_images, **timed(v))
        for v, (label, _, _) in variants.items()
    ]
    if "dali_graph" in rates:
        label = "(diagnostic) our DALI graph alone: no unpacking, no prefetch thread"
        table.append(
            table_row(label, rates["dali_graph"], g2d, raw, cpu["dali_graph"], None, n_images, **timed("dali_graph"))
        )
    table += [
        table_row(
            "G2D npy memmap + PIL (+ report csv)",
            g2d,
            g2d,
            raw,
            cpu["g2d_npy"],
            disk["g2d_npy"],
            n_images,
            **timed("g2d_npy"),
        ),
        table_row(
            f"MGCA per-file JPEG, {inputs.mgca_side} px (+ report csv)",
            rates["mgca_files"],
            g2d,
            raw,
            cpu["mgca_files"],
            disk["mgca_files"],
            n_images,
            **timed("mgca_files"),
        ),
        table_row(f"PIL decode only, {cores} cores", raw, g2d, raw, cpu["raw_decode"], None, n_images),
    ]
    notes = []
    for ex in extras:
        side, ex_raw, ex_disk = ex["stored_longer_side"], ex["img_per_s"]["raw_decode"], ex["disk_bytes"]
        table += [
            table_row(
                f"{label}, {side}-px shards",
                ex["img_per_s"][v],
                g2d,
                ex_raw,
                ex["cpu_ms_per_img"][v],
                ex_disk,
                ex["images"],
                ex["img_per_s_steady"][v],
                ex["img_per_s_with_startup"][v],
                ex["startup_s_per_epoch"][v],
            )
            for v, (label, _, _) in variants.items()
        ]
        table.append(
            table_row(
                f"PIL decode only, {cores} cores, {side}-px shards",
                ex_raw,
                g2d,
                ex_raw,
                1000 * cores / ex_raw,
                None,
                ex["images"],
            )
        )
        ex_best = max(ex["img_per_s"][v] for v in variants)
        notes.append(
            f"With {side}-px shards (`{ex['shards']}`): best {ex_best / g2d:.2f}x G2D npy with "
            f"{disk['g2d_npy'] / ex_disk:.1f}x less disk, {ex_best / rates['mgca_files']:.1f}x MGCA files, "
            f"{ex_best / ex_raw:.0%} of its raw decode."
        )
    return table, notes


def doc_body(
    args,
    inputs: Inputs,
    summary: Summary,
    costs: dict,
    table: list[str],
    notes: list[str],
    disk,
    detail,
    machine,
    results,
) -> str:
    """The doc section: setup, loader table, ratios to the targets, CPU costs, machine."""
    rates, n_images, w, b, e = summary.rates, len(inputs.jpgs), args.workers, args.batch_size, args.epochs
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    best = max(rates[v] for v in our_variants(cuda))
    g2d, raw, reports = rates["g2d_npy"], rates["raw_decode"], detail["reports_csv"]
    where = (
        f"batches delivered on the GPU ({machine['gpu']}; baselines: pinned memory + non-blocking copy)"
        if cuda
        else "CPU only (no GPU: DALI decodes on the CPU)"
    )
    return (
        f"`make bench-pipeline` ({time.strftime('%Y-%m-%d')}): {n_images} train images of `{args.shards}` "
        f"(stored JPEG longer side {inputs.stored_side} px), {w} workers / DALI threads for every loader, "
        f"batch {b}, 256-px output with G2D's augmentations (rotation/shear 15, brightness/contrast 0.2; MGCA: "
        f"its own 224 crop), {e} epochs of {n_images // b} batches per run, median of {args.runs} interleaved "
        f'rounds, {where}. "Steady" counts each epoch only after the batches a loader can have in flight during '
        f"its startup (workers x prefetch; DALI's queue depths) and leaves out the startup itself (asking "
        f"for the iterator until the first batch: DALI pipeline build, worker forks, first decodes), which "
        f"toy epochs cannot amortise and a MIMIC-sized one (hundreds of batches per rank) does; n/a where "
        f"an epoch has no batch beyond those in flight. Ratios use the {summary.basis} rates. "
        f"CPU ms/image counts the loader's process and its workers (load-independent cost; raw decode: "
        f"one core). Disk counts what each loader reads to train: shards (images, reports, labels, index "
        f"files) vs the images plus the report csv ({reports / n_images:.0f} B/row).\n\n" + "\n".join(table) + "\n\n"
        f"Best of ours vs G2D npy: {best / g2d:.2f}x (target >= 1.0x) with {disk['g2d_npy'] / disk['shards']:.1f}x "
        f"less disk (target >= 5x; {detail['g2d_npy_images'] / disk['shards']:.1f}x against the npy alone); "
        f"vs MGCA files: {best / rates['mgca_files']:.1f}x (target >= 3x); vs raw decode: {best / raw:.0%} "
        f"(target >= 60%). " + " ".join(notes) + "\n\n" + cost_text(costs, b) + "\n\n"
        f"MGCA files: {inputs.mgca_source}. Machine: {machine['cpu_count']} usable CPU cores "
        f"({machine['cpu_model']}), 1-min load average {os.getloadavg()[0]:.1f} at the end, GPU: {machine['gpu']}. "
        f"Raw: `{results}`.\n"
    )


def main(argv: list[str] | None = None) -> int:
    cores = len(os.sched_getaffinity(0))
    args = parse_args(argv, cores)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    results = args.results or Path("bench/results/pipeline_gpu.json" if cuda else "bench/results/pipeline.json")

    inputs = prepare_inputs(args)
    timings = run_rounds(loader_runs(args, inputs, device, cuda), args.runs)
    summary = summarise(timings, inputs.jpgs, args.runs, cores)
    costs = cpu_costs(args, inputs, summary)
    disk, detail = disk_usage(inputs)
    extras = other_shard_results(args, summary, cuda, cores)
    machine = machine_info(cores, cuda)
    atomic_write_json(results, results_json(args, inputs, summary, costs, extras, disk, detail, machine, device))

    table, notes = loader_table(summary, extras, disk, inputs, cuda, cores)
    print("\n".join(table))
    body = doc_body(args, inputs, summary, costs, table, notes, disk, detail, machine, results)
    update_section(args.doc, "Data pipeline on a GPU" if cuda else "Data pipeline", body)
    return 0


if __name__ == "__main__":
    run_main(main)
