"""Worker for tests/test_make_targets.py's launcher tests, light to import (no torch):

    python -m tools.launch --nproc 2 tests.launch_worker <user|crash|kill|ok|wait> [ready_dir]

user: every rank raises a UserError naming itself; crash: rank 1 raises a RuntimeError (a bug) while
rank 0 waits; kill: rank 1 dies by SIGKILL while rank 0 waits; ok: every rank prints a line, exit 0;
wait: every rank touches <ready_dir>/rank<N> and waits (to be stopped).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from common.cli import UserError, run_main


def main(argv: list[str]) -> None:
    mode, rank = argv[0], int(os.environ["RANK"])
    if mode == "user":
        raise UserError(f"bad input seen by rank {rank}")
    if mode == "ok":
        print(f"rank {rank} ok", flush=True)
        return
    if mode == "wait":
        (Path(argv[1]) / f"rank{rank}").touch()
    elif rank == 1:
        if mode == "crash":
            raise RuntimeError("boom on rank 1")
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)  # the launcher stops this rank once its peer failed


if __name__ == "__main__":
    run_main(main)
