"""One optimiser step (forward/backward over `accum` micro-batches, clip, update), shared by the
training loop and `make bench-train` so the benchmark times exactly what training runs.

No host sync: loss terms come back as a device tensor; with a GradScaler the fused optimiser skips
a non-finite update on the device.
"""
from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def make_scaler(device: torch.device, precision: str, skip_nonfinite: bool) -> tuple[torch.amp.GradScaler, bool]:
    """(scaler, fixed_scale). fp16 needs dynamic loss scaling; with skip-on-non-finite in bf16/fp32
    a scaler at a fixed scale of 1 is used only for its on-device inf check."""
    enabled = precision == "fp16" or skip_nonfinite
    scaler = torch.amp.GradScaler(device.type, enabled=enabled,
                                  init_scale=2.0**16 if precision == "fp16" else 1.0)
    return scaler, enabled and precision != "fp16"


class TrainStep:
    def __init__(self, model, optimizer, scheduler, scaler, fixed_scale: bool, precision: str,
                 grad_clip: float, channels_last: bool):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.scaler, self.fixed_scale = scaler, fixed_scale
        self.grad_clip, self.channels_last = grad_clip, channels_last
        self.params = [p for p in model.parameters() if p.requires_grad]
        dtype = AMP_DTYPES[precision]
        device_type = next(model.parameters()).device.type
        self.autocast = (lambda: torch.autocast(device_type, dtype=dtype)) if dtype else contextlib.nullcontext

    def __call__(self, batches: list, step: int):
        """Run one optimiser step over the micro-batches; returns ([loss, vla, pa] averaged, last output)."""
        accum = len(batches)
        sums = None
        for i, batch in enumerate(batches):
            image = batch.image.contiguous(memory_format=torch.channels_last) if self.channels_last else batch.image
            # Gradients are all-reduced only on the last micro-batch.
            sync = (self.model.no_sync() if isinstance(self.model, DDP) and i < accum - 1
                    else contextlib.nullcontext())
            with sync, self.autocast():
                out = self.model(image, batch.input_ids, batch.attention_mask, step=step)
            self.scaler.scale(out.loss / accum).backward()
            terms = torch.stack([out.loss, out.vla_loss, out.pa_loss]).detach().float() / accum
            sums = terms if sums is None else sums + terms
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update(1.0 if self.fixed_scale else None)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return sums, out
