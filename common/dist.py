"""torch.distributed in one place: process-group setup from torchrun's environment, and the few
collectives the rest of the code needs (a gradient-carrying all-gather for global contrastive
negatives, a mean all-reduce for logging).

Every helper also works in a single process that torchrun did not launch (world size 1, no process
group): it then does nothing, so the same training/eval code runs on a laptop and on 16 GPUs.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from common.cli import UserError


@dataclass
class DistInfo:
    rank: int  # global rank, 0..world_size-1
    world_size: int
    local_rank: int  # rank on this node: picks the GPU
    device: torch.device  # cuda:<local_rank> when CUDA is available, else cpu


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's RANK/WORLD_SIZE/LOCAL_RANK (+ MASTER_ADDR/PORT).

    Not launched by torchrun (no RANK/WORLD_SIZE in the environment): a single process, no group.
    backend None -> nccl when CUDA is available, else gloo. Calling it twice is harmless.
    """
    local_rank = _env_int("LOCAL_RANK", 0)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        # Before the group exists, so NCCL's communicator and every default allocation use this GPU.
        torch.cuda.set_device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(rank=0, world_size=1, local_rank=local_rank, device=device)
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if not is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        # device_id makes NCCL connect eagerly (and bind the group to this GPU) instead of on the
        # first collective, so a misconfigured node fails here with a clear trace.
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def exit_with_launcher(poll_s: float = 1.0, grace_s: float = 30.0) -> threading.Thread | None:
    """Under torchrun, stop this worker when its launcher dies; returns the watchdog thread.

    torchrun starts workers in their own session, so a SIGKILLed launcher (or a closed terminal)
    leaves them training and writing checkpoints with nobody to stop them. A daemon thread polls
    the parent pid (one getppid per `poll_s`, nothing measurable) and, once the worker has been
    re-parented, sends it SIGTERM, which the entry point turns into a clean unwind. If the main
    thread is stuck in C code (a collective waiting for a dead peer) it exits hard after `grace_s`.
    Polling rather than prctl(PR_SET_PDEATHSIG): that signal fires when the parent THREAD that
    spawned the worker exits, which need not be the launcher's death.
    Not under torchrun (no TORCHELASTIC_RUN_ID): nothing, so `nohup python -m ...` keeps working.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        print(f"error: the launcher (pid {launcher}) is gone; stopping this worker", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(128 + signal.SIGTERM)

    thread = threading.Thread(target=watch, name="launcher-watchdog", daemon=True)
    thread.start()
    return thread


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather in forward; in backward each rank gets the SUM over ranks of the gradients w.r.t.
    its own slice (every rank's loss used this rank's rows as negatives).

    With DDP averaging parameter gradients over ranks, sum-here + mean-there gives exactly the
    gradient of the mean of the per-rank losses, i.e. of the loss on the global batch.
    The backward uses all_reduce + slice rather than reduce_scatter because gloo has no
    reduce_scatter; the tensor is [world*B, 128], so the extra traffic is negligible.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.batch = dist.get_rank(), tensor.shape[0]
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """[B, ...] on every rank -> [world_size*B, ...] in rank order, differentiable.

    Every rank must pass the same B (the loaders drop the last partial batch).
    Single process: returns `tensor` itself.
    """
    if get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of `tensor` (a new tensor, no gradient); the tensor itself in a single process."""
    if get_world_size() == 1:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (pretraining seeds seed + rank)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
