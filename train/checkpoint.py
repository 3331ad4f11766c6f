"""Atomic, self-describing checkpoints and exact resume.

A checkpoint holds everything needed to continue bit-for-bit: model, optimiser, scaler, scheduler,
step, RNG states (python, numpy, torch CPU and CUDA), the loader's position and the resolved config.
It is written to a temp file and renamed, so a run killed while saving (SIGKILL included) leaves
the previous checkpoint intact; `resume: auto` picks the newest one that loads.
Everything stored is tensors/lists/dicts of plain types so `torch.load(weights_only=True)` reads it.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.io import atomic_open

CKPT_RE = re.compile(r"^step_(\d{8})\.pt$")


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
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


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}.pt"


def save_checkpoint(path: Path, payload: dict[str, Any], keep_last: int) -> None:
    with atomic_open(path, "wb") as fh:
        torch.save(payload, fh)
    if keep_last > 0:
        for old in list_checkpoints(path.parent)[:-keep_last]:
            old.unlink(missing_ok=True)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if CKPT_RE.match(p.name))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def find_resume_checkpoint(output_dir: str | Path) -> tuple[Path, dict] | None:
    """Newest checkpoint under `<output_dir>/checkpoints` that loads; damaged ones are skipped."""
    for path in reversed(list_checkpoints(Path(output_dir) / "checkpoints")):
        try:
            return path, load_checkpoint(path)
        except Exception as exc:  # a truncated or corrupt file: fall back to the previous one
            print(f"[resume] skipping unreadable checkpoint {path}: {exc}")
    return None
