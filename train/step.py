"""One optimiser step (forward/backward over `accum` micro-batches, clip, update), shared by the
training loop and `make bench-train` so the benchmark times exactly what training runs.

No host sync: loss terms come back as a device tensor; with a GradScaler the fused optimiser skips
a non-finite update on the device. The PA warm-up switch is read from the host step counter.
Besides the loss terms each step returns the pseudo-masks' mean pairwise IoU (train.health), their
collapse signal, also a device tensor.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from model.export import unwrap
from train.health import pairwise_mask_iou

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def make_scaler(device: torch.device, precision: str, skip_nonfinite: bool) -> tuple[torch.amp.GradScaler, bool]:
    """(scaler, fixed_scale). fp16 needs dynamic loss scaling; with skip-on-non-finite in bf16/fp32
    a scaler at a fixed scale of 1 is used only for its on-device inf check."""
    enabled = precision == "fp16" or skip_nonfinite
    scaler = torch.amp.GradScaler(device.type, enabled=enabled, init_scale=2.0**16 if precision == "fp16" else 1.0)
    return scaler, enabled and precision != "fp16"


def find_ddp(model: torch.nn.Module) -> DDP | None:
    """The DDP wrapper of `model`, also when torch.compile wrapped the DDP model (`_orig_mod`)."""
    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, DDP) else None


def compile_for_speed(
    model: torch.nn.Module, compile: bool, cuda_graphs: bool, device: torch.device, backend: str = "inductor"
) -> tuple[bool, str]:
    """Compile the G2DModel's parts in place (G2DModel.compile_parts) as `train.compile` /
    `train.cuda_graphs` ask. CUDA graphs (torch.compile mode="reduce-overhead": one graph replay per
    compiled part instead of hundreds of kernel launches) exist only on a GPU; on a CPU the switch is
    a no-op that says so. -> (CUDA graphs in use, a log line; "" when nothing was asked)."""
    graphs = cuda_graphs and device.type == "cuda"
    notes = []
    if cuda_graphs and not graphs:
        notes.append(
            f"train.cuda_graphs: no CUDA device ({device.type}), so no CUDA graphs; the step runs without them"
        )
    if compile or graphs:
        mode = "reduce-overhead" if graphs else None
        unwrap(model).compile_parts(mode=mode, backend=backend)
        notes.append(
            f"torch.compile (mode={mode or 'default'}, backend={backend}) of the image tower, BERT layers and PA loss"
        )
    return graphs, "; ".join(notes)


class TrainStep:
    def __init__(
        self,
        model,
        optimizer,
        scheduler,
        scaler,
        fixed_scale: bool,
        precision: str,
        grad_clip: float,
        channels_last: bool,
        cuda_graphs: bool = False,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        # CUDA-graph trees reuse their output memory on the next replay: each step is marked as a new
        # iteration so outputs of the previous one (already reduced to `sums`) may be overwritten.
        self.cuda_graphs = cuda_graphs
        self.scaler, self.fixed_scale = scaler, fixed_scale
        self.grad_clip, self.channels_last = grad_clip, channels_last
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ddp = find_ddp(model)
        # PA warm-up as G2D's code runs it: the decoder gets no gradient at all, so AdamW keeps no
        # state for it and the first update after the switch has step-1 bias correction. The model
        # keeps PA in the graph at weight 0 (DDP needs every parameter used); dropping those zero
        # grads before the update costs a loop over ~30 tensors on the steps where the decoder does
        # not train: the warm-up, and every step of a VLA-only run (decoder_target=none or
        # pa_weight=0), whose decoder therefore stays exactly at its initialisation.
        core = unwrap(model)
        self.decoder_trains = core.decoder_trains
        self.pa_params = core.pa_parameters()
        dtype = AMP_DTYPES[precision]
        device_type = next(model.parameters()).device.type
        self.autocast = (lambda: torch.autocast(device_type, dtype=dtype)) if dtype else contextlib.nullcontext

    def __call__(self, batches: list, step: int):
        """Run one optimiser step over the micro-batches; returns ([loss, vla, pa, pseudo-mask IoU]
        averaged over the micro-batches, last output)."""
        accum = len(batches)
        sums = None
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        for i, batch in enumerate(batches):
            image = batch.image.contiguous(memory_format=torch.channels_last) if self.channels_last else batch.image
            # Gradients are all-reduced only on the last micro-batch.
            sync = self.ddp.no_sync() if self.ddp is not None and i < accum - 1 else contextlib.nullcontext()
            with sync, self.autocast():
                out = self.model(image, batch.input_ids, batch.attention_mask, step=step)
            self.scaler.scale(out.loss / accum).backward()
            losses = torch.stack([out.loss, out.vla_loss, out.pa_loss]).detach().float()
            terms = torch.cat([losses, pairwise_mask_iou(out.pseudo_mask)[None]]) / accum
            sums = terms if sums is None else sums + terms
        if not self.decoder_trains(step):
            for p in self.pa_params:
                p.grad = None
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update(1.0 if self.fixed_scale else None)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return sums, out
