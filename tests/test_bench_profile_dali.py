"""The DALI graph profile (bench/profile_dali.py): each cut of the graph is timed (tiny data, CPU)."""

from __future__ import annotations

import json

import pytest

from tests.pipeline_fixtures import pack_tiny


def test_profile_dali_times_each_cut_of_the_graph(tmp_path):
    from bench.profile_dali import main as profile_main
    from pipeline.dali_backend import dali_available

    if not dali_available():
        pytest.skip("nvidia-dali not installed")
    shards = tmp_path / "shards"
    pack_tiny(shards, n_train=24, n_valid=8)
    out = tmp_path / "profile.json"
    assert (
        profile_main(
            [
                "--shards",
                str(shards),
                "--device",
                "cpu",
                "--batch-size",
                "8",
                "--threads",
                "1",
                "--warmup",
                "1",
                "--iters",
                "2",
                "--stages",
                "read",
                "warp",
                "full",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    stages = json.loads(out.read_text())["stages"]
    assert list(stages) == ["read", "warp", "full"] and all(v["img_per_s"] > 0 for v in stages.values())
