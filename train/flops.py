"""Model FLOPs of the training step and model FLOPs utilisation (MFU).

MFU = (model FLOPs per sample x samples/s per device) / the device's peak FLOP/s.

- FLOPs are counted once, at start, with torch.utils.flop_counter.FlopCounterMode over the forward
  and backward of the real step (same model, autocast and memory format) on one real micro-batch.
  FlopCounterMode counts matmuls, convolutions and attention (2 FLOPs per multiply-add) and ignores
  elementwise ops, norms and the optimiser: the usual "model FLOPs" convention.
- Text length: the count uses the padded length of the batch it is given (the run's first batch).
  With per-batch padding later batches differ; the text tower is a small share of the step (see
  docs/performance.md), and the length used is recorded (`flops_text_length`).
- Peak: dense (non-sparse) tensor-core bf16 FLOP/s of known GPUs from their datasheets (fp16 is the
  same on these parts; fp32 runs use the fp32 column). A CPU's fp32 peak is estimated as threads x
  clock x FMA width. `train.peak_tflops` overrides both; an unknown GPU without it gives no MFU.
The count costs one extra forward+backward at start; buffers (BN running statistics), RNG streams
and gradients are restored afterwards, so the run itself is bit-identical with or without it.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

# Device-name fragment -> (bf16 dense TFLOP/s, fp32 TFLOP/s). Matched longest fragment first, so
# "L40S" wins over "L40" and "L4", "H100 PCIe" over "H100".
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "B200": (2250.0, 80.0),
    "H200": (989.4, 66.9),
    "GH200": (989.4, 66.9),
    "H100 PCIe": (756.5, 51.2),
    "H100 NVL": (835.5, 60.0),
    "H100": (989.4, 66.9),  # SXM ("NVIDIA H100 80GB HBM3")
    "A100": (312.0, 19.5),
    "L40S": (362.05, 91.6),
    "L40": (181.05, 90.5),
    "L4": (121.0, 30.3),
    "A10": (125.0, 31.2),
    "RTX 4090": (165.2, 82.6),
    "A6000": (154.8, 38.7),
    "V100": (125.0, 15.7),  # no bf16: the fp16 tensor-core peak
}


def _cpu_peak(precision: str, info: str | None = None) -> tuple[float, str]:
    """threads x clock x FLOPs per cycle per core, an upper bound. fp32: 2 FMA units x vector lanes x 2.
    bf16 (autocast): AMX tiles, 1024 FLOP/cycle (Intel's figure for AMX-BF16), else AVX512-BF16's dot
    products, 128; a CPU with neither runs bf16 no faster than fp32."""
    if info is None:
        try:
            info = Path("/proc/cpuinfo").read_text()
        except OSError:
            info = ""
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)]
    ghz_name = re.search(r"@\s*([\d.]+)GHz", info)
    ghz = max(mhz) / 1000 if mhz else float(ghz_name.group(1)) if ghz_name else 2.5
    flags = set(re.search(r"^flags\s*:(.*)$", info, re.M).group(1).split()) if "flags" in info else set()
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8
    unit = "fp32"
    if precision == "bf16" and "amx_bf16" in flags:
        per_cycle, unit = 1024, "AMX bf16"
    elif precision == "bf16" and "avx512_bf16" in flags:
        per_cycle, unit = 128, "AVX512-BF16"
    threads = torch.get_num_threads()
    return threads * ghz * 1e9 * per_cycle, (
        f"cpu estimate: {threads} threads x {ghz:.2f} GHz x {per_cycle} {unit} FLOP/cycle"
    )


def peak_flops(device: torch.device, precision: str, override_tflops: float = 0.0) -> tuple[float | None, str]:
    """-> (peak FLOP/s or None when unknown, where the number comes from)."""
    if override_tflops > 0:
        return override_tflops * 1e12, "train.peak_tflops"
    if device.type != "cuda":
        return _cpu_peak(precision)
    name = torch.cuda.get_device_name(device)
    for fragment in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if fragment.lower() in name.lower():
            bf16, fp32 = PEAK_TFLOPS[fragment]
            column = "fp32" if precision == "fp32" else "bf16"
            return (fp32 if column == "fp32" else bf16) * 1e12, f"{name}: {column} datasheet peak ({fragment})"
    return None, f"{name}: not in train/flops.py PEAK_TFLOPS; set train.peak_tflops for MFU"


@contextlib.contextmanager
def _restored(model: torch.nn.Module, device: torch.device):
    """Run a throw-away forward/backward: buffers, RNG streams and .grad are put back afterwards."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
        for p in model.parameters():
            p.grad = None


def count_step_flops(model: torch.nn.Module, batch, step: int, autocast, channels_last: bool) -> int:
    """FLOPs of one forward + backward of `model` (a plain G2DModel: not DDP, not compiled) on `batch`."""
    device = batch.image.device
    image = batch.image.contiguous(memory_format=torch.channels_last) if channels_last else batch.image
    with _restored(model, device):
        with FlopCounterMode(display=False) as counter:
            with autocast():
                out = model(image, batch.input_ids, batch.attention_mask, step=step)
            out.loss.backward()
    return counter.get_total_flops()


def mfu(flops_per_sample: float, samples_per_s_per_device: float, peak: float | None) -> float | None:
    return None if not peak else flops_per_sample * samples_per_s_per_device / peak
