"""G2D pretraining entry point: `torchrun --nproc_per_node=N -m train.pretrain --config X key=value ...`

The loop is deliberately small (nanoGPT style). What each piece costs:
- the step makes no host sync: losses are accumulated on the device and read only on log steps;
  a non-finite loss is recorded on the device (first bad step) and acted on at the next log step;
- frozen BERT layers run without autograd, text is padded per batch (see model/ and pipeline/);
- AdamW(fused=True) and, with fp16, a GradScaler whose inf-check skips the step on the device.

Stopping: SIGTERM and SIGINT (Ctrl-C, or torchrun forwarding either) unwind the run, so a checkpoint
being written is dropped whole (its temp file deleted) and every finished one stays; under torchrun a
worker also stops when its launcher dies (common.dist.exit_with_launcher). One run per output_dir at
a time (a lock), and a fresh run refuses a folder holding another run's checkpoints.
"""

from __future__ import annotations

import itertools
import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common.cli import ArgumentParser, UserError, run_main, stop_on_signal
from common.config import ConfigError, config_to_dict, save_config
from common.dist import DistInfo, cleanup, exit_with_launcher, init_distributed, seed_everything
from common.io import atomic_open, sidecar_path, write_sha256_sidecar
from common.log import get_logger, setup_logging
from common.run_layout import checkpoint_path
from eval.checkpoint import BadCheckpoint, saved_model_fields
from model.config import changed_fields
from model.export import export_unet_state_dicts
from model.registry import build_model
from model.text import load_tokenizer
from pipeline import build_loader
from train.checkpoint import (
    LEGACY_RUN_ID,
    CheckpointError,
    ModelState,
    RngState,
    RunDirLock,
    claim_checkpoint_dir,
    find_resume_checkpoint,
    load_checkpoint,
    new_run_id,
    save_checkpoint,
)
from train.config import PretrainConfig, load_pretrain_config
from train.flops import count_step_flops, peak_flops
from train.health import build_health_check
from train.metrics_log import MetricsLog, require_wandb
from train.optim import build_optimizer, build_scheduler
from train.progress import NonFiniteLoss, Progress
from train.step import TrainStep, compile_for_speed, make_scaler
from train.validate import validate
from train.visualize import save_attention_grid, save_loss_curves

logger = get_logger("train")


def train(cfg: PretrainConfig, dist: DistInfo) -> dict:
    """Run (or resume) pretraining; rank 0 holds the output folder's lock for the whole run."""
    out_dir = Path(cfg.train.output_dir).expanduser()  # YAML does not expand ~ the way a shell does
    for folder in (out_dir, out_dir / "checkpoints"):  # found now, not at the first save
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{folder} exists and is not a directory (train.output_dir={out_dir})")
    if cfg.train.wandb:
        require_wandb()
    lock = None
    if dist.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = RunDirLock(out_dir)
    # After the lock: a second run on the same folder fails before appending to its logs.
    setup_logging(dist.rank, out_dir / "logs", console_all_ranks=cfg.train.log_all_ranks)
    if lock is not None and lock.stale:
        logger.warning(
            "[start] removed %d temp file(s) left by a killed writer: %s",
            len(lock.stale),
            ", ".join(p.name for p in lock.stale[:5]),
        )
    try:
        return _train(cfg, dist, out_dir)
    finally:
        if lock is not None:
            lock.release()


def _resume_source(cfg: PretrainConfig, out_dir: Path) -> tuple[str, tuple[Path, dict] | None]:
    """(run id, (path, checkpoint) or None): the checkpoint this run continues and whose run it is.
    Checked before any model is built, so a bad or foreign checkpoint fails in seconds."""
    run = cfg.train
    found = None
    if run.resume == "auto":
        found = find_resume_checkpoint(out_dir)
    elif run.resume != "none":
        found = (Path(run.resume).expanduser(), load_checkpoint(Path(run.resume).expanduser()))
    run_id, step = new_run_id(), 0
    if found is not None:
        path, ckpt = found
        try:
            saved = saved_model_fields(ckpt["config"], str(path))
        except BadCheckpoint as exc:
            raise CheckpointError(f"{exc}; it cannot resume a run") from None
        changed = changed_fields(saved, cfg.resolved_model)
        if changed:
            raise CheckpointError(
                f"{path} was trained with a different model config ({', '.join(changed)}); "
                "use a new train.output_dir or train.resume=none"
            )
        run_id, step = str(ckpt.get("run_id", LEGACY_RUN_ID)), ckpt["step"]
    claim_checkpoint_dir(out_dir / "checkpoints", run_id, step)
    return run_id, found


@dataclass
class _Run:
    """What a run trains with, built once by _build: the bare model (before DDP / compile), its data,
    the optimiser and its step bookkeeping, and the stateful components a checkpoint holds."""

    model: torch.nn.Module
    tokenizer: Any
    loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    fixed_scale: bool
    accum: int  # micro-batches per optimiser step
    per_step: int  # samples per micro-batch over all ranks
    max_steps: int
    # name -> object with state_dict() / load_state_dict(): _save and _restore both iterate it, in order.
    states: dict[str, Any]


def _train(cfg: PretrainConfig, dist: DistInfo, out_dir: Path) -> dict:
    """Build (or resume) the run, train it to its last step, validate, export."""
    run = cfg.train
    run_id, found = _resume_source(cfg, out_dir)
    if dist.rank == 0:
        save_config(cfg, out_dir / "config.yaml")
    seed_everything(run.seed + dist.rank)
    r = _build(cfg, dist)
    step, epoch = _restore(found, r.states, dist) if found else (0, 0)
    if found is None:
        r.loader.set_epoch(0)
    model = r.model
    if dist.world_size > 1:
        model = DDP(
            model,
            device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            find_unused_parameters=run.find_unused_parameters,
            gradient_as_bucket_view=True,
        )
    train_step = TrainStep(
        model, r.optimizer, r.scheduler, r.scaler, r.fixed_scale, run.precision, run.grad_clip, run.channels_last
    )
    log = MetricsLog(
        out_dir / "metrics.jsonl",
        step,
        dist.rank == 0,
        run.tensorboard,
        run.wandb,
        run.wandb_project,
        run_id,
        config_to_dict(cfg),
    )
    health = build_health_check(cfg, dist.world_size, r.max_steps)
    step = _loop(cfg, dist, out_dir, run_id, r, train_step, log, health, step, epoch)
    result = _validate_and_log(cfg, r.model, r.tokenizer, dist, log, step)
    log.close()
    if dist.rank == 0:
        _export(r.model, out_dir, step)
    return {"step": step, "val": result}


def _build(cfg: PretrainConfig, dist: DistInfo) -> _Run:
    """Model, tokenizer, loader, optimiser, scheduler and scaler, in this order (the seeded RNG
    draws of a run depend on it), and the checkpoint components over them."""
    run = cfg.train
    model = build_model(cfg.resolved_model).to(dist.device)
    if run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if run.sync_bn and dist.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    tokenizer = load_tokenizer(cfg.model.text_model)
    loader = build_loader(cfg.resolved_data, "train", dist, tokenizer=tokenizer)
    per_step = run.batch_size_per_gpu * dist.world_size
    accum = 1 if run.global_batch_size <= 0 else run.global_batch_size // per_step
    if accum < 1 or accum * per_step != (run.global_batch_size or per_step):
        raise ConfigError(
            f"train.global_batch_size={run.global_batch_size} is not a multiple of "
            f"batch_size_per_gpu x world_size = {per_step}"
        )
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise UserError(
            f"the train split of {cfg.data.shards} yields {len(loader)} batches per rank, "
            f"fewer than the {accum} needed for one optimiser step; lower the batch size"
        )
    max_steps = run.max_steps or run.epochs * steps_per_epoch
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, max_steps)
    scaler, fixed_scale = make_scaler(dist.device, run.precision, run.nonfinite == "skip")
    states = {
        "model": ModelState(model),
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "loader": loader,
        "rng": RngState(dist.rank, dist.world_size),
    }
    return _Run(model, tokenizer, loader, optimizer, scheduler, scaler, fixed_scale, accum, per_step, max_steps, states)


def _loop(cfg, dist: DistInfo, out_dir: Path, run_id: str, r: _Run, train_step, log, health, step, epoch) -> int:
    """Train from `step` to r.max_steps: log, plot, validate and checkpoint on their schedules.
    -> the last step."""
    run, main, model = cfg.train, dist.rank == 0, train_step.model

    def batches():
        nonlocal epoch
        while True:
            yield from r.loader
            epoch += 1
            r.loader.set_epoch(epoch)

    stream, flops_per_sample, peak = _count_flops_and_compile(cfg, dist, r, train_step, batches(), step)
    bar = tqdm(total=r.max_steps, initial=step, disable=not (main and run.progress), unit="step")
    progress = Progress(cfg, dist, log, health, bar, r.scheduler, r.accum * r.per_step, flops_per_sample, peak)
    model.train()
    while step < r.max_steps:
        micro_batches = [progress.next_batch(stream) for _ in range(r.accum)]
        terms, out = train_step(micro_batches, step)
        step += 1
        progress.add(terms, step)
        if step % run.log_every == 0 or step == r.max_steps:
            progress.flush(step, epoch, out)  # the one place that syncs with the device
            if main and run.plot_every and (step % run.plot_every == 0 or step == r.max_steps):
                batch = micro_batches[-1]
                save_attention_grid(out_dir / "plots" / f"step_{step:08d}.png", batch.image, out, batch.keys)
        if run.val_every and step % run.val_every == 0 and step < r.max_steps:
            _validate_and_log(cfg, r.model, r.tokenizer, dist, log, step)
            model.train()
        if step % run.checkpoint_every == 0 or step == r.max_steps:
            _save(cfg, r.states, step, dist, out_dir, run_id)
    bar.close()
    return step


def _count_flops_and_compile(cfg, dist: DistInfo, r: _Run, train_step, stream, step: int):
    """Model FLOPs per sample, counted once on the run's first batch (its padded text length) with the
    plain model, before compiling; state is restored, so the run is unchanged (train/flops.py). Then
    compile as train.compile / train.cuda_graphs ask.
    -> (the batch stream with that first batch put back, FLOPs per sample, peak FLOP/s or 0)."""
    run = cfg.train
    flops_per_sample, flops_len = 0.0, 0
    if step < r.max_steps:
        first = next(stream)
        stream = itertools.chain([first], stream)
        flops = count_step_flops(r.model, first, step, train_step.autocast, run.channels_last)
        flops_per_sample, flops_len = flops / first.image.shape[0], first.input_ids.shape[1]
    peak, peak_source = peak_flops(dist.device, run.precision, run.peak_tflops)
    train_step.cuda_graphs, compiled = compile_for_speed(train_step.model, run.compile, run.cuda_graphs, dist.device)
    logger.info(
        "[step] %.2f GFLOP per sample (forward + backward, text padded to %d); peak %s (%s)%s",
        flops_per_sample / 1e9,
        flops_len,
        f"{peak / 1e12:.1f} TFLOP/s" if peak else "unknown",
        peak_source,
        f"; {compiled}" if compiled else "",
    )
    return stream, flops_per_sample, peak


def _export(model: torch.nn.Module, out_dir: Path, step: int) -> None:
    """The encoder and U-Net state dicts for downstream code (model/export.py), each with a
    `<file>.sha256` sidecar (a key inside would break their strict loading elsewhere), and the loss curves."""
    encoder_sd, unet_sd = export_unet_state_dicts(model)
    for name, sd in (("g2d_encoder.pth", encoder_sd), ("g2d_encoder_decoder.pth", unet_sd)):
        sidecar_path(out_dir / name).unlink(missing_ok=True)  # never a stale sidecar beside a new file
        with atomic_open(out_dir / name, "wb") as fh:
            torch.save(sd, fh)
        write_sha256_sidecar(out_dir / name)
    try:
        curves = save_loss_curves(out_dir / "metrics.jsonl", out_dir / "plots" / "loss_curves.png")
        logger.info("[done] step %d; loss curves: %s", step, curves)
    except ValueError as exc:  # e.g. metrics.jsonl deleted before a resume: the weights still count
        logger.warning("[done] step %d; no loss curves: %s", step, exc)


def _restore(found: tuple[Path, dict], states: dict[str, Any], dist: DistInfo) -> tuple[int, int]:
    """Load a resume checkpoint ((path, ckpt) from _resume_source) into the run's stateful components
    in place -> (step, epoch) it stopped at."""
    path, ckpt = found
    try:
        for name, component in states.items():
            component.load_state_dict(ckpt[name])
        step, epoch = int(ckpt["step"]), int(ckpt["loader"]["epoch"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        # A checkpoint with the right keys but contents that do not fit (edited, or written by
        # another version): name it instead of a deep traceback from load_state_dict.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"could not restore the run from {path}: {first}") from exc
    if dist.rank == 0:
        logger.info("[resume] %s at step %d (epoch %d)", path, step, epoch)
    return step, epoch


def _validate_and_log(cfg, model, tokenizer, dist, log, step) -> dict:
    metrics = validate(model, cfg, tokenizer, dist, max_batches=cfg.train.val_batches)
    if dist.rank == 0 and metrics:
        log.write({"step": step, **{f"val/{k}": v for k, v in metrics.items()}})
    return metrics


def _save(cfg, states: dict[str, Any], step: int, dist: DistInfo, out_dir: Path, run_id: str) -> None:
    # Every rank takes the state dicts (cheap: references, except the RNG component's all-gather,
    # which every rank must join); rank 0 writes them.
    payload = {name: component.state_dict() for name, component in states.items()}
    if dist.rank == 0:
        payload.update(step=step, config=config_to_dict(cfg), run_id=run_id)
        save_checkpoint(checkpoint_path(out_dir, step), payload, cfg.train.keep_last)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML under configs/pretrain/")
    parser.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    cfg = load_pretrain_config(args.config, args.overrides)
    # The command's last line in the house's one-line `error: ...` form; a half-written checkpoint is deleted.
    stop = stop_on_signal("every finished checkpoint is intact, resume with train.resume=auto")
    previous = signal.signal(signal.SIGTERM, stop)  # restored below for in-process callers
    exit_with_launcher()
    try:
        dist = init_distributed()
        result = train(cfg, dist)
        if dist.rank == 0:
            # The command's result on stdout (machine-readable), not a log line.
            print(json.dumps({"final_step": result["step"], **result["val"]}, indent=1))
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)  # the house's one-line ending, as common.cli's
        sys.exit(3)
    finally:
        cleanup()
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    run_main(main)
