"""Where source files may come from: inside their dataset root, symlinks included.

A dataset root is trusted as a whole, not file by file: an image or report that is a symlink (or sits
under a symlinked folder) resolving OUTSIDE the root is refused and recorded as a rejection (such a
link once made a file elsewhere on the machine into training text). Symlinked folders that stay
inside the root are followed: ChestX-ray14's images_001..012 are often assembled that way, and
`Path.rglob` does not descend into folder symlinks on Python 3.11.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from pathlib import Path


def is_inside(path: Path, real_root: Path) -> bool:
    """True when the already-resolved `path` is `real_root` or below it."""
    return path == real_root or real_root in path.parents


def outside_root(path: Path, *roots: Path) -> str:
    """ "" when `path`, with every symlink resolved, lies inside one of `roots` (also resolved);
    otherwise the rejection reason, naming both the path and where it leads."""
    try:
        real = path.resolve()
        real_roots = [root.resolve() for root in roots]
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on Python 3.11
        return f"{path}: cannot resolve its symlinks ({type(exc).__name__}: {exc})"
    if any(is_inside(real, root) for root in real_roots):
        return ""
    where = " or ".join(str(r) for r in real_roots)
    return f"{path} resolves to {real}, outside the dataset root {where} (symlink): refused"


def walk_inside(root: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """os.walk of `root` that descends into symlinked folders resolving inside `root`, each real
    folder once (a link back up the tree does not loop); folder links that leave the root are not
    entered. Yields (folder as reached from `root`, its sub-folder names, its file names)."""
    real_root = root.resolve()
    seen: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = Path(dirpath).resolve()
        if real in seen or not is_inside(real, real_root):
            dirnames[:] = []
            continue
        seen.add(real)
        yield Path(dirpath), dirnames, filenames


def find_files(root: Path, pattern: str) -> list[Path]:
    """Every file under `root` whose name matches `pattern` (fnmatch, case-sensitive), sorted by
    path, symlinked folders inside `root` included (walk_inside)."""
    found = [
        folder / name
        for folder, _, filenames in walk_inside(root)
        for name in filenames
        if fnmatch.fnmatchcase(name, pattern)
    ]
    return sorted(found, key=str)
