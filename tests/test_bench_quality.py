"""make bench-quality (bench/quality_harness.py, bench/pseudo_mask_quality.py, bench/quality.py): resumable
stages, the statistics it reports, its scales, and the whole chain at smoke scale."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bench.pseudo_mask_quality import load_regions, pseudo_mask_summary, truth_mask
from bench.quality_harness import (
    ARMS,
    Stage,
    fingerprint,
    load_scale,
    markdown_table,
    marker_path,
    pretrain_command,
    retrieval_summary,
    run_stages,
    variants_for,
)
from common.config import ConfigError
from shards.downstream.rsna import SPLIT_WEIGHTS as RSNA_SPLITS
from shards.downstream.siim import SPLIT_WEIGHTS as SIIM_SPLITS
from shards.synthetic.render import encode_mask_rle
from tests.pipeline_fixtures import ROOT, child_env

# ---------------------------------------------------------------------------------------------
# resumable stages


def fake_stages(calls: list, fail_at: str | None = None, inputs: dict | None = None) -> list[Stage]:
    def make(name):
        def run(done):
            if name == fail_at:
                raise KeyboardInterrupt(f"killed in {name}")  # what Ctrl-C / a kill looks like mid-stage
            calls.append(name)
            return {"value": len(done), "seen": sorted(done)}

        return Stage(name, run, dict(inputs or {}, name=name))

    return [make(n) for n in ("corpus", "pretrain/g2d/s0", "eval/g2d/s0/rsna_linear@1.0", "report")]


def test_stages_killed_midway_resume_at_the_first_unfinished_one(tmp_path):
    calls = []
    with pytest.raises(KeyboardInterrupt):
        run_stages(fake_stages(calls, fail_at="eval/g2d/s0/rsna_linear@1.0"), tmp_path, log=lambda *_: None)
    assert calls == ["corpus", "pretrain/g2d/s0"]
    assert marker_path(tmp_path, "pretrain/g2d/s0").is_file()
    assert not marker_path(tmp_path, "eval/g2d/s0/rsna_linear@1.0").exists()

    calls.clear()
    log = []
    done = run_stages(fake_stages(calls), tmp_path, log=log.append)
    assert calls == ["eval/g2d/s0/rsna_linear@1.0", "report"]  # only what had not finished
    assert sum("skipped" in line for line in log) == 2
    # A skipped stage's recorded result is handed on as if it had just run.
    assert done["report"] == {"value": 3, "seen": ["corpus", "eval/g2d/s0/rsna_linear@1.0", "pretrain/g2d/s0"]}
    marker = json.loads(marker_path(tmp_path, "report").read_text())
    assert marker["stage"] == "report" and marker["result"]["value"] == 3 and marker["seconds"] >= 0


def test_changed_inputs_or_a_damaged_marker_rerun_the_stage(tmp_path):
    calls = []
    run_stages(fake_stages(calls), tmp_path, log=lambda *_: None)
    calls.clear()
    marker_path(tmp_path, "corpus").write_text("{not json")
    run_stages(fake_stages(calls), tmp_path, log=lambda *_: None)
    assert calls == ["corpus"]
    calls.clear()
    run_stages(fake_stages(calls, inputs={"studies": 99}), tmp_path, log=lambda *_: None)
    assert len(calls) == 4  # every fingerprint changed


def test_duplicate_stage_names_are_refused(tmp_path):
    stage = Stage("a", lambda done: {})
    with pytest.raises(ValueError, match="duplicate"):
        run_stages([stage, stage], tmp_path)


# ---------------------------------------------------------------------------------------------
# scales and arms


def test_full_scale_meets_the_issue_sizes_and_smoke_is_small():
    full, smoke = load_scale("full"), load_scale("smoke")
    assert full.studies >= 5000
    # Expected held-out test images from the converters' split proportions: >= 500 per dataset.
    assert full.rsna_images * RSNA_SPLITS["test"] / sum(RSNA_SPLITS.values()) >= 500
    assert full.siim_images * SIIM_SPLITS["test"] / sum(SIIM_SPLITS.values()) >= 500
    families = {spec.split("@")[0] for spec in full.runs}
    assert {"zeroshot_rsna", "grounding_rsna", "siim_segmentation", "rsna_segmentation", "rsna_detection"} <= families
    assert {"rsna_linear@0.01", "rsna_linear@1.0"} <= set(full.runs)
    assert smoke.studies < 200 and set(smoke.runs) >= {"rsna_linear@0.01", "rsna_detection@1.0"}


def test_bad_scale_input_is_named():
    with pytest.raises(ConfigError, match="rsna_linear@0.5"):
        load_scale("smoke", ["runs=[rsna_linear@0.5]"])
    with pytest.raises(FileNotFoundError, match="nope"):
        load_scale("nope")


def test_vla_only_differs_from_g2d_only_by_the_pa_weight():
    scale = load_scale("full")
    g2d = pretrain_command("python", "g2d", 0, scale, "s", "b", "out")
    vla = pretrain_command("python", "vla_only", 0, scale, "s", "b", "out")
    assert vla == g2d + ["model.pa_weight=0"]  # same steps, batch, resolution: equal compute
    assert "train.max_steps=600" in g2d and "train.batch_size_per_gpu=32" in g2d
    with pytest.raises(ValueError):
        pretrain_command("python", "random", 0, scale, "s", "b", "out")
    assert variants_for("siim_segmentation", "g2d") == ["encoder", "encoder_decoder"]
    assert variants_for("siim_segmentation", "random") == ["encoder"]
    assert variants_for("rsna_linear", "random") == [""]


def test_stage_fingerprints_follow_what_each_stage_depends_on(tmp_path):
    from bench.quality import build_stages

    def fingerprints(*overrides):
        stages = build_stages(load_scale("smoke", list(overrides)), [0], tmp_path, 1, torch.device("cpu"))
        return {s.name: fingerprint(s.inputs) for s in stages}

    base = fingerprints()
    assert {
        "corpus",
        "tiny_bert",
        "downstream",
        "pretrain/g2d/s0",
        "pretrain/vla_only/s0",
        "eval/random/s0/rsna_detection@1.0",
        "retrieval/random/s0",
        "pseudo_mask/g2d/s0",
    } <= set(base)
    assert not any(n.startswith("pretrain/random") for n in base)
    more_rsna = fingerprints("rsna_images=80")
    changed = {n for n in base if base[n] != more_rsna[n]}
    assert "downstream" in changed and "eval/g2d/s0/rsna_linear@1.0" in changed
    assert not any(n.startswith(("pretrain/", "corpus", "retrieval/", "pseudo_mask/")) for n in changed)
    other_eval = fingerprints("eval_overrides=[train.epochs=2]")
    changed = {n for n in base if base[n] != other_eval[n]}
    assert changed == {n for n in base if n.startswith("eval/")}  # no re-pretraining for an eval change


# ---------------------------------------------------------------------------------------------
# statistics


def test_retrieval_summary_resolves_a_real_gap_and_not_a_tiny_one():
    n = 400
    keys = np.array([f"k{i:03d}" for i in range(n)])
    rng = np.random.default_rng(0)
    rank_good = np.where(rng.random(n) < 0.6, 0, 10)  # top-1 ~0.6
    rank_vla = np.where(rng.random(n) < 0.58, 0, 10)  # ~0.58: within noise of G2D
    rank_random = rng.integers(0, n, n)  # chance
    perm = rng.permutation(n)  # arms may list the images in any order
    ranks = {
        "g2d": {"keys": keys, "rank": rank_good},
        "vla_only": {"keys": keys[perm], "rank": rank_vla[perm]},
        "random": {"keys": keys, "rank": rank_random},
    }
    out = retrieval_summary(ranks)
    top1 = out["arms"]["g2d"]["top1"]
    assert top1["value"] == pytest.approx((rank_good == 0).mean())
    assert top1["ci95"][0] < top1["value"] < top1["ci95"][1]
    vs_random = out["diffs"]["g2d-random"]["top1"]
    assert vs_random["ci95"][0] > 0.4 and vs_random["p_b_better"] == 1.0
    vs_vla = out["diffs"]["g2d-vla_only"]["top1"]
    assert vs_vla["ci95"][0] < vs_vla["diff"] < vs_vla["ci95"][1]
    assert out["chance"]["top5"] == 5 / n
    with pytest.raises(ValueError, match="other valid images"):
        retrieval_summary({"g2d": ranks["g2d"], "random": {"keys": keys[:-1], "rank": rank_random[:-1]}})


def test_pseudo_mask_summary_and_truth_mask_in_the_eval_view(tmp_path):
    # A 40x20 source image, a region in its right half; the stored crop keeps columns 10..30.
    region = np.zeros((20, 40), dtype=bool)
    region[5:15, 20:30] = True
    truth = truth_mask([{"mask_rle": encode_mask_rle(region)}], {"crop_box": [10, 0, 30, 20]}, (8, 8))
    assert truth.shape == (8, 8) and truth.dtype == torch.bool
    assert truth[:, 4:].any() and not truth[:, :4].any()  # crop then squash: right half only
    assert not truth[:2].any() and not truth[6:].any()

    line = {
        "dicom_id": "d1",
        "regions": [
            {"finding": "support_device", "mask_rle": encode_mask_rle(region)},
            {"finding": "pneumonia", "mask_rle": encode_mask_rle(region)},
        ],
    }
    (tmp_path / "synthetic_regions.jsonl").write_text(json.dumps(line) + "\n")
    assert [r["finding"] for r in load_regions(tmp_path)["d1"]] == ["pneumonia"]  # devices are no finding
    (tmp_path / "synthetic_regions.jsonl").write_text("{broken\n")
    with pytest.raises(ValueError, match="synthetic_regions.jsonl:1"):
        load_regions(tmp_path)

    n = 200
    keys = np.array([f"k{i}" for i in range(n)])
    findings = np.array(["pneumonia"] * 100 + ["edema"] * 100)
    frac = np.full(n, 0.1)
    preds = {
        "g2d": {"keys": keys, "iou": np.full(n, 0.4), "pointing": np.ones(n), "truth_frac": frac, "findings": findings},
        "random": {
            "keys": keys,
            "iou": np.linspace(0.0, 0.2, n),
            "pointing": np.zeros(n),
            "truth_frac": frac,
            "findings": findings,
        },
    }
    out = pseudo_mask_summary(preds)
    assert out["num_images"] == n and out["pointing_chance"] == pytest.approx(0.1)
    assert out["arms"]["g2d"]["iou"]["value"] == pytest.approx(0.4)
    assert out["arms"]["random"]["per_finding_iou"]["pneumonia"]["n"] == 100
    assert out["diffs"]["g2d-random"]["diff"] == pytest.approx(0.3)
    assert out["diffs"]["g2d-random"]["ci95"][0] > 0.25


def test_markdown_table_marks_resolved_differences():
    ci = {"value": 0.5, "ci95": [0.4, 0.6]}
    quality = {
        "bootstrap_resamples": 1000,
        "results": {
            "0": {
                "retrieval": {
                    "num_images": 50,
                    "chance": {"top1": 0.02, "top5": 0.1},
                    "arms": {a: {"top1": ci, "top5": ci} for a in ARMS},
                    "diffs": {
                        "g2d-vla_only": {"top1": {"diff": 0.01, "ci95": [-0.05, 0.07]}},
                        "g2d-random": {"top1": {"diff": 0.3, "ci95": [0.2, 0.4]}},
                    },
                },
                "tasks": {
                    "rsna_linear@1.0": {
                        "family": "linear",
                        "headline": "auroc",
                        "arms": {a: ci for a in ARMS},
                        "diffs": {"g2d-random": {"auroc": {"diff": -0.2, "ci95": [-0.3, -0.1]}}},
                    },
                    "siim_segmentation@0.1/encoder": {
                        "family": "segmentation",
                        "headline": "dice",
                        "arms": {
                            "g2d": {**ci, "secondary": {"dice_positive": {"value": 0.7, "ci95": [0.6, 0.8]}}},
                            "random": ci,
                        },
                        "diffs": {"g2d-random": {"dice_positive": {"diff": 0.1, "ci95": [0.02, 0.2]}}},
                    },
                },
                "pseudo_mask_iou": {
                    "num_images": 40,
                    "pointing_chance": 0.1,
                    "arms": {a: {"iou": ci, "pointing": ci} for a in ARMS},
                    "diffs": {"g2d-vla_only": {"diff": 0.05, "ci95": [0.01, 0.09]}},
                },
            }
        },
    }
    table = markdown_table(quality)
    assert "| pseudo-mask vs true regions | 40 valid images with a finding | iou |" in table
    assert "| 50.0 [40.0, 60.0] | **+5.0 [+1.0, +9.0]** | - |" in table
    assert "| pseudo-mask vs true regions | peak cell in a region; chance 10.0 | pointing |" in table
    assert "| retrieval | pretraining valid (50 images, chance 2.0) | top1 |" in table
    assert "+1.0 [-5.0, +7.0]" in table and "**+30.0 [+20.0, +40.0]**" in table  # only a CI excluding 0 is bold
    assert "| linear probe | rsna_linear@1.0 | auroc | 50.0 [40.0, 60.0]" in table
    assert "**-20.0 [-30.0, -10.0]**" in table
    # Segmentation's Dice halves under the headline, for the arms that have them.
    assert "| segmentation | siim_segmentation@0.1/encoder | dice | 50.0 [40.0, 60.0] | - | 50.0" in table
    assert (
        "| segmentation | siim_segmentation@0.1/encoder | dice_positive | 70.0 [60.0, 80.0] | - | - | - | "
        "**+10.0 [+2.0, +20.0]** |"
    ) in table


# ---------------------------------------------------------------------------------------------
# the whole chain


# Every stage kind and every task family once, smaller still than SCALE=smoke: the full smoke list
# (9 tasks, 4 steps at batch 8) took 15.7 min on 2 cores shared with other jobs; this 6 min.
TEST_SCALE = [
    "studies=60",
    "rsna_images=40",
    "siim_images=40",
    "pretrain_overrides=[train.max_steps=2,train.batch_size_per_gpu=4,train.checkpoint_every=1,"
    "model.pa_warmup_steps=1,optim.warmup_steps=1,data.num_workers=0]",
    "runs=[zeroshot_rsna@1.0,grounding_siim@1.0,rsna_linear@0.01,siim_segmentation@1.0,rsna_detection@1.0]",
]


def test_smoke_scale_runs_the_whole_chain_and_resumes(tmp_path):
    """SCALE=smoke end to end (render, pack, tiny BERT, two pretraining arms, every task family for
    three arms, retrieval, pseudo-mask IoU, report), trimmed by TEST_SCALE; then a re-run skips every
    stage. The slowest test of this file: 6 min measured on 2 cores shared with four other jobs (load
    average ~9); about a quarter of that on an idle machine."""
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        "-m",
        "bench.quality",
        "--scale",
        "smoke",
        "--out",
        str(out),
        "--workers",
        "2",
        "--results",
        str(tmp_path / "quality.json"),
        "--doc",
        str(tmp_path / "quality.md"),
        *TEST_SCALE,
    ]
    first = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    quality = json.loads((tmp_path / "quality.json").read_text())
    res = quality["results"]["0"]
    scale = load_scale("smoke", TEST_SCALE)
    expected = {f"{spec}/{v}" if v else spec for spec in scale.runs for v in variants_for(spec.split("@")[0], "g2d")}
    assert set(res["tasks"]) == expected
    for label, task in res["tasks"].items():
        assert set(task["arms"]) == set(ARMS), label  # encoder_decoder borrows random's encoder run
        assert set(task["diffs"]) == {"g2d-vla_only", "g2d-random", "vla_only-random"}, label
        assert task["headline"] in task["diffs"]["g2d-random"], label
    for arm in ARMS:
        assert 0.0 <= res["retrieval"]["arms"][arm]["top1"]["value"] <= 1.0
        assert 0.0 <= res["pseudo_mask_iou"]["arms"][arm]["iou"]["value"] <= 1.0
    assert res["pseudo_mask_iou"]["num_images"] > 0
    assert quality["timing_seconds"]["pretrain/g2d/s0"] > 0
    doc = (tmp_path / "quality.md").read_text()
    assert doc.startswith("# Quality benchmark results") and "## Results (smoke scale)" in doc
    assert "| linear probe | rsna_linear@0.01 | auroc |" in doc
    seg = res["tasks"]["siim_segmentation@1.0/encoder"]["arms"]["g2d"]["secondary"]
    assert set(seg) == {"dice_positive", "dice_negative_images"} and len(seg["dice_positive"]["ci95"]) == 2
    assert "| segmentation | siim_segmentation@1.0/encoder | dice_positive |" in doc

    t0 = time.perf_counter()
    again = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    stages = [line for line in again.stdout.splitlines() if line.startswith("[bench-quality]") and "s)" in line]
    assert len(stages) == len(quality["timing_seconds"]) and all("skipped" in line for line in stages), stages
    assert time.perf_counter() - t0 < 120
