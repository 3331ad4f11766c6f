"""The pretraining loop's bookkeeping between log steps: device-side sums (no host sync in the step)
and the log step that reads them once (one all-reduce), writes metrics.jsonl, checks training
health and updates the console.

    progress.add(terms, step)          every step: device ops only (+ the progress bar's counter)
    progress.flush(step, epoch, out)   log steps: the one place that syncs with the device
"""

from __future__ import annotations

import math
import resource
import time

import torch

from common.dist import DistInfo, all_reduce_mean
from common.log import get_logger
from train.flops import mfu
from train.health import STAT_NAMES, embedding_stats

logger = get_logger("train")


class NonFiniteLoss(RuntimeError):
    """A non-finite loss under train.nonfinite=stop (raised at the log step after it happened)."""


def memory_mb(device: torch.device) -> float:
    """Peak device memory in MiB (CUDA), else the process' peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Progress:
    def __init__(
        self,
        cfg,
        dist: DistInfo,
        log,
        health,
        bar,
        scheduler,
        samples_per_step: int,
        flops_per_sample: float,
        peak_flops: float | None,
    ):
        self.run, self.pa_warmup_steps = cfg.train, cfg.model.pa_warmup_steps
        self.decoder_loss_on = cfg.model.decoder_target != "none" and cfg.model.pa_weight != 0  # else VLA only
        self.dist, self.log, self.health, self.bar, self.scheduler = dist, log, health, bar, scheduler
        self.samples_per_step, self.flops_per_sample, self.peak = samples_per_step, flops_per_sample, peak_flops
        device = dist.device
        self.sums = torch.zeros(4, device=device)  # loss, vla, pa, pseudo-mask IoU summed since the last log step
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite step
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self.steps, self.wait_s, self.t_log = 0, 0.0, time.perf_counter()

    def next_batch(self, stream):
        """next(stream), its wait counted as data-loader time (data_wait_frac)."""
        t0 = time.perf_counter()
        batch = next(stream)
        self.wait_s += time.perf_counter() - t0
        return batch

    def add(self, terms: torch.Tensor, step: int) -> None:
        """terms [4] (loss, vla, pa, pseudo-mask pairwise IoU) of step `step` (1-based). Device ops only: a skipped
        (non-finite) step adds 0 and is remembered on the device."""
        finite = torch.isfinite(terms[0])
        self.sums += torch.where(finite, terms, torch.zeros_like(terms))
        self.first_bad = torch.where(
            (self.first_bad < 0) & ~finite, torch.full_like(self.first_bad, step), self.first_bad
        )
        self.skipped += (~finite).long()
        self.steps += 1
        self.bar.update(1)

    def flush(self, step: int, epoch: int, out) -> dict:
        """Log step: raise on a recorded non-finite loss (nonfinite=stop), else write the record
        (losses averaged over the window and ranks, embedding statistics of `out`, the step's
        model output) and reset the window."""
        bad = int(self.first_bad)
        if bad >= 0 and self.run.nonfinite == "stop":
            raise NonFiniteLoss(
                f"non-finite loss at step {bad} (train.nonfinite=stop; set train.nonfinite=skip to skip such steps)"
            )
        # One all-reduce of 8 floats: 3 loss terms, the pseudo-mask IoU and the 4 embedding statistics.
        stats = all_reduce_mean(torch.cat([self.sums / self.steps, embedding_stats(out.image_emb, out.text_emb)]))
        loss, vla, pa, mask_iou, *emb = stats.tolist()
        mask_iou = mask_iou if math.isfinite(mask_iou) else None  # nan: one image per batch, no pair to compare
        dt = time.perf_counter() - self.t_log
        record = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "vla_loss": vla,
            "pa_loss": pa,
            "lr": self.scheduler.get_last_lr()[0],
            "img_per_s": self.steps * self.samples_per_step / dt,
            "data_wait_frac": self.wait_s / dt,
            "mem_mb": memory_mb(self.dist.device),
            "skipped_steps": int(self.skipped),
            "pa_active": step - 1 >= self.pa_warmup_steps and self.decoder_loss_on,
            "pseudo_mask_iou": mask_iou,
        }
        # MFU per device: samples/s on this rank x counted FLOPs / the device's peak.
        record["mfu"] = mfu(self.flops_per_sample, record["img_per_s"] / self.dist.world_size, self.peak)
        record["gflops_per_sample"] = self.flops_per_sample / 1e9
        record["mem_mb_per_sample"] = record["mem_mb"] / self.run.batch_size_per_gpu
        record.update(zip(STAT_NAMES, emb))
        problems = self.health.problems(step, vla, record["img_emb_std"], record["txt_emb_std"], mask_iou)
        if problems:
            record["health"] = problems
            if self.dist.rank == 0:
                for problem in problems:
                    logger.warning("[health] step %d: %s", step, problem)
        self.log.write(record)
        mfu_text = "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{record['img_per_s']:.1f}", mfu=mfu_text)
        # Every rank's file gets the line (the same global losses); the console only rank 0's,
        # printed above the bar (common.log).
        logger.info(
            f"step {step} loss {loss:.4f} (vla {vla:.4f} pa {pa:.4f}) img/s {record['img_per_s']:.1f} "
            f"mfu {mfu_text} mem/sample {record['mem_mb_per_sample']:.1f} MiB "
            f"emb std img {record['img_emb_std']:.4f} txt {record['txt_emb_std']:.4f} "
            f"cos pos {record['pos_cos']:.3f} neg {record['neg_cos']:.3f} "
            f"mask iou {'n/a' if mask_iou is None else f'{mask_iou:.3f}'}"
        )
        self.sums.zero_()
        self.steps, self.wait_s, self.t_log = 0, 0.0, time.perf_counter()
        return record
