"""Where a pretraining run keeps its checkpoints: the one naming that the trainer writes and the
evaluation finds (train/checkpoint.py and eval/checkpoint.py both use it; common is the lowest layer
both may import).

    <output_dir>/checkpoints/step_00001000.pt      zero-padded step, so names sort by step
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_DIR = "checkpoints"
CKPT_RE = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """`step_*.pt` files in `directory` (a run's checkpoints folder), oldest first (readable or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if CKPT_RE.match(p.name) and p.is_file())


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """Highest-step `checkpoints/step_*.pt` of a run directory (not checked for readability)."""
    found = list_checkpoints(Path(run_dir) / CHECKPOINT_DIR)
    return found[-1] if found else None
