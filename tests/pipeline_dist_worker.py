"""torchrun worker for tests/test_pipeline_dist.py: each rank records the keys it reads.

    torchrun --standalone --nproc_per_node=2 tests/pipeline_dist_worker.py <shards> <out_dir>

Writes <out_dir>/rank<r>.json = {backend: {"len": len(loader), "epochs": [[keys of each batch], ...]}}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.dist import cleanup, init_distributed  # noqa: E402
from pipeline import DataConfig, build_loader  # noqa: E402


def main(shards: str, out_dir: str) -> None:
    dist = init_distributed(backend="gloo")
    result = {}
    try:
        for backend in ("torch", "dali"):
            cfg = DataConfig(
                shards=shards, backend=backend, batch_size_per_gpu=4, num_workers=1, transform="g2d_train", seed=11
            )
            loader = build_loader(cfg, "train", dist)
            epochs = []
            for epoch in (0, 1):
                loader.set_epoch(epoch)
                epochs.append([batch.keys for batch in loader])
            result[backend] = {"len": len(loader), "epochs": epochs}
        (Path(out_dir) / f"rank{dist.rank}.json").write_text(json.dumps(result))
    finally:
        cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
