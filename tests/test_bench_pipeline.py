"""bench-pipeline (bench/pipeline.py): steady-rate bookkeeping and the results contract (tiny data, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from bench.pipeline import Timing, main
from tests.pipeline_fixtures import pack_tiny


def test_steady_rate_counts_only_batches_beyond_those_in_flight():
    cpu = torch.device("cpu")
    batch = torch.zeros(4, 1, 2, 2)
    timing = Timing(cpu, in_flight=2)
    timing.epoch([batch] * 5)  # batches 0-1 may have been built during the startup
    timing.epoch([batch] * 2)  # an epoch that never gets past them adds nothing steady
    result = timing.done()
    assert timing.n == 28 and timing.steady_n == 8 and timing.epochs == 2  # batches 3 and 4
    assert result["steady"] > 0 and result["with_startup"] > 0 and result["in_flight"] == 2
    toy = Timing(cpu, in_flight=8)
    toy.epoch([batch] * 5)
    assert toy.done()["steady"] is None


def test_bench_pipeline_writes_the_promised_results(tmp_path):
    shards = tmp_path / "shards"
    pack_tiny(shards, n_train=48, n_valid=8)
    results, doc = tmp_path / "pipeline.json", tmp_path / "performance.md"
    assert (
        main(
            [
                "--shards",
                str(shards),
                "--device",
                "cpu",
                "--workers",
                "1",
                "--batch-size",
                "8",
                "--epochs",
                "1",
                "--runs",
                "1",
                "--mgca-size",
                "128",
                "--work-dir",
                str(tmp_path / "work"),
                "--results",
                str(results),
                "--doc",
                str(doc),
            ]
        )
        == 0
    )
    out = json.loads(results.read_text())
    for key in ("dali", "torch", "g2d_npy", "mgca_files", "raw_decode"):
        assert out["img_per_s"][key] > 0, key
    assert set(out["disk_bytes"]) == {"shards", "g2d_npy", "mgca_files"}
    # G2D's side counts its npy (48 x 256 x 256 bytes + header) plus the report csv it reads.
    detail = out["disk_bytes_detail"]
    assert out["disk_bytes"]["g2d_npy"] == detail["g2d_npy_images"] + detail["reports_csv"]
    assert detail["g2d_npy_images"] >= 48 * 256 * 256
    assert out["rate_basis"] in ("steady", "with startup")
    assert out["setup"]["train_images"] == 48 and out["machine"]["cpu_count"] >= 1
    # Issue #12's measurements, from the same run: stages vs the floor, CRC price, shard mixing.
    stages = out["cpu_breakdown_ms_per_img"]
    assert set(stages) >= {"read", "check", "decode", "warp", "jitter_normalise", "tokenise", "collate", "other"}
    assert stages["decode"] > 0 and stages["warp"] > 0 and stages["tokenise"] > 0 and stages["total"] > 0
    ratio = out["torch_cpu_ms_per_img"] / out["floor_ms_per_img"]
    assert out["floor_ms_per_img"] > 0 and out["torch_vs_floor"] == pytest.approx(ratio, rel=0.02)
    assert 0 < out["crc_us_per_sample"] < 1000
    assert set(out["mixing_cost"]) == {"dali", "torch", "torch_cpu"}
    mixed = out["shards_per_batch"]["mixed (shard_mix=0)"]
    assert mixed["shards"] == 6 and mixed["mean"] > out["shards_per_batch"]["one shard at a time (shard_mix=1)"]["mean"]
    text = doc.read_text()
    assert "## Data pipeline" in text and "G2D npy memmap" in text and "(target >= 5x" in text
    assert "| decode | " in text and "goal <= 1.5x" in text and "distinct shards per batch" in text
