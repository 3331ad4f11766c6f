"""Atomic writes: a reader never sees a half-written file (temp file in the same dir + rename).
Checksums: a file's sha256, a checkpoint payload's digest carried inside it, a sidecar `<file>.sha256`."""

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


def payload_digest(payload: Any) -> str:
    """sha256 over a checkpoint payload's content: every tensor's dtype, shape and bytes and every
    plain value, each under its path in the nested dicts/lists, in the payload's own order.

    `torch.load` does not check the zip CRCs, so damaged tensor bytes load silently; a digest stored
    at save and recomputed at load catches them. It hashes the loaded objects rather than the file,
    so it can be stored inside the file it covers. Costs one pass over the tensors (a device tensor
    is copied to the host one at a time).
    """
    import torch  # here, not at the top: the packers import common.io and need no torch

    h = hashlib.sha256()

    def feed(obj: Any, path: str) -> None:
        if isinstance(obj, torch.Tensor):
            flat = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"{path}:tensor:{flat.dtype}:{tuple(obj.shape)}\n".encode())
            h.update(flat.view(torch.uint8).numpy().data)  # the tensor's own memory, not a copy
        elif isinstance(obj, dict):
            h.update(f"{path}:dict:{len(obj)}\n".encode())
            for key, value in obj.items():
                feed(value, f"{path}/{key!r}")
        elif isinstance(obj, (list, tuple)):
            h.update(f"{path}:seq:{len(obj)}\n".encode())
            for i, value in enumerate(obj):
                feed(value, f"{path}/{i}")
        else:
            h.update(f"{path}:{type(obj).__name__}:{obj!r}\n".encode())

    feed(payload, "")
    return "sha256:" + h.hexdigest()


# The key under which a checkpoint payload carries its own payload_digest.
DIGEST_KEY = "checksum"


class DigestMismatch(ValueError):
    """Content that no longer matches the digest written with it: the file was damaged after saving."""


def with_digest(payload: dict) -> dict:
    """`payload` plus its payload_digest under DIGEST_KEY (added last, so a reader that pops it sees
    the dict in the order the digest was computed in)."""
    if DIGEST_KEY in payload:
        raise ValueError(f"payload already holds a {DIGEST_KEY!r} key")
    return {**payload, DIGEST_KEY: payload_digest(payload)}


def pop_and_verify_digest(payload: dict) -> bool:
    """Remove the stored digest from a loaded payload and check the rest against it: True when it
    matches, False when there is none (a file written before payloads carried one); DigestMismatch
    naming both digests when the content changed since it was written."""
    stored = payload.pop(DIGEST_KEY, None)
    if stored is None:
        return False
    actual = payload_digest(payload)
    if actual != stored:
        raise DigestMismatch(f"stored {str(stored)[:23]}..., content now {actual[:23]}...")
    return True


def sidecar_path(path: str | Path) -> Path:
    """`<file>.sha256` beside `path`: where a file that must stay loadable by other programs as is
    (an exported state dict) keeps its checksum."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def write_sha256_sidecar(path: str | Path) -> str:
    """Record `path`'s sha256 in its sidecar, in `sha256sum` format (so `sha256sum -c` checks it too);
    returns the digest. Write the sidecar after the file, and delete the old one before rewriting the
    file, so a writer killed in between leaves no sidecar rather than a wrong one."""
    digest = sha256_file(path)
    atomic_write_text(sidecar_path(path), f"{digest}  {Path(path).name}\n")
    return digest


def verify_sha256_sidecar(path: str | Path, digest: str) -> bool:
    """Check `path`'s sha256 (`digest`, already computed by the caller) against its sidecar: True when
    it matches, False when there is no sidecar; DigestMismatch when the file changed since it was written."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return False
    words = sidecar.read_text(encoding="utf-8", errors="replace").split()
    recorded = words[0] if words else ""
    if recorded != digest:
        raise DigestMismatch(f"its sha256 is {digest[:16]}..., {sidecar.name} recorded {recorded[:16] or 'nothing'}...")
    return True
