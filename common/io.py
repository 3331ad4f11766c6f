"""Atomic writes: a reader never sees a half-written file (temp file in the same dir + rename)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask, read without changing it (/proc on Linux; os.umask's set-and-restore,
    which is not thread-safe, only where /proc is absent)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file next to `path`; on success fsync + rename over `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; a finished file gets what open() would give it (0666 minus the
        # umask), so a dataset or run directory shared with a group stays readable to it.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete the temp files (`.<name>.<random>.tmp`) that `atomic_open` left in `directory` when its
    writer was killed; returns them. Call it only while no other writer can be using the directory
    (e.g. under the packer's output lock): a live writer's temp file has the same shape."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = sorted(p for p in directory.glob(".*.tmp") if p.is_file() and not p.is_symlink())
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class DirectoryLock:
    """Exclusive `fcntl.flock` on `<directory>/<name>` for one writer of a directory (a packer's
    output, a training run's folder). A second holder fails at once with `busy_error(pid)`; the
    holder's pid is written into the lock file and the file is emptied on release (identical runs leave
    identical trees). The kernel drops the lock when its holder dies, so a killed writer never leaves
    the directory locked. The file itself stays: deleting it would race with a writer that just
    opened it. Under the lock, `remove_stale_temp_files` can run safely."""

    def __init__(self, directory: str | Path, name: str, busy_error: Callable[[str], Exception]):
        self.path = Path(directory) / name
        self._fh = open(self.path, "a+", encoding="ascii")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "unknown"
            self._fh.close()
            raise busy_error(holder) from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"{os.getpid()}\n")
        self._fh.flush()

    def release(self) -> None:
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.close()  # closing the descriptor releases the flock


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
