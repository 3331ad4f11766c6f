"""`make bench-pipeline [SHARDS=<dir>]`: image throughput of our loader vs the loaders it replaces.

Same samples, same worker count, 256-px output with G2D's training augmentations, images only (no
tokenisation: the baselines tokenise in the model), CPU tensors. Each loader iterates whole epochs of
the train split (drop_last), `--epochs` per run, startup included (DALI pipeline build / worker
forks happen every epoch in every loader, as in training); median of `--runs` runs.

    dali         our loader, DALI backend (CPU decode here: no GPU)
    torch        our loader, torch backend (DataLoader workers, PIL)
    g2d_npy      G2D's official loader: one (N, 256, 256) uint8 .npy memmap, PIL "RGB", torchvision
                 RandomAffine(15, shear=15) + ColorJitter(0.2, 0.2) + ToTensor + Normalize in workers
    mgca_files   MGCA's loader: one JPEG per sample at the original size, full decode, longer side to
                 256 + zero pad, RandomCrop(224), ToTensor, Normalize(0.5)
    raw_decode   the limit: libjpeg (PIL) full decode of the stored JPEGs, single process, x cores

The npy and the per-sample JPEGs are built from the same samples under --work-dir (MGCA files are the
synthetic corpus originals the shards were packed from when the manifest names them, else the
stored images upscaled to --mgca-size). Missing shards are packed first with `tools.pack_shards`
(`make shards` defaults). Writes bench/results/pipeline.json and the "Data pipeline" section of
docs/performance.md.
"""
from __future__ import annotations

import argparse
import gc
import io
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from common.dist import DistInfo
from common.io import atomic_write_json
from pipeline import DataConfig, build_loader
from pipeline.batch import SampleReader, decode_meta
from pipeline.plan import DatasetIndex
from tools.bench_shards import cpu_model
from tools.perfdoc import update_section

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


# ---- baselines -----------------------------------------------------------------------------------

class G2DNpy(Dataset):
    """G2D's pretraining dataset, image side: npy row -> PIL RGB -> affine -> jitter -> tensor."""

    def __init__(self, path: Path):
        self.path = path
        self.images = None
        self.n = int(np.load(path, mmap_mode="r").shape[0])
        self.transform = T.Compose([
            T.CenterCrop(256), T.RandomAffine(degrees=15, shear=15), T.ColorJitter(brightness=0.2, contrast=0.2),
            T.ToTensor(), T.Normalize(*IMAGENET)])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.images is None:              # memmap opened per worker, as np.load(mmap_mode="r") in G2D
            self.images = np.load(self.path, mmap_mode="r")
        img = Image.fromarray(np.asarray(self.images[i])).convert("RGB")
        return self.transform(img)           # [3, 256, 256]


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
        return self.transform(canvas.convert("RGB"))   # [3, 224, 224]


# ---- inputs --------------------------------------------------------------------------------------

def ensure_shards(shards: Path, workers: int) -> None:
    if (shards / "manifest.json").is_file():
        return
    from tools.pack_shards import main as pack_main

    print(f"bench-pipeline: no shards at {shards}; packing the synthetic corpus (make shards defaults)")
    if pack_main(["--synthetic", "data/synthetic_mimic", "--out", str(shards), "--workers", str(workers),
                  "--seed", "0", "--synth-size", "1024"]) != 0:
        raise SystemExit("bench-pipeline: packing failed")


def stored_images(index: DatasetIndex) -> tuple[list[bytes], list[dict]]:
    reader = SampleReader(index)
    jpgs, metas = [], []
    for gid in range(index.num_samples):
        m = reader.read(gid, ("jpg", "json"))
        jpgs.append(m["jpg"])
        metas.append(decode_meta(m["json"]))
    reader.close()
    return jpgs, metas


def build_npy(path: Path, jpgs: list[bytes]) -> None:
    """G2D's format: every image squashed to 256x256 uint8 in one array (from the stored images)."""
    if path.is_file() and np.load(path, mmap_mode="r").shape[0] == len(jpgs):
        return
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(jpgs), 256, 256))
    for i, data in enumerate(jpgs):
        arr[i] = np.asarray(Image.open(io.BytesIO(data)).convert("L").resize((256, 256), Image.Resampling.BILINEAR))
    arr.flush()
    del arr


def build_mgca_files(out: Path, manifest: dict, jpgs: list[bytes], metas: list[dict], size: int) -> tuple[list[Path], str]:
    """One JPEG per sample: the corpus originals if the manifest names a corpus that is present,
    otherwise the stored images upscaled to `size` (longer side)."""
    root = manifest.get("config", {}).get("root")
    if root:
        paths = [Path(root) / "files" / f"p{m['subject_id'][:2]}" / f"p{m['subject_id']}" / f"s{m['study_id']}"
                 / f"{m['dicom_id']}.jpg" for m in metas]
        if all(p.is_file() for p in paths):
            return paths, f"synthetic corpus originals ({root})"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(jpgs):
        path = out / f"{i:06d}.jpg"
        if not path.is_file():
            img = Image.open(io.BytesIO(data)).convert("L")
            s = size / max(img.size)
            img.resize((round(img.size[0] * s), round(img.size[1] * s)), Image.Resampling.BICUBIC).save(path, quality=95)
        paths.append(path)
    return paths, f"stored images upscaled to {size} px"


# ---- timing --------------------------------------------------------------------------------------

def cpu_seconds() -> float:
    """CPU time of this process (DALI threads included) and of its reaped children (loader workers,
    joined after every epoch): the load-independent cost, where wall time depends on other jobs."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_ours(backend: str, shards: Path, workers: int, batch: int, epochs: int, seed: int) -> tuple[float, float, int]:
    cfg = DataConfig(shards=str(shards), backend=backend, batch_size_per_gpu=batch, num_workers=workers,
                     transform="g2d_train", image_size=256, seed=seed)
    loader = build_loader(cfg, "train", CPU)
    n, t0, c0 = 0, time.perf_counter(), cpu_seconds()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for b in loader:
            n += b.image.shape[0]
    return time.perf_counter() - t0, cpu_seconds() - c0, n


def time_dataloader(dataset: Dataset, workers: int, batch: int, epochs: int) -> tuple[float, float, int]:
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers)
    n, t0, c0 = 0, time.perf_counter(), cpu_seconds()
    for _ in range(epochs):
        it = iter(loader)
        for x in it:
            n += x.shape[0]
        it._shutdown_workers()          # workers joined (and their CPU time counted) every epoch
    return time.perf_counter() - t0, cpu_seconds() - c0, n


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--shards", type=Path, default=Path("data/shards/mimic"))
    parser.add_argument("--workers", type=int, default=cores, help="loader workers / DALI threads, all loaders")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per timed run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--also-shards", type=Path, action="append", default=[],
                        help="another packing of the same samples (e.g. --max-side 256): our loaders only")
    parser.add_argument("--mgca-size", type=int, default=2048, help="longer side of upscaled MGCA files")
    parser.add_argument("--work-dir", type=Path, default=Path("data/bench/pipeline"))
    parser.add_argument("--results", type=Path, default=Path("bench/results/pipeline.json"))
    parser.add_argument("--doc", type=Path, default=Path("docs/performance.md"))
    args = parser.parse_args(argv)

    ensure_shards(args.shards, args.workers)
    index = DatasetIndex(args.shards, "train")
    jpgs, metas = stored_images(index)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    npy = args.work_dir / "g2d_256.npy"
    build_npy(npy, jpgs)
    mgca_paths, mgca_source = build_mgca_files(args.work_dir / "mgca_files", index.manifest, jpgs, metas,
                                               args.mgca_size)
    mgca_side = int(np.median([max(Image.open(p).size) for p in mgca_paths]))
    stored_side = int(np.median([max(Image.open(io.BytesIO(d)).size) for d in jpgs]))
    w, b, e = args.workers, args.batch_size, args.epochs

    loaders = {
        "dali": lambda r: time_ours("dali", args.shards, w, b, e, seed=r),
        "torch": lambda r: time_ours("torch", args.shards, w, b, e, seed=r),
        "g2d_npy": lambda r: time_dataloader(G2DNpy(npy), w, b, e),
        "mgca_files": lambda r: time_dataloader(MGCAFiles(mgca_paths), w, b, e),
    }
    for k, extra in enumerate(args.also_shards):
        ensure_shards(extra, args.workers)
        for backend in ("dali", "torch"):
            loaders[f"{backend}@{k}"] = (lambda r, be=backend, sh=extra: time_ours(be, sh, w, b, e, seed=r))
    runs = {name: [] for name in loaders}
    cpu_ms = {name: [] for name in loaders}
    # Interleaved rounds: every loader sees the same background load, round after round.
    for r in range(args.runs):
        for name, fn in loaders.items():
            wall, cpu, n = fn(r)
            runs[name].append(n / wall)
            cpu_ms[name].append(1000 * cpu / n)
            gc.collect()
            print(f"round {r}: {name:>10} {n / wall:7.1f} img/s, {1000 * cpu / n:5.2f} CPU-ms/img", flush=True)
    rates = {name: statistics.median(v) for name, v in runs.items()}
    cpu = {name: statistics.median(v) for name, v in cpu_ms.items()}
    per_core = statistics.median(time_raw_decode(jpgs, 2) for _ in range(args.runs))
    rates["raw_decode"] = per_core * cores
    cpu["raw_decode"] = 1000 / per_core
    print(f"raw decode: {rates['raw_decode']:7.1f} img/s ({per_core:.1f} per core x {cores} cores)")
    extras = []
    for k, extra in enumerate(args.also_shards):
        ex_index = DatasetIndex(extra, "train")
        ex_jpgs, _ = stored_images(ex_index)
        ex_core = statistics.median(time_raw_decode(ex_jpgs, 2) for _ in range(args.runs))
        extras.append({"shards": str(extra), "images": len(ex_jpgs),
                       "stored_longer_side": int(np.median([max(Image.open(io.BytesIO(d)).size) for d in ex_jpgs])),
                       "img_per_s": {"dali": round(rates.pop(f"dali@{k}"), 1), "torch": round(rates.pop(f"torch@{k}"), 1),
                                     "raw_decode": round(ex_core * cores, 1)},
                       "cpu_ms_per_img": {"dali": round(cpu.pop(f"dali@{k}"), 2), "torch": round(cpu.pop(f"torch@{k}"), 2)},
                       "disk_bytes": du([s.path for s in ex_index.shards]
                                        + [Path(s.path).with_suffix(".idx") for s in ex_index.shards])})
        runs[f"{extra}:dali"], runs[f"{extra}:torch"] = runs.pop(f"dali@{k}"), runs.pop(f"torch@{k}")

    shard_files = [s.path for s in index.shards] + [Path(s.path).with_suffix(".idx") for s in index.shards]
    disk = {"shards": du(shard_files), "g2d_npy": du([npy]), "mgca_files": du(mgca_paths)}
    n_images = len(jpgs)
    machine = {"cpu_count": cores, "cpu_model": cpu_model(), "python": platform.python_version(),
               "torch": torch.__version__, "platform": platform.platform(),
               "load_avg_1min": round(os.getloadavg()[0], 2), "gpu": "none (DALI on CPU)"}
    try:
        import nvidia.dali as dali
        machine["dali"] = dali.__version__
    except ImportError:
        pass
    result = {"img_per_s": {k: round(v, 1) for k, v in rates.items()},
              "runs_img_per_s": {k: [round(r, 1) for r in v] for k, v in runs.items()},
              "cpu_ms_per_img": {k: round(v, 2) for k, v in cpu.items()},
              "disk_bytes": disk,
              "other_shards": extras,
              "setup": {"shards": str(args.shards), "train_images": n_images, "workers": w, "batch_size": b,
                        "epochs_per_run": e, "runs": args.runs, "stored_longer_side": stored_side,
                        "mgca_longer_side": mgca_side, "mgca_source": mgca_source},
              "machine": machine}
    atomic_write_json(args.results, result)

    best = max(rates["dali"], rates["torch"])
    g2d, raw = rates["g2d_npy"], rates["raw_decode"]
    rows = [("dali", "our loader, DALI (CPU)", disk["shards"]), ("torch", "our loader, torch workers", disk["shards"]),
            ("g2d_npy", "G2D npy memmap + PIL", disk["g2d_npy"]),
            ("mgca_files", f"MGCA per-file JPEG ({mgca_side} px)", disk["mgca_files"]),
            ("raw_decode", "PIL decode only, x cores", None)]
    table = ["| loader | images/s | vs G2D npy | vs raw decode | CPU ms/image | disk (MB) | per image |",
             "|---|---|---|---|---|---|---|"]
    for key, label, size in rows:
        table.append(f"| {label} | {rates[key]:.0f} | {rates[key] / g2d:.2f}x | {rates[key] / raw:.0%} | "
                     f"{cpu[key]:.2f} | " + (f"{size / 1e6:.1f} | {size / n_images / 1e3:.1f} KB |" if size else "- | - |"))
    notes = []
    for ex in extras:
        side, ex_raw, ex_disk = ex["stored_longer_side"], ex["img_per_s"]["raw_decode"], ex["disk_bytes"]
        for key, label in (("dali", "our loader, DALI (CPU)"), ("torch", "our loader, torch workers")):
            rate = ex["img_per_s"][key]
            table.append(f"| {label}, {side}-px shards | {rate:.0f} | {rate / g2d:.2f}x | {rate / ex_raw:.0%} | "
                         f"{ex['cpu_ms_per_img'][key]:.2f} | {ex_disk / 1e6:.1f} | {ex_disk / ex['images'] / 1e3:.1f} KB |")
        table.append(f"| PIL decode only, x cores, {side}-px shards | {ex_raw:.0f} | {ex_raw / g2d:.2f}x | 100% | "
                     f"{1000 * cores / ex_raw:.2f} | - | - |")
        ex_best = max(ex["img_per_s"]["dali"], ex["img_per_s"]["torch"])
        notes.append(f"With {side}-px shards (`{ex['shards']}`, the resolution G2D's npy holds): "
                     f"{ex_best / g2d:.2f}x G2D npy with {disk['g2d_npy'] / ex_disk:.1f}x less disk, "
                     f"{ex_best / rates['mgca_files']:.1f}x MGCA files, {ex_best / ex_raw:.0%} of its raw decode.")
    print("\n".join(table))
    body = (
        f"`make bench-pipeline` ({time.strftime('%Y-%m-%d')}): {n_images} train images of `{args.shards}` "
        f"(stored JPEG longer side {stored_side} px), {w} workers / DALI threads for every loader, batch {b}, "
        f"256-px output with G2D's augmentations (rotation/shear 15, brightness/contrast 0.2; MGCA: its own "
        f"224 crop), {e} epochs per run (startup included), median of {args.runs} interleaved rounds, CPU only. "
        f"CPU ms/image counts the loader's process and its workers (load-independent cost; raw decode: "
        f"one core).\n\n"
        + "\n".join(table) + "\n\n"
        f"Best of ours vs G2D npy: {best / g2d:.2f}x (target >= 1.0x) with {disk['g2d_npy'] / disk['shards']:.1f}x "
        f"less disk (target >= 5x); vs MGCA files: {best / rates['mgca_files']:.1f}x (target >= 3x); vs raw "
        f"decode: {best / raw:.0%} (target >= 60%). " + " ".join(notes) + "\n\n"
        "Reading the numbers: on a CPU-only machine every loader is bound by per-image arithmetic. Ours "
        "decodes a stored JPEG (G2D's npy was decoded and resized offline, once) and then does one "
        "bilinear warp (resize + affine + crop composed) and the normalisation, cheaper than G2D's RGB "
        "affine + jitter + ToTensor + Normalize, so the two are close per image. The raw-decode target is a GPU target: with CUDA, DALI decodes "
        "with nvJPEG and augments on the GPU, leaving the CPU only I/O and tokenisation; here the "
        "augmentations alone cost several decodes. DALI's CPU operators are slow (its CPU warp_affine "
        "costs ~5x PIL's), so `backend: auto` uses the torch workers when there is no GPU. Disk: the "
        "512-px shards hold 4x the pixels of the 256x256 npy plus reports and metadata (tar headers "
        "pad each member to 512 bytes).\n\n"
        f"MGCA files: {mgca_source}. Machine: {cores} usable CPU cores ({cpu_model()}), 1-min load average "
        f"{os.getloadavg()[0]:.1f} at the end (other jobs share these cores), no GPU (DALI decodes on the CPU; "
        f"with a GPU it decodes with nvJPEG). Raw: `{args.results}`.\n")
    update_section(args.doc, "Data pipeline", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
