"""Where logged metrics go: `<output_dir>/metrics.jsonl` (always, rank 0), TensorBoard event files
(`train.tensorboard=true`, under `<output_dir>/tensorboard/`) and Weights & Biases (`train.wandb=true`,
only when the `wandb` package is installed; it is not a dependency). One `write(record)` per log
step feeds all of them, so they always show the same numbers.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from pathlib import Path

from common.cli import UserError
from common.io import atomic_write_text
from common.log import get_logger

logger = get_logger("train")


def require_wandb() -> None:
    """Fail before any model is built when `train.wandb=true` cannot work."""
    if importlib.util.find_spec("wandb") is None:
        raise UserError(
            "train.wandb=true but the wandb package is not installed; "
            "`.venv/bin/pip install wandb` (and `wandb login`), or set train.wandb=false"
        )


def _scalars(record: dict) -> dict[str, float]:
    """The record's finite numbers (bools are flags, not curves; `step` is the x axis)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class MetricsLog:
    """`<output_dir>/metrics.jsonl`, one object per logged step (rank 0 only). On resume, lines
    past the resumed step (logged before a crash) are dropped so the file reads as one run, and so
    is a line cut short by a kill in the middle of an append (it is not JSON). TensorBoard drops the
    same steps (`purge_step`); a W&B run is resumed by the run id of the output folder."""

    def __init__(
        self,
        path: Path,
        resume_step: int,
        enabled: bool,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "g2d",
        run_id: str = "",
        config: dict | None = None,
    ):
        self.path, self.enabled, self.tb, self.wandb_run = path, enabled, None, None
        if not enabled:
            return
        kept = []
        if path.is_file() and resume_step > 0:
            for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
                if not ln.strip():
                    continue
                try:
                    record = json.loads(ln)
                except json.JSONDecodeError:
                    logger.warning("[resume] dropping a cut-off line of %s: %r", path, ln[:60])
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= resume_step:
                    kept.append(ln)
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked

            self.tb = SummaryWriter(
                str(path.parent / "tensorboard"), purge_step=resume_step + 1 if resume_step > 0 else None
            )
        if wandb:
            require_wandb()
            module = importlib.import_module("wandb")
            self.wandb_run = module.init(
                project=wandb_project, id=run_id or None, resume="allow", dir=str(path.parent), config=config or {}
            )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        scalars = _scalars(record)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()  # one flush per log step: the curves are current while the run goes
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
