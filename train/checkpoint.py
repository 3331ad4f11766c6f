"""Atomic, self-describing checkpoints and exact resume.

A checkpoint holds everything needed to continue bit-for-bit: model, optimiser, scaler, scheduler,
step, RNG states (python, numpy, torch CPU and CUDA), the loader's position and the resolved config.
It is written to a temp file and renamed, so a run killed while saving (SIGKILL included) leaves
the previous checkpoint intact; `resume: auto` picks the newest one that loads.
Everything stored is tensors/lists/dicts of plain types so `torch.load(weights_only=True)` reads it.
Each checkpoint carries a sha256 digest of its content (common.io.payload_digest), checked at every
load: `torch.load` does not check the zip's CRCs, so damaged tensor bytes would otherwise load and
train on silently. A damaged newest checkpoint is skipped by `resume: auto` like a truncated one;
a damaged file named explicitly is an error. Checkpoints written before the digest load with a warning.

Each run has a `run_id` (a new one for a fresh start, the checkpoint's own when resuming), stored in
every checkpoint. Pruning (`keep_last`) deletes only this run's readable checkpoints older than the
one just written, so an unreadable file, another run's checkpoint at a higher step, or the newest
checkpoint itself are never what goes. `claim_checkpoint_dir` refuses to mix two runs in one folder.
"""

from __future__ import annotations

import pickle
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.cli import UserError
from common.io import (
    DigestMismatch,
    DirectoryLock,
    atomic_open,
    pop_and_verify_digest,
    remove_stale_temp_files,
    with_digest,
)
from common.log import get_logger
from common.run_layout import list_checkpoints
from model.image import load_strict

logger = get_logger("train")

# What `train.pretrain` stores; a file without these keys (an exported encoder, another project's
# checkpoint) cannot resume a run.
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "loader", "rng", "config")
# Checkpoints written before run ids existed all count as one run.
LEGACY_RUN_ID = "legacy"


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, refused or of another run/model; or one that
    could not be written. The message names the file."""


def new_run_id() -> str:
    return uuid.uuid4().hex


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ModelState:
    """The model as a checkpoint component: its state dict out, and in strictly (model.image.load_strict),
    so weights that do not fit name the missing, unexpected and wrong-shape keys in one line."""

    def __init__(self, model: torch.nn.Module):
        self.model = model  # the bare model (no DDP / compile wrapper): its keys are the checkpoint's

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_strict(self.model, state, "its model weights", f"{type(self.model).__name__} built from this run's config")


class RngState:
    """Every rank's RNG streams as one checkpoint component, so a resumed multi-rank run continues each
    stream exactly. state_dict() gathers them from all ranks (a collective: call it on every rank);
    load_state_dict() sets this rank's (a checkpoint of a single-process run holds one dict)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def state_dict(self) -> list[dict]:
        if self.world_size == 1:
            return [rng_state()]
        states = [None] * self.world_size
        torch.distributed.all_gather_object(states, rng_state())
        return states

    def load_state_dict(self, state: list[dict] | dict) -> None:
        set_rng_state(state[self.rank] if isinstance(state, list) else state)


def save_checkpoint(path: Path, payload: dict[str, Any], keep_last: int) -> list[Path]:
    """Write `payload` (with "run_id" and "step") atomically to `path`, then prune; returns the pruned.

    A failed write (disk full, read-only folder) leaves no partial file and the earlier checkpoints
    untouched, and is a CheckpointError naming the file.
    """
    try:
        with atomic_open(path, "wb") as fh:
            torch.save(with_digest(payload), fh)
    except OSError as exc:
        raise CheckpointError(
            f"could not write checkpoint {path}: {exc.strerror or exc}; nothing partial "
            "was left and the earlier checkpoints are untouched"
        ) from exc
    _META_CACHE[_meta_key(path)] = str(payload["run_id"]), int(payload["step"])
    return prune_checkpoints(path, payload["run_id"], int(payload["step"]), keep_last)


def prune_checkpoints(newest: Path, run_id: str, step: int, keep_last: int) -> list[Path]:
    """Keep `newest` and this run's `keep_last - 1` latest readable checkpoints before `step`;
    delete this run's older ones. Other runs' and unreadable files are never touched.
    Costs a stat per file: each file's run and step come from checkpoint_meta's cache."""
    mine = []
    for path in list_checkpoints(newest.parent):
        meta = checkpoint_meta(path) if path != newest else None
        if meta is not None and meta[0] == run_id and meta[1] < step:
            mine.append((meta[1], path))
    doomed = [p for _, p in sorted(mine)[: max(0, len(mine) - (keep_last - 1))]]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def _read(path: Path, map_location, mmap: bool) -> tuple[dict, bool]:
    """torch.load with weights_only and the digest checked -> (checkpoint, whether it carried a
    digest); every failure, damage included, turned into a CheckpointError naming `path`."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory; give a step_*.pt file, or set train.output_dir to the run and train.resume=auto"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # weights_only refuses anything but tensors and plain containers: a malicious or foreign pickle.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refused to load {path}: it holds objects other than tensors and plain data ({first})"
        ) from exc
    except Exception as exc:  # torch raises RuntimeError/EOFError/ValueError... for damaged files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"could not read checkpoint {path} (truncated, damaged or not a torch checkpoint): {first}"
        ) from exc
    missing = [k for k in REQUIRED_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(REQUIRED_KEYS)
    if missing:
        raise CheckpointError(
            f"{path} is not a pretraining checkpoint (no {', '.join(missing)}); an exported "
            "encoder or another program's file cannot resume training"
        )
    if (
        isinstance(ckpt["step"], bool)
        or not isinstance(ckpt["step"], int)
        or ckpt["step"] < 0
        or not isinstance(ckpt.get("run_id", LEGACY_RUN_ID), str)
    ):
        raise CheckpointError(
            f"{path} is not a pretraining checkpoint (step {ckpt['step']!r}, run_id {ckpt.get('run_id')!r})"
        )
    try:
        checked = pop_and_verify_digest(ckpt)
    except DigestMismatch as exc:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its content no longer matches the checksum written when it was "
            f"saved ({exc}); resume from an earlier checkpoint"
        ) from exc
    return ckpt, checked


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A pretraining checkpoint (dict with REQUIRED_KEYS) whose digest matches; CheckpointError naming
    the file otherwise. One written before checkpoints carried a digest loads with a warning."""
    path = Path(path)
    ckpt, checked = _read(path, map_location, mmap=False)
    if not checked:
        logger.warning("[checkpoint] %s carries no checksum (written by an older version): loaded unchecked", path)
    _META_CACHE[_meta_key(path)] = str(ckpt.get("run_id", LEGACY_RUN_ID)), int(ckpt["step"])
    return ckpt


# (path, mtime_ns, size) -> (run_id, step) or None. Reading a checkpoint's metadata means loading it
# and checking its digest (a damaged file counts as unreadable: never resumed from, never blocking a
# resume from the one before it); with the cache each file is read once per process, and the files
# this process writes or loads are entered then, so pruning at every save costs a few stat calls.
_META_CACHE: dict[tuple[str, int, int], tuple[str, int] | None] = {}


def _meta_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


def checkpoint_meta(path: Path) -> tuple[str, int] | None:
    """(run_id, step) of a readable checkpoint, None for an unreadable or foreign file."""
    try:
        key = _meta_key(path)
    except OSError:
        return None
    if key not in _META_CACHE:
        try:
            ckpt, _ = _read(path, "cpu", mmap=True)
            _META_CACHE[key] = str(ckpt.get("run_id", LEGACY_RUN_ID)), int(ckpt["step"])
        except CheckpointError:
            _META_CACHE[key] = None
    return _META_CACHE[key]


def find_resume_checkpoint(output_dir: str | Path) -> tuple[Path, dict] | None:
    """Newest checkpoint under `<output_dir>/checkpoints` that loads and matches its checksum;
    truncated or damaged ones are skipped with a warning."""
    for path in reversed(list_checkpoints(Path(output_dir) / "checkpoints")):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:  # a truncated or corrupt file: fall back to the previous one
            logger.warning("[resume] skipping %s", exc)
    return None


def claim_checkpoint_dir(directory: Path, run_id: str, step: int = 0) -> None:
    """Refuse to write this run's checkpoints, continuing from `step`, next to readable ones that
    would mix with them under pruning and `resume=auto`: another run's, or this run's own from after
    `step` (an explicit `train.resume` of an earlier checkpoint: a later kill would resume the
    abandoned branch). Unreadable `step_*.pt` files do not count (never resumed from)."""
    metas = [(p, meta) for p in list_checkpoints(directory) if (meta := checkpoint_meta(p))]
    foreign = [(p, meta) for p, meta in metas if meta[0] != run_id]
    if foreign:
        names = ", ".join(f"{p.name} (step {meta[1]})" for p, meta in foreign[-3:])
        raise CheckpointError(
            f"{directory} holds {len(foreign)} checkpoint(s) of another run ({names}); continue that run "
            "with train.resume=auto, or move them away, or choose a new train.output_dir"
        )
    later = [p.name for p, meta in metas if meta[1] > step]
    if later:
        raise CheckpointError(
            f"{directory} holds this run's checkpoints after step {step} ({', '.join(later[-3:])}); resuming "
            "from an earlier one here would mix the two branches: move the later ones away, or resume "
            "into a new train.output_dir"
        )


class RunDirLock(DirectoryLock):
    """Exclusive lock on `<output_dir>/.lock` for the life of a run (rank 0): a second trainer on the
    same folder fails at once naming the holder's pid, instead of the two pruning each other's
    checkpoints. Under the lock the temp files of killed writers are removed (`self.stale`)."""

    def __init__(self, output_dir: Path):
        super().__init__(
            output_dir,
            ".lock",
            lambda pid: CheckpointError(
                f"{output_dir} is in use by another training run (pid {pid}); wait for it or choose a new "
                "train.output_dir"
            ),
        )
        self.stale = [
            p for sub in ("", "checkpoints", "plots") for p in remove_stale_temp_files(Path(output_dir) / sub)
        ]
