"""Two CPU ranks (torchrun, gloo) read disjoint parts of every epoch with both backends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.pipeline_fixtures import ROOT, child_env, pack_tiny

TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_two_ranks_read_disjoint_equal_parts_of_each_epoch(tmp_path):
    shards = tmp_path / "shards"
    manifest = pack_tiny(shards, n_train=46, n_valid=4)
    all_keys = {k for rec in manifest["_shard_records"] if rec["name"].startswith("train/") for k in rec["keys"]}
    env = child_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            str(TORCHRUN),
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "tests" / "pipeline_dist_worker.py"),
            str(shards),
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected_batches = 46 // (2 * 4)  # drop_last: 5 batches per rank
    for backend in ("torch", "dali"):
        assert [r[backend]["len"] for r in ranks] == [expected_batches] * 2
        for epoch in (0, 1):
            parts = [[k for batch in r[backend]["epochs"][epoch] for k in batch] for r in ranks]
            assert [len(r[backend]["epochs"][epoch]) for r in ranks] == [expected_batches] * 2
            assert all(len(batch) == 4 for r in ranks for batch in r[backend]["epochs"][epoch])
            a, b = set(parts[0]), set(parts[1])
            assert len(a) == len(parts[0]) and len(b) == len(parts[1])
            assert not a & b  # disjoint
            assert a | b <= all_keys and len(a | b) == expected_batches * 2 * 4  # the epoch minus 6 dropped
        assert ranks[0][backend]["epochs"][0] != ranks[0][backend]["epochs"][1]  # reshuffled per epoch
    for r in ranks:  # both backends read the same plan
        assert r["torch"]["epochs"] == r["dali"]["epochs"]
