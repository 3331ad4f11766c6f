"""Optimiser and learning-rate schedule.

AdamW with `fused=True` is the default: one kernel for the whole parameter list instead of a
dozen per tensor, and it lets GradScaler skip a non-finite step on the device (no host sync).
apex's FusedAdam/FusedLAMB are used only when asked for and importable (apex is not on PyPI).
Weight decay never applies to norms, biases, embeddings or positional tables (decaying a BN scale
or a positional embedding towards zero only hurts), which is the usual practice; G2D's own code
decays everything with wd 1e-8, which is numerically the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from common.cli import UserError
from common.config import at_least, checked, one_of

OPTIMIZERS = ("adamw", "apex_fused_adam", "apex_fused_lamb")
SCHEDULES = ("warmup_cosine", "cosine_restarts", "constant")


# Each range is declared on its field and read by common.config.check_fields when the config loads.
@dataclass
class OptimConfig:
    name: str = one_of("adamw", OPTIMIZERS)
    lr: float = checked(2e-4, "> 0", lambda v: v > 0)  # paper 2e-4; official code 2e-5
    weight_decay: float = at_least(0, 1e-8)
    betas: tuple[float, float] = checked((0.9, 0.999), "two values in [0, 1)", lambda v: all(0 <= b < 1 for b in v))
    eps: float = checked(1e-8, "> 0", lambda v: v > 0)
    fused: bool = True  # torch AdamW(fused=True); falls back to foreach if unsupported
    schedule: str = one_of("warmup_cosine", SCHEDULES)  # warmup_cosine (paper) | cosine_restarts (code) | constant
    warmup_steps: int = at_least(0, 0, " (0 = 3% of the steps)")  # linear warm-up length (warmup_cosine)
    min_lr: float = at_least(0, 1e-8)
    restart_period: int = at_least(1, 200)  # T_0 of CosineAnnealingWarmRestarts, in optimiser steps


NO_DECAY_HINTS = ("bias", "norm", "bn", "embed", "positional", "pos_emb", "logit_scale", "temperature")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lname = name.lower()
        if p.ndim <= 1 or any(h in lname for h in NO_DECAY_HINTS):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=cfg.fused, foreach=None if cfg.fused else True
        )
    if cfg.name in ("apex_fused_adam", "apex_fused_lamb"):
        try:
            from apex.optimizers import FusedAdam, FusedLAMB
        except ImportError as exc:
            raise UserError(
                f"optim.name={cfg.name} needs NVIDIA apex (built from source with --cuda_ext; the PyPI "
                "package named 'apex' is unrelated). Use optim.name=adamw (fused torch AdamW)."
            ) from exc
        cls = FusedAdam if cfg.name == "apex_fused_adam" else FusedLAMB
        kwargs = {"adam_w_mode": True} if cls is FusedAdam else {}
        return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kwargs)
    raise ValueError(f"unknown optim.name {cfg.name!r}; choose adamw, apex_fused_adam, apex_fused_lamb")


def warmup_length(cfg: OptimConfig, max_steps: int) -> int:
    """Steps of linear lr warm-up: warmup_cosine's (0 = 3% of the run); the other schedules have none."""
    if cfg.schedule != "warmup_cosine":
        return 0
    return cfg.warmup_steps or max(1, round(0.03 * max_steps))


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of cfg.lr at optimiser step `step` (0-based)."""
    floor = cfg.min_lr / cfg.lr
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine_restarts":
        t = (step % cfg.restart_period) / cfg.restart_period
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "warmup_cosine":
        warmup = warmup_length(cfg, max_steps)
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    raise ValueError(f"unknown optim.schedule {cfg.schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, max_steps))
