"""docs/performance.md is assembled from benchmark sections; each bench replaces only its own."""

from __future__ import annotations

import re
from pathlib import Path

from common.io import atomic_write_text

HEADER = (
    "# Performance\n\nEvery number here comes from a `make bench-*` target (the GPU sections: the same "
    "benchmarks run by\n`tools/device_check.sh` on a lent GPU machine); raw JSON in `bench/results/`.\n"
)


def update_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the `## <title>` section of `path`, keeping every other section."""
    text = path.read_text(encoding="utf-8") if path.is_file() else HEADER
    section = f"## {title}\n\n{body.rstrip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section + "\n", text, count=1)
    else:
        text = text.rstrip() + "\n\n" + section
    atomic_write_text(path, text.rstrip() + "\n")
