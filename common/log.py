"""Python `logging` set up once per process for the entry points (named `log`, not `logging`, so it
never shadows the standard module).

Rank 0 logs to the console (stderr) by default, every rank appends to `<output_dir>/logs/rank<N>.log`:
a multi-rank run keeps each worker's own account (its warnings, its resume line) without eight ranks
interleaving on one terminal. Console lines go through `tqdm.write`, so they print above a running
progress bar instead of breaking it. Cost: one formatted line per log call, nothing per step.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm import tqdm

ROOT_LOGGER = "g2d"
FORMAT = "%(asctime)s %(levelname)s [rank %(rank)d] %(name)s: %(message)s"


class _TqdmConsole(logging.Handler):
    """A console handler that prints through tqdm, keeping an active bar intact. It looks sys.stderr up
    at each line, so a redirected stderr (a test's capture, a caller's wrapper) is honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's contract: a broken handler reports, never raises into the caller
            self.handleError(record)


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def get_logger(name: str) -> logging.Logger:
    """A child of the project's logger, e.g. get_logger("train") -> "g2d.train"."""
    return logging.getLogger(f"{ROOT_LOGGER}.{name}")


def setup_logging(
    rank: int, log_dir: str | Path | None = None, console_all_ranks: bool = False, level: int = logging.INFO
) -> Path | None:
    """Configure the "g2d" logger for this process; returns the rank's log file (None without log_dir).

    Calling it again (a second run in the same process, as tests do) replaces the handlers it
    added before, so lines are neither duplicated nor written to the previous run's folder.
    """
    root = logging.getLogger(ROOT_LOGGER)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    root.propagate = False  # the project's lines are formatted here, not again by a host app
    formatter = logging.Formatter(FORMAT, datefmt="%H:%M:%S")
    rank_filter = _RankFilter(rank)
    handlers: list[logging.Handler] = []
    if rank == 0 or console_all_ranks:
        handlers.append(_TqdmConsole())
    path = None
    if log_dir is not None:
        path = Path(log_dir) / f"rank{rank}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, encoding="utf-8"))  # appends: a resumed run continues it
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(rank_filter)
        root.addHandler(handler)
    return path
