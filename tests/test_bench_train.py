"""`make bench-train` (bench/train.py): every arm's FLOPs and MFU, the CUDA-only parts marked n/a, the
profile summary, and the max-batch search."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.train import search_max_batch
from tests.pipeline_fixtures import ROOT, child_env


def test_bench_train_reports_mfu_profile_and_lever_arms_on_cpu(tmp_path):
    """`make bench-train` on a tiny config: every arm has FLOPs and MFU, the CUDA-only parts say n/a,
    the profile summary is written (run in a child process: it opens its own gloo group)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.train",
            "--shards",
            str(tmp_path / "none"),
            "--steps",
            "1",
            "--tiny-batch",
            "4",
            "--arms",
            "ours,graphs,bf16_nchw",
            "--image-size",
            "64",
            "--profile",
            "--max-batch",
            "--no-doc",
            "--results-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(OMP_NUM_THREADS="1", MASTER_PORT="29547"),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "train.json").read_text())
    (run,) = result["runs"]
    row = run["ours"]  # (the compile arm's wiring: tests/test_step_perf.py test_compiled_parts_...)
    assert row["gflops_per_sample"] > 0.1 and 0 < row["data_excluded"]["mfu"] < 1
    assert row["peak_mem_mb_per_sample"] is None  # CPU: n/a
    assert run["graphs"]["skipped"] == "CUDA graphs need a CUDA device"
    # The CPU precision lever arms: ours with bf16 autocast and NCHW; --image-size reaches the model.
    lever = run["bf16_nchw"]
    assert (lever["settings"]["precision"], lever["settings"]["channels_last"]) == ("bf16", False)
    assert row["settings"]["channels_last"] and lever["image_size"] == row["image_size"] == 64
    assert lever["gflops_per_sample"] == pytest.approx(row["gflops_per_sample"], rel=1e-6)
    assert result["max_batch"]["max_batch"] is None and "CUDA only" in result["max_batch"]["note"]
    profile = json.loads((tmp_path / "train_profile_cpu.json").read_text())
    assert profile["top_ops"] and profile["top_ops"][0]["self_ms"] > 0
    assert "convolution" in (tmp_path / "train_profile_cpu.txt").read_text()


def test_max_batch_search_doubles_then_bisects_to_the_boundary():
    tried = []

    def fits(batch: int) -> bool:  # stands in for two training steps that OOM above 777
        tried.append(batch)
        return batch <= 777

    good, bad, probes = search_max_batch(fits, start=64, limit=8192)
    assert tried[:5] == [64, 128, 256, 512, 1024]  # doubling to the first OOM
    assert good <= 777 < bad and bad - good <= max(1, good // 16)  # then within ~6%
    assert probes == list(zip(tried, [b <= 777 for b in tried]))
    assert search_max_batch(lambda b: True, 64, 256)[:2] == (256, None)  # never OOMs up to the limit
    assert search_max_batch(lambda b: False, 64, 256)[:2] == (0, 1)  # bisects below the start, down to 1
