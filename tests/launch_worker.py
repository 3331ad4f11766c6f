"""Worker for tests/test_make_targets.py's launcher tests, light to import (no torch):

    python -m tools.launch --nproc 2 tests.launch_worker <user|crash|kill|ok|wait|first> [ready_dir]

user: every rank raises a UserError naming itself; crash: rank 1 raises a RuntimeError (a bug) while
rank 0 waits; kill: rank 1 dies by SIGKILL while rank 0 waits; ok: every rank prints a line, exit 0;
wait: every rank touches <ready_dir>/rank<N> and waits (to be stopped); first: rank 1 takes the
trainer's SIGTERM handler (common.cli.stop_on_signal), touches <ready_dir>/rank1 and waits, and rank 0
then raises a UserError (the launcher stops rank 1 with SIGTERM).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from common.cli import UserError, run_main, stop_on_signal


def main(argv: list[str]) -> None:
    mode, rank = argv[0], int(os.environ["RANK"])
    if mode == "user":
        raise UserError(f"bad input seen by rank {rank}")
    if mode == "ok":
        os.write(1, f"rank {rank} ok\n".encode())  # one write: the ranks share stdout
        return
    if mode == "first":
        ready = Path(argv[1]) / "rank1"
        if rank == 1:
            signal.signal(signal.SIGTERM, stop_on_signal("resume with train.resume=auto"))
            ready.touch()
            time.sleep(120)  # the launcher stops this rank once rank 0 failed
            return
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise UserError("bad input seen by rank 0 only")
    if mode == "wait":
        (Path(argv[1]) / f"rank{rank}").touch()
    elif rank == 1:
        if mode == "crash":
            raise RuntimeError("boom on rank 1")
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)  # the launcher stops this rank once its peer failed


if __name__ == "__main__":
    run_main(main)
