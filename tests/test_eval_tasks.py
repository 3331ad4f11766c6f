"""The evaluation suite end to end: every task family runs for one epoch on tiny synthetic downstream
shards (packed in a tmp dir by the real converters) with a tiny G2D saved as a pretraining checkpoint;
results.json fields and metric ranges, the YOLOv3 target assignment / decoding on a hand case,
checkpoint resolution (run dir, exports, random, imagenet from a local file, newest default),
unknown-task and architecture-mismatch errors, the paper-shaped tables."""

import json
import math
import os
import time

import numpy as np
import pytest
import torch
import torchvision
import yaml

from common.cli import run_main
from common.config import ConfigError, config_to_dict
from common.io import sha256_file
from eval.bootstrap import family_metrics
from eval.checkpoint import (
    ArchitectureMismatch,
    BadCheckpoint,
    CheckpointNotFound,
    NotApplicable,
    check_image_architecture,
    default_checkpoint,
    resolve_weights,
)
from eval.runner import load_predictions, run_all, run_eval
from eval.tasks import TASKS, UnknownTask, get_task, load_task_config
from eval.tasks.detection import YOLOv3Head, build_targets, detect, scaled_anchors, yolo_loss
from model.export import export_unet_state_dicts
from model.registry import build_model, model_config
from model.text import build_tiny_text_model
from shards import ensure as data_ensure
from shards.downstream import DATASETS, convert
from shards.synthetic.downstream import write_all
from tools import eval as eval_cli
from tools.eval import EVAL_USER_ERRORS
from tools.eval import main as eval_cli_main


def eval_main(argv) -> int:
    """The CLI as `python -m tools.eval` runs it: user errors -> one line on stderr, exit status 2."""
    with pytest.raises(SystemExit) as done:
        run_main(eval_cli_main, list(argv), extra_errors=EVAL_USER_ERRORS)
    return done.value.code


# Tiny everything: 64-px images, one epoch, in-process torch loader, the tiny architecture for baselines.
TINY = [
    "train.epochs=1",
    "data.image_size=64",
    "data.crop_size=64",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "data.num_workers=0",
    "data.backend=torch",
    "model.baseline=g2d_tiny",
]
PROMPT_TEXTS = [
    "no pneumonia",
    "there is a pneumothorax",
    "small pleural effusion",
    "the heart is enlarged",
    "pulmonary edema",
    "focal consolidation",
    "the lungs are clear",
    "atelectasis",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """64-px tensors: on the 2 shared cores, intra-op threads cost more in synchronisation than they
    save (measured ~5x slower with 2 threads when the machine is busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """All six datasets, ~20 images each, packed at max side 96 (about 10 s)."""
    src, out = tmp_path_factory.mktemp("downstream_src"), tmp_path_factory.mktemp("downstream_shards")
    write_all(src, 20, 0)
    for name in DATASETS:
        convert(name, src / name, out, max_side=96, workers=1, seed=0, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A fake pretraining run: checkpoint in train/checkpoint.py's format + config.yaml + both exports."""
    root = tmp_path_factory.mktemp("pretrain_run")
    bert = build_tiny_text_model(root / "tiny_bert", PROMPT_TEXTS * 4, hidden=32, layers=2, heads=2)
    cfg = model_config("g2d_tiny", text_model=str(bert))
    torch.manual_seed(0)
    model = build_model(cfg)
    config = {"model": config_to_dict(cfg), "data": {"eval_transform": "eval", "image_size": 64, "crop_size": 64}}
    (root / "checkpoints").mkdir()
    torch.save(
        {"model": model.state_dict(), "optimizer": {}, "step": 3, "config": config},
        root / "checkpoints" / "step_00000003.pt",
    )
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    encoder_sd, unet_sd = export_unet_state_dicts(model)
    torch.save(encoder_sd, root / "g2d_encoder.pth")
    torch.save(unet_sd, root / "g2d_encoder_decoder.pth")
    return root


def strict_json(path):
    def reject(token):
        raise ValueError(f"{path}: non-standard JSON constant {token}")

    return json.loads(open(path, encoding="utf-8").read(), parse_constant=reject)


def in_unit(value) -> bool:
    return value is None or 0.0 <= value <= 1.0


# ---------------------------------------------------------------------------------------------
# errors and config


def test_unknown_task_lists_the_valid_names(capsys):
    with pytest.raises(UnknownTask) as err:
        get_task("siim_segmentaton")
    assert all(name in str(err.value) for name in TASKS)
    assert eval_main(["--task", "nope", "--data", "/nonexistent"]) == 2
    assert "rsna_detection" in capsys.readouterr().err
    assert len(TASKS) == 14 and {t.family for t in TASKS.values()} == {
        "linear",
        "segmentation",
        "detection",
        "finetune",
        "zeroshot_cls",
        "grounding",
    }


def test_cli_runs_a_task_and_fills_only_the_default_data_root(run_dir, data_root, tmp_path, monkeypatch, capsys):
    assert (
        eval_main(
            [
                "--task",
                "zeroshot_rsna",
                "--ckpt",
                str(run_dir),
                "--data",
                data_root,
                "--output-root",
                str(tmp_path / "out"),
                *TINY,
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "out" / "zeroshot_rsna" / "1.0").glob("*/results.json"))) == 1
    # A user-given root that lacks the dataset is an error saying how to pack it ...
    assert (
        eval_main(
            [
                "--task",
                "covidx_linear",
                "--ckpt",
                "random",
                "--data",
                str(tmp_path / "elsewhere"),
                "model.baseline=g2d_tiny",
            ]
        )
        == 2
    )
    assert "make shards DATASET=" in capsys.readouterr().err
    # ... while the default root is generated from the synthetic look-alikes (here shrunk to 8 images).
    monkeypatch.setattr(data_ensure, "DEFAULT_DOWNSTREAM", str(tmp_path / "shards"))
    monkeypatch.setattr(data_ensure, "DEFAULT_DOWNSTREAM_SRC", str(tmp_path / "src"))
    monkeypatch.setattr(data_ensure, "SYNTH_N", 8)
    monkeypatch.setattr(data_ensure, "MAX_SIDE", 64)
    data_ensure.ensure_data(str(tmp_path / "shards"), ["covidx"], log=lambda *_: None)
    manifest = json.loads((tmp_path / "shards" / "covidx" / "manifest.json").read_text())
    assert manifest["dataset"] == "covidx" and manifest["num_samples"] > 0


def test_task_configs_carry_the_paper_hyperparameters():
    lin = load_task_config("chexpert_linear")
    assert (lin.train.lr, lin.train.weight_decay, lin.data.batch_size, lin.train.epochs) == (5e-4, 1e-6, 8, 50)
    seg = load_task_config("siim_segmentation")
    assert (seg.train.lr, seg.train.weight_decay, seg.segmentation.focal_weight, seg.segmentation.focal_gamma) == (
        2e-4,
        0.05,
        10.0,
        2.0,
    )
    assert load_task_config("rsna_segmentation").data.batch_size == 16
    det1, det10 = load_task_config("rsna_detection", "0.01"), load_task_config("rsna_detection", "0.1")
    assert (det1.data.batch_size, det1.train.lr, det10.data.batch_size, det10.train.lr) == (8, 2e-4, 16, 5e-4)
    assert det1.detection.iou_thresholds == (0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75)
    ft = load_task_config("chestxray14_finetune")
    assert (ft.train.lr, ft.data.batch_size) == (1e-4, 64)
    assert len(load_task_config("zeroshot_chestxray14").zeroshot.prompts) == 14
    for name in TASKS:  # every YAML loads strictly
        load_task_config(name, "0.1", overrides=["train.epochs=2"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_task_config("rsna_linear", overrides=["linear.moed=fast"])
    with pytest.raises(ConfigError, match="fraction"):
        load_task_config("rsna_linear", "0.5")
    # Every section's declared ranges are checked when the config loads, naming the key.
    with pytest.raises(ConfigError, match=r"data.valid_max_images=-1 must be >= 0"):
        load_task_config("siim_segmentation", overrides=["data.valid_max_images=-1"])
    assert load_task_config("siim_segmentation", overrides=["data.valid_max_images=150"]).data.valid_max_images == 150


# ---------------------------------------------------------------------------------------------
# YOLOv3 on a hand-made case


def test_yolo_target_assignment_and_decoding_hand_case():
    size = (64, 64)  # strides 8 / 16 / 32 -> grids 8 / 4 / 2
    anchors = scaled_anchors(size)  # 416-px priors x 64/416
    assert torch.allclose(anchors[2, 1], torch.tensor([156, 198]) * 64 / 416)
    grids = [(8, 8), (4, 4), (2, 2)]
    # MGCA assigns per scale: every box is positive once at EACH scale, at that scale's best prior, by
    # the shape IoU in grid cells of that scale with +1 cell per side (see tests/test_reference_exact.py).
    # Box 1: 130 x 130 at 416 (20 x 20 px here), centre (22, 27.23). Shape IoUs per scale:
    #   stride 8  (10,13) .122 (16,30) .168 (33,23) .192 -> anchor 2, cell row 3 col 2
    #   stride 16 (30,61) .404 (62,45) .452 (59,119) .664 -> anchor 2, cell row 1 col 1
    #   stride 32 (116,90) .845 -> anchor 0; (156,198) .773 > .5: ignored; (373,326) .368; cell (0, 0)
    big = [12, 17.23, 32, 37.23]
    # Box 2: exactly the prior (16, 30) at 416, centre (45, 13):
    #   stride 8 anchor 1 (IoU 1; (10,13) .723 and (33,23) .744 ignored) cell (1, 5);
    #   stride 16 (30,61) .727 best -> anchor 0 cell (0, 2), (62,45) .65 ignored, (59,119) .442;
    #   stride 32 (116,90) .552 best -> anchor 0 cell (0, 1), the others .361 / .172.
    small = [45 - 16 * 32 / 416, 13 - 30 * 32 / 416, 45 + 16 * 32 / 416, 13 + 30 * 32 / 416]
    targets = build_targets([torch.tensor([big, small]), torch.zeros(0, 4)], grids, anchors, size)
    assert targets[0]["obj"].nonzero().tolist() == [[0, 1, 1, 5], [0, 2, 3, 2]]
    assert targets[1]["obj"].nonzero().tolist() == [[0, 0, 0, 2], [0, 2, 1, 1]]
    assert targets[2]["obj"].nonzero().tolist() == [[0, 0, 0, 0], [0, 0, 0, 1]]
    assert torch.allclose(targets[2]["txy"][0, 0, 0, 0], torch.tensor([22 / 32, 27.23 / 32]))
    assert torch.allclose(targets[2]["twh"][0, 0, 0, 0], torch.log(torch.tensor([130 / 116, 130 / 90])), atol=1e-5)
    assert torch.allclose(targets[0]["twh"][0, 1, 1, 5], torch.zeros(2), atol=1e-5)  # exact prior shape
    assert torch.allclose(targets[0]["txy"][0, 1, 1, 5], torch.tensor([45 / 8 - 5, 13 / 8 - 1]))
    # No-object mask: only anchors with shape IoU > .5 leave it. Box 1 at stride 8 is positive at an
    # anchor of IoU .192, so that cell is a positive AND a no-object cell (MGCA).
    assert targets[2]["noobj"][0, :, 0, 0].tolist() == [False, False, True]
    assert targets[2]["noobj"][0, :, 0, 1].tolist() == [False, True, True]
    assert targets[0]["noobj"][0, :, 1, 5].tolist() == [False, False, False]
    assert targets[0]["noobj"][0, :, 3, 2].tolist() == [True, True, True]
    assert targets[1]["noobj"][0, :, 1, 1].tolist() == [True, True, False]
    assert targets[1]["noobj"][0, :, 0, 2].tolist() == [False, False, True]
    assert int(targets[1]["noobj"].sum()) == 2 * 3 * 4 * 4 - 3 and int(targets[2]["noobj"][1].sum()) == 3 * 2 * 2
    # Predictions that encode exactly these targets decode back to the boxes (the three per box are
    # one box: NMS keeps one), objectness ~1.
    preds = [torch.full((2, 3, gh, gw, 6), -30.0) for gh, gw in grids]
    for s, t in enumerate(targets):
        obj = t["obj"]
        preds[s][..., 0:2][obj] = torch.logit(t["txy"][obj])
        preds[s][..., 2:4][obj] = t["twh"][obj]
        preds[s][..., 4:6][obj] = 30.0
    found = detect(preds, anchors, size, conf_threshold=0.5, nms_iou=0.5)
    boxes, scores = found[0]
    order = boxes[:, 0].argsort()
    assert torch.allclose(boxes[order], torch.tensor([big, small]), atol=1e-3)
    assert torch.all(scores > 0.99) and found[1][0].shape == (0, 4)
    # Loss forms: BCE on the centre offsets bottoms out at the targets' binary entropy (each term a mean
    # over all B*A*h*w entries of its scale); wh and cls vanish at these predictions. conf does not:
    # box 1's stride-8 positive is also a no-object cell, so its objectness (logit 30) costs
    # 0.5 x BCE(30, 0) = 0.5 x 30 over the 2 x 3 x 8 x 8 = 384 entries of that scale.
    total, terms = yolo_loss(preds, targets)

    def entropy(p):
        return -(p * p.log() + (1 - p) * (1 - p).log())

    floor_xy = sum(float(entropy(t["txy"][t["obj"]]).sum()) / t["obj"].numel() for t in targets)
    assert math.isclose(float(terms["xy"]), floor_xy, rel_tol=1e-4)
    assert all(float(terms[k]) < 1e-6 for k in ("wh", "cls"))
    assert math.isclose(float(terms["conf"]), 0.5 * 30 / 384, rel_tol=1e-5)
    # Shift one box centre to sigmoid 0 -> 0.5: the xy term grows by (log 2 - H(22/32)) / 24 (stride-32
    # tensor: 2 x 3 x 2 x 2 entries), 2.5 x that in the total.
    preds[2][0, 0, 0, 0, 0] = 0.0
    moved, moved_terms = yolo_loss(preds, targets)
    delta = (math.log(2) - float(entropy(torch.tensor(22 / 32, dtype=torch.float64)))) / 24
    assert math.isclose(float(moved_terms["xy"]) - float(terms["xy"]), delta, rel_tol=1e-4)
    assert math.isclose(float(moved - total), 2.5 * delta, rel_tol=1e-3)
    # The no-object term carries 0.5: objectness 0.5 in an empty cell costs 0.5 x log 2 / 96 entries.
    preds[1][1, 0, 0, 0, 4] = 0.0
    empty_cell, _ = yolo_loss(preds, targets)
    assert math.isclose(float(empty_cell - moved), 0.5 * math.log(2) / 96, rel_tol=1e-3)
    # The head's output layout matches the targets'.
    head = YOLOv3Head((128, 256, 512), num_classes=1, width=32)
    outs = head(torch.randn(2, 128, 8, 8), torch.randn(2, 256, 4, 4), torch.randn(2, 512, 2, 2))
    assert [tuple(o.shape) for o in outs] == [(2, 3, 8, 8, 6), (2, 3, 4, 4, 6), (2, 3, 2, 2, 6)]


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_resolution_exports_and_architecture_mismatch(run_dir, tmp_path):
    baseline = model_config("g2d_tiny")
    ckpt = resolve_weights(str(run_dir), baseline)
    assert ckpt.kind == "checkpoint" and ckpt.step == 3 and ckpt.has_text and ckpt.has_decoder
    assert ckpt.sha256 == sha256_file(run_dir / "checkpoints" / "step_00000003.pt")
    assert ckpt.model_cfg.encoder == "resnet18" and ckpt.model_cfg.encoder_weights == "none"
    full = resolve_weights(str(run_dir / "g2d_encoder_decoder.pth"), model_config("g2d_resnet50"))
    assert full.kind == "export_unet" and full.model_cfg.encoder == "resnet18"  # config.yaml beside it wins
    a, b = ckpt.build_unet(pretrained_decoder=True), full.build_unet(pretrained_decoder=True)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    enc = resolve_weights(str(run_dir / "g2d_encoder.pth"), baseline)
    assert enc.kind == "export_encoder" and not enc.has_decoder and not enc.has_text
    with pytest.raises(NotApplicable, match="no pretrained U-Net decoder"):
        enc.build_unet(pretrained_decoder=True)

    # A checkpoint whose saved config does not describe its weights: the error lists the keys.
    payload = torch.load(run_dir / "checkpoints" / "step_00000003.pt", weights_only=True)
    payload["config"]["model"]["decoder_channels"] = [64, 32, 16, 16, 8]
    bad = tmp_path / "bad" / "checkpoints" / "step_00000009.pt"
    bad.parent.mkdir(parents=True)
    torch.save(payload, bad)
    with pytest.raises(ArchitectureMismatch, match=r"wrong shape \['unet.decoder"):
        check_image_architecture(resolve_weights(str(bad), baseline))
    # An exported resnet18 encoder (no config.yaml beside it) into a resnet34 baseline: missing keys listed.
    lone = tmp_path / "lone.pth"
    torch.save(torch.load(run_dir / "g2d_encoder.pth", weights_only=True), lone)
    with pytest.raises(ArchitectureMismatch, match=r"missing \['layer1.2.bn1"):
        check_image_architecture(resolve_weights(str(lone), model_config("g2d_tiny", encoder="resnet34")))
    with pytest.raises(CheckpointNotFound, match="not found"):
        resolve_weights(str(tmp_path / "nothing.pt"), baseline)
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(BadCheckpoint, match="garbage.pt: not a readable torch file"):
        resolve_weights(str(tmp_path / "garbage.pt"), baseline)


def test_default_checkpoint_is_the_newest_run(tmp_path, run_dir):
    with pytest.raises(CheckpointNotFound, match="make pretrain"):
        default_checkpoint(base=tmp_path)
    older = tmp_path / "runs" / "pretrain_paper" / "checkpoints" / "step_00000500.pt"
    newer = tmp_path / "runs" / "demo" / "pretrain" / "checkpoints" / "step_00000100.pt"
    for path in (older, newer, older.with_name("step_00000400.pt")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    now = time.time()
    os.utime(older, (now - 100, now - 100))
    os.utime(older.with_name("step_00000400.pt"), (now - 200, now - 200))
    os.utime(newer, (now, now))
    assert default_checkpoint(base=tmp_path) == newer
    os.utime(older, (now + 10, now + 10))
    assert default_checkpoint(base=tmp_path) == older  # highest step of the run written last


# ---------------------------------------------------------------------------------------------
# every family end to end

FAMILY_RUNS = [
    ("rsna_linear", []),
    ("covidx_linear", ["linear.mode=fast", "linear.lrs=[1.0e-3,1.0e-2]", "linear.weight_decays=[0.0]"]),
    ("siim_segmentation", ["segmentation.decoder_channels=[32,16,16,8,8]"]),
    ("rsna_segmentation", ["segmentation.variant=encoder_decoder"]),
    ("object_cxr_detection", ["detection.head_width=32"]),
    ("chestxray14_finetune", ["data.batch_size=8"]),
    ("zeroshot_chexpert", []),
    ("grounding_siim", []),
]


@pytest.mark.parametrize("task,extra", FAMILY_RUNS, ids=[t for t, _ in FAMILY_RUNS])
def test_task_runs_end_to_end_and_records_results(task, extra, data_root, run_dir, tmp_path):
    # A key is given once on a command line (apply_overrides refuses repeats): extra replaces TINY's value.
    replaced = {o.split("=", 1)[0] for o in extra}
    overrides = [o for o in TINY if o.split("=", 1)[0] not in replaced] + extra
    rec = run_eval(task, str(run_dir), "1.0", data_root, overrides, output_root=str(tmp_path), log=lambda *_: None)
    path = rec["results_path"]
    assert path.startswith(str(tmp_path / task / "1.0"))
    saved = strict_json(path)  # nan is written as null, never NaN
    assert saved["task"] == task and saved["fraction"] == "1.0" and saved["seed"] == 42
    assert saved["checkpoint"]["sha256"] == sha256_file(run_dir / "checkpoints" / "step_00000003.pt")
    assert saved["data"]["manifest_sha256"] == sha256_file(saved["data"]["manifest"])
    assert saved["config"]["train"]["epochs"] == 1 and saved["config"]["data"]["dataset"] == get_task(task).dataset
    assert saved["plots"]
    for name in saved["plots"]:
        with open(os.path.join(os.path.dirname(path), name), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    m, family = saved["metrics"], get_task(task).family
    assert in_unit(saved["headline"]["value"]) and saved["headline"]["value"] == m[saved["headline"]["name"]]
    if family == "linear":
        key = "accuracy" if task == "covidx_linear" else "auroc"
        assert in_unit(m[key]) and m["n_test"] > 0
        if "linear.mode=fast" in extra:
            assert m["mode"] == "fast" and len(m["grid"]) == 2 and m["best_lr"] in (1e-3, 1e-2)
    elif family == "segmentation":
        assert all(in_unit(m[k]) for k in ("dice", "dice_positive", "iou"))
        assert m["n_test_positive"] >= 1 and m["variant"] == saved["variant"]
    elif family == "detection":
        assert (
            all(in_unit(m[k]) for k in ("map_all_images", "map_mgca")) and len(m["map_all_images_per_threshold"]) == 8
        )
        assert m["n_test_with_boxes"] >= 1 and "best_val_map_mgca" in m
        assert m["n_scored_mgca"] <= m["n_test_with_prediction"] <= m["n_test"]
        assert len(m["val_n_scored_mgca_per_epoch"]) == m["epochs_run"]
    elif family == "finetune":
        assert in_unit(m["auroc"]) and len(m["auroc_per_class"]) == 14
    elif family == "zeroshot_cls":
        assert all(in_unit(m[k]) for k in ("auc", "f1", "acc")) and len(m["per_class"]) == 5
    elif family == "grounding":
        assert all(in_unit(m[k]) for k in ("pointing", "pointing_cell", "iou", "dice", "medklip_iou", "medklip_dice"))
        assert m["n_positive"] >= 1 and m["threshold"] == 0.5
        # the configured map (the projector's by default) is the headline; the other map's pointing game beside it
        assert m["dense_map"] == "projector" and m["pointing"] == m["pointing_projector"]
        assert in_unit(m["pointing_attn_value"]) and in_unit(m["pointing_chance"])
    # predictions.npz beside results.json recomputes every metric; every metric has its interval.
    pred = load_predictions(os.path.join(os.path.dirname(path), saved["predictions"]))
    assert len(pred["keys"]) == len(pred["patient_ids"]) == m["n_test"]
    point = family_metrics(family, pred)
    assert set(point) == set(saved["ci95"])
    for name, value in point.items():
        recorded = m
        for part in name.split(".", 1) if "per_threshold" in name else name.split("."):
            recorded = recorded[part]
        assert (recorded is None and math.isnan(value[0])) or value[0] == pytest.approx(recorded, abs=1e-9), name
        ci = saved["ci95"][name]
        assert ci is None or (
            ci[0] <= ci[1] and (recorded is None or ci[0] - 1e-9 <= recorded <= ci[1] + 1e-9 or family == "detection")
        ), name
    assert saved["headline"]["ci95"] == saved["ci95"][saved["headline"]["name"]]
    assert saved["bootstrap"] == {"resamples": 1000, "seed": 42, "unit": "patient"}
    assert saved["data"]["views"]["test"]["transform"] == (
        "eval" if family in ("zeroshot_cls", "grounding") else saved["config"]["data"]["eval_transform"]
    )
    if family in ("zeroshot_cls", "grounding"):  # the checkpoint's own view, not the config's 256/224
        assert saved["data"]["views"]["test"]["image_size"] == 64 and "train" not in saved["data"]["views"]


def test_cpu_bf16_channels_last_runs_every_family(data_root, run_dir, tmp_path):
    """train.cpu_bf16 + train.channels_last (the quality bench's fast CPU path): every family that trains
    or extracts features runs under bf16 autocast with NHWC models and scores in float; off by default."""
    from eval.tasks.base import TrainSection

    assert TrainSection().autocast_precision(torch.device("cpu")) == "fp32"
    assert TrainSection(cpu_bf16=True).autocast_precision(torch.device("cpu")) == "bf16"
    assert TrainSection(precision="fp32", cpu_bf16=True).autocast_precision(torch.device("cpu")) == "fp32"
    for task, extra in FAMILY_RUNS:
        if task in ("zeroshot_chexpert", "covidx_linear"):
            continue  # no training (zero-shot) / the linear family's other dataset: same code as rsna_linear
        replaced = {o.split("=", 1)[0] for o in extra}
        overrides = [o for o in TINY if o.split("=", 1)[0] not in replaced] + extra
        overrides += ["train.cpu_bf16=true", "train.channels_last=true"]
        rec = run_eval(task, str(run_dir), "1.0", data_root, overrides, output_root=str(tmp_path), log=lambda *_: None)
        saved = strict_json(rec["results_path"])
        assert saved["config"]["train"]["cpu_bf16"] is True and saved["config"]["train"]["channels_last"] is True
        assert in_unit(saved["headline"]["value"]), (task, saved["headline"])


def test_baselines_random_and_imagenet_from_a_local_file(data_root, tmp_path):
    quiet = dict(output_root=str(tmp_path), log=lambda *_: None)
    rec = run_eval("rsna_linear", "random", "0.1", data_root, TINY, **quiet)
    assert rec["checkpoint"]["kind"] == "random" and rec["checkpoint"]["sha256"] is None
    assert rec["checkpoint"]["encoder"] == "resnet18"
    weights = tmp_path / "resnet18_imagenet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # a torchvision-layout file (fc included)
    rec = run_eval("rsna_linear", "imagenet", "1.0", data_root, TINY + [f"model.imagenet_weights={weights}"], **quiet)
    assert rec["checkpoint"]["kind"] == "imagenet" and in_unit(rec["metrics"]["auroc"])
    with pytest.raises(FileNotFoundError, match="model.imagenet_weights"):
        run_eval(
            "rsna_linear",
            "imagenet",
            "1.0",
            data_root,
            TINY + [f"model.imagenet_weights={tmp_path / 'missing.pth'}"],
            **quiet,
        )
    with pytest.raises(NotApplicable, match="text encoder"):
        run_eval("zeroshot_rsna", "random", "1.0", data_root, TINY, **quiet)


def test_all_prints_paper_tables_next_to_random_init(data_root, run_dir, tmp_path):
    overrides = TINY + ["linear.mode=fast", "segmentation.decoder_channels=[32,16,16,8,8]"]
    summary = run_all(
        str(run_dir),
        "1.0",
        data_root,
        overrides,
        output_root=str(tmp_path),
        tasks=["siim_segmentation", "zeroshot_siim"],
        log=lambda *_: None,
    )
    assert not summary["failed"]
    runs = {(r["task"], r["model"], r["variant"]): r["status"] for r in summary["records"]}
    assert runs == {
        ("siim_segmentation", "checkpoint", "encoder"): "ok",
        ("siim_segmentation", "checkpoint", "encoder_decoder"): "ok",
        ("siim_segmentation", "random", "encoder"): "ok",
        ("zeroshot_siim", "checkpoint", ""): "ok",
        ("zeroshot_siim", "random", ""): "ok",
    }  # the G2D model before pretraining
    tables = summary["tables"]
    for text in (
        "Table 1",
        "Table 2",
        "Table 4",
        "ours: random init",
        "paper G2D (1.0)",
        "REAL datasets",
        "siim_segmentation (encoder_decoder)",
        "68.4",
        "89.7/69.3/85.4",
        "not run",
    ):
        assert text in tables, text
    assert os.path.isfile(summary["summary_path"])
    assert strict_json(summary["summary_path"])["tables"] == tables


# ---------------------------------------------------------------------------------------------
# other people's encoders, bad checkpoint files, failed runs, reproducibility


def _torchvision_resnet18_state(seed: int = 3) -> dict:
    torch.manual_seed(seed)
    return torchvision.models.resnet18().state_dict()  # conv1..layer4 + fc: torchvision's layout


def test_foreign_encoders_plain_torchvision_and_prefixed_lightning(data_root, tmp_path):
    quiet = dict(output_root=str(tmp_path / "out"), log=lambda *_: None)
    state = _torchvision_resnet18_state()
    plain = tmp_path / "resnet18_other_method.pth"
    torch.save(state, plain)
    # MGCA keeps its image encoder under img_encoder_q.model. inside Lightning's {"state_dict": ...}.
    lightning = tmp_path / "mgca_style.ckpt"
    torch.save(
        {
            "epoch": 7,
            "state_dict": {
                **{f"img_encoder_q.model.{k}": v for k, v in state.items()},
                "text_encoder_q.embeddings.weight": torch.zeros(4, 2),
            },
        },
        lightning,
    )
    # The loaded encoder IS the file's weights, in both layouts; the image-only families run unchanged
    # on them (one family per run here to keep the file fast: linear, segmentation, detection).
    prefixed = ["ckpt.prefix=img_encoder_q.model."]
    for ckpt, prefix in ((plain, ""), (lightning, "img_encoder_q.model.")):
        loaded = resolve_weights(str(ckpt), model_config("g2d_tiny"), prefix=prefix).build_encoder().state_dict()
        assert set(loaded) == set(state) - {"fc.weight", "fc.bias"}
        assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    fast = ["linear.mode=fast", "linear.lrs=[1.0e-3]", "linear.weight_decays=[0.0]"]
    for ckpt, task, more in (
        (plain, "rsna_linear", fast),
        (plain, "siim_segmentation", ["segmentation.decoder_channels=[32,16,16,8,8]"]),
        (lightning, "rsna_detection", ["detection.head_width=32", *prefixed]),
    ):
        rec = run_eval(task, str(ckpt), "1.0", data_root, TINY + more, **quiet)
        assert in_unit(rec["headline"]["value"]) and rec["checkpoint"]["path"] == str(ckpt)
    assert rec["checkpoint"]["kind"] == "foreign_encoder"
    assert rec["checkpoint"]["keys"] == {
        "prefix": "img_encoder_q.model.",
        "kept": len(state),
        "dropped": 1,
        "dropped_examples": ["text_encoder_q.embeddings.weight"],
    }
    with pytest.raises(NotApplicable, match="text encoder"):
        run_eval("zeroshot_rsna", str(plain), "1.0", data_root, TINY, **quiet)
    # Without the prefix, the Lightning file says what to do; a wrong prefix lists the real ones.
    with pytest.raises(BadCheckpoint, match=r"ckpt.prefix=\.\.\., e.g. one of \['img_encoder_q.model.'"):
        resolve_weights(str(lightning), model_config("g2d_tiny"))
    with pytest.raises(BadCheckpoint, match="no tensor key starts with ckpt.prefix='encoder.'"):
        resolve_weights(str(lightning), model_config("g2d_tiny"), prefix="encoder.")
    # Strict: a missing and an unexpected key are both listed, before any data is read.
    broken = dict(state)
    broken["layer9.weight"] = broken.pop("layer1.0.conv1.weight")
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(
        ArchitectureMismatch, match=r"missing \['layer1.0.conv1.weight'\]; unexpected \['layer9.weight'\]"
    ):
        run_eval("rsna_linear", str(tmp_path / "broken.pth"), "1.0", data_root, TINY, **quiet)


class _Payload:
    """Unpickling this would run code (create a marker file): weights_only=True must refuse it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bad_checkpoint_files_are_one_line_errors_before_any_data(tmp_path, run_dir, capsys, monkeypatch):
    def no_data(*_a, **_k):
        raise AssertionError("data was rendered/packed before the checkpoint was checked")

    monkeypatch.setattr(eval_cli, "ensure_data", no_data)
    real = (run_dir / "checkpoints" / "step_00000003.pt").read_bytes()
    marker = tmp_path / "pwned"
    files = {
        "missing.pt": None,
        "truncated.pt": real[: len(real) // 2],
        "foreign.pth": b'{"a json": "file"}',
        "list.pth": None,
        "malicious.pt": None,
    }
    torch.save([1, 2, 3], tmp_path / "list.pth")
    torch.save({"model": _Payload(marker), "config": {}}, tmp_path / "malicious.pt")
    for name, content in files.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        out = tmp_path / "out"
        assert (
            eval_main(
                [
                    "--task",
                    "rsna_linear",
                    "--ckpt",
                    str(tmp_path / name),
                    "--data",
                    str(tmp_path / "no_data"),
                    "--output-root",
                    str(out),
                    "model.baseline=g2d_tiny",
                ]
            )
            == 2
        ), name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and name in err, (name, err)
        assert not out.exists()
    assert not marker.exists()


def test_failed_run_leaves_no_run_directory(data_root, run_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="segmentation.augment='sideways'"):
        run_eval(
            "siim_segmentation",
            str(run_dir),
            "1.0",
            data_root,
            TINY + ["segmentation.augment=sideways"],
            output_root=str(out),
            log=lambda *_: None,
        )
    assert not (out / "siim_segmentation").exists()


@pytest.mark.parametrize(
    "task,extra",
    [
        ("siim_segmentation", ["segmentation.decoder_channels=[32,16,16,8,8]"]),
        ("rsna_detection", ["detection.head_width=32"]),
    ],
)
def test_same_seed_same_results(task, extra, data_root, run_dir, tmp_path):
    """Two runs, same seed, same machine: identical metrics and intervals (augmentation included)."""
    runs = [
        run_eval(
            task, str(run_dir), "1.0", data_root, TINY + extra, output_root=str(tmp_path / str(i)), log=lambda *_: None
        )
        for i in range(2)
    ]
    assert runs[0]["metrics"] == runs[1]["metrics"] and runs[0]["ci95"] == runs[1]["ci95"]
    a, b = (load_predictions(os.path.join(os.path.dirname(r["results_path"]), "predictions.npz")) for r in runs)
    assert all(np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") for k in a)


def test_compare_two_runs_with_a_paired_interval(data_root, run_dir, tmp_path, capsys):
    from tools.compare import main as compare_main

    fast = ["linear.mode=fast", "linear.lrs=[1.0e-3]", "linear.weight_decays=[0.0]"]
    rec = run_eval(
        "rsna_linear",
        str(run_dir),
        "1.0",
        data_root,
        TINY + fast,
        output_root=str(tmp_path / "ev"),
        log=lambda *_: None,
    )
    run_a = os.path.dirname(rec["results_path"])
    # B is a checkpoint spec: evaluated here first, then compared on the same test images.
    with pytest.raises(SystemExit) as done:
        run_main(
            compare_main,
            [
                "--a",
                run_a,
                "--b",
                "random",
                "--task",
                "rsna_linear",
                "--data",
                data_root,
                "--output-root",
                str(tmp_path / "ev"),
                "--out",
                str(tmp_path / "cmp"),
                *TINY,
                *fast,
            ],
            extra_errors=EVAL_USER_ERRORS,
        )
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "B - A, 95% paired-bootstrap interval (1000 resamples of patients)" in out and "auroc" in out
    saved = strict_json(tmp_path / "cmp" / "compare.json")
    d = saved["metrics"]["auroc"]
    assert d["diff"] == pytest.approx(d["b"] - d["a"]) and d["ci95"][0] <= d["ci95"][1]
    assert d["a"] == pytest.approx(rec["metrics"]["auroc"]) and saved["b"]["checkpoint"]["kind"] == "random"
    # A run of another task is refused with one line.
    with pytest.raises(SystemExit) as done:
        run_main(compare_main, ["--a", run_a, "--b", run_a, "--task", "covidx_linear"], extra_errors=EVAL_USER_ERRORS)
    assert done.value.code == 2 and "is a 'rsna_linear' run" in capsys.readouterr().err


def test_yolo_shape_iou_uses_plus_one_convention():
    # Sizes 10 x 20 vs 5 x 40 (in whatever unit: build_targets passes grid cells), both centred at the
    # origin, each side counting one unit more: overlap (5+1)(20+1) = 126, areas 11*21 = 231 and
    # 6*41 = 246 -> 126 / 351 (1/3 without the +1).
    from eval.tasks.detection import _shape_iou

    iou = _shape_iou(torch.tensor([[10.0, 20.0]]), torch.tensor([[5.0, 40.0], [10.0, 20.0]]))
    torch.testing.assert_close(iou, torch.tensor([[126 / 351, 1.0]]))


def tiny_detection(*overrides: str) -> list[str]:
    """TINY + a 32-wide detection head, `overrides` replacing their keys (a key is given once)."""
    replaced = {o.split("=", 1)[0] for o in overrides}
    return [*(o for o in TINY if o.split("=", 1)[0] not in replaced), "detection.head_width=32", *overrides]


def run_detection(data_root, run_dir, out, *overrides: str) -> tuple[dict, str]:
    """rsna_detection on the tiny data with a 32-wide head and `overrides` (replacing TINY's keys)
    -> (the run's record, its log as one text)."""
    lines = []
    rec = run_eval(
        "rsna_detection",
        str(run_dir),
        "1.0",
        data_root,
        tiny_detection(*overrides),
        output_root=str(out),
        log=lambda *a: lines.append(" ".join(str(x) for x in a)),
    )
    return rec, "\n".join(lines)


def test_detection_says_why_map_is_undefined_when_no_box_passes(data_root, run_dir, tmp_path):
    # Issue 29: after a few epochs on the demo data no image kept a box at objectness >= 0.5, so
    # MGCA's rule scored nothing and the log only read "val map_mgca nan". A threshold no fresh head
    # reaches (logit 9.2) gives the same situation in one epoch.
    rec, text = run_detection(data_root, run_dir, tmp_path, "detection.conf_threshold=0.9999")
    m = rec["metrics"]
    assert m["map_mgca"] is None and m["n_scored_mgca"] == 0 and m["n_test_with_prediction"] == 0  # null: undefined
    assert m["val_n_scored_mgca_per_epoch"] == [0] and m["n_test_over_100_predictions"] == 0
    assert f"test: 0 of {m['n_test']} images kept a box at objectness >= 0.9999" in text
    assert "validation: 0 of" in text and "map_mgca scores the 0 with both -> mAP undefined (nan)" in text
    saved = strict_json(rec["results_path"])
    assert saved["metrics"]["map_mgca"] is None and saved["metrics"]["n_scored_mgca"] == 0


def test_detect_sends_every_confident_box_to_nms():
    # 3,087 anchors at 224 px, all confident and far apart is impossible; instead all confident with
    # one shape: NMS (not a cap) leaves one box per distinct location, and nothing is dropped before.
    size = (224, 224)
    anchors = scaled_anchors(size)
    grids = [(28, 28), (14, 14), (7, 7)]
    preds = [torch.zeros(1, 3, gh, gw, 6) for gh, gw in grids]
    for p in preds:
        p[..., 2:4] = -4.0  # tiny boxes (anchor * e^-4): no two cells overlap
        p[..., 4] = 30.0
    boxes, scores = detect(preds, anchors, size)[0]
    assert boxes.shape[0] > 300  # the former 300-box cap would have cut this
    assert torch.all(scores > 0.99)


def _detection_parts(data_root, run_dir, overrides=()):
    """(cfg, model, train loader, valid loader) of rsna_detection as eval/tasks/detection.run builds them."""
    from eval.runner import resolve_for
    from eval.tasks.data import make_loader
    from eval.tasks.detection import FrozenEncoderYOLO

    cfg = load_task_config("rsna_detection", "1.0", data_root, tiny_detection(*overrides))
    weights = resolve_for(cfg, str(run_dir))
    torch.manual_seed(0)
    model = FrozenEncoderYOLO(weights.build_encoder(), cfg.detection.head_width)
    train = make_loader(cfg, "train", torch.device("cpu"), weights, train=True, boxes=True)
    valid = make_loader(cfg, "valid", torch.device("cpu"), weights, train=False, boxes=True)
    return cfg, model, train, valid


def test_detection_feature_cache_serves_the_streamed_maps(data_root, run_dir):
    # The frozen encoder runs once per split: every cached map equals the map the streaming loop computes
    # for that sample, the head's loss on a cached batch equals its loss on the loader batch, each epoch
    # serves every training sample once in a (seed, epoch)-determined order, validation keeps its order.
    from eval.tasks.detection import build_targets, cache_features, head_inputs

    cfg, model, train, valid = _detection_parts(data_root, run_dir)
    cpu = torch.device("cpu")
    streamed = {}
    for batch in valid:
        feats, size = head_inputs(model, batch)
        for i, key in enumerate(batch.keys):
            streamed[key] = (tuple(f[i] for f in feats), batch.boxes[i], size)
    cached = cache_features(model, valid, cfg, cpu, 2**30, batch_size=3, shuffle=False)
    assert cached.keys == list(streamed) and len(cached) == math.ceil(len(streamed) / 3)
    served = [b for b in cached]
    assert [k for b in served for k in b.keys] == list(streamed)
    for b in served:
        assert b.image_size == (64, 64)
        for i, key in enumerate(b.keys):
            want_feats, want_boxes, want_size = streamed[key]
            assert want_size == b.image_size and torch.equal(b.boxes[i], torch.as_tensor(want_boxes).reshape(-1, 4))
            for got, want in zip(b.features, want_feats):
                assert torch.equal(got[i], want)
    # the head's loss: a loader batch and the cached batch of the same samples agree
    model.head.eval()
    loader_batch = next(iter(valid))
    cached_batch = next(
        iter(cache_features(model, valid, cfg, cpu, 2**30, batch_size=len(loader_batch), shuffle=False))
    )
    losses = []
    for b in (loader_batch, cached_batch):
        feats, size = head_inputs(model, b)
        preds = model.head(*feats)
        grids = [tuple(p.shape[2:4]) for p in preds]
        boxes = [torch.as_tensor(x).reshape(-1, 4) for x in b.boxes]
        losses.append(yolo_loss(preds, build_targets(boxes, grids, scaled_anchors(size), size))[0])
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-6)
    # training: each epoch is a permutation of the subset; epochs differ; the same epoch repeats
    shuffled = cache_features(model, train, cfg, cpu, 2**30, batch_size=4, shuffle=True)
    orders = []
    for epoch in (0, 1, 0):
        shuffled.set_epoch(epoch)
        orders.append([k for b in shuffled for k in b.keys])
    assert sorted(orders[0]) == sorted(shuffled.keys) and len(set(orders[0])) == len(shuffled.keys)
    assert orders[0] != orders[1] and orders[0] == orders[2]
    # a cap below one split's maps: no cache (the caller streams), known from the first batch
    assert cache_features(model, valid, cfg, cpu, 1000, batch_size=3, shuffle=False) is None
    cfg1, _, _, single = _detection_parts(data_root, run_dir, ["data.eval_batch_size=1"])
    assert len(single) >= 3

    class Counting:
        def __init__(self, loader):
            self.loader, self.served = loader, 0

        def __len__(self):
            return len(self.loader)

        def set_epoch(self, epoch):
            self.loader.set_epoch(epoch)

        def __iter__(self):
            for batch in self.loader:
                self.served += 1
                yield batch

    counting = Counting(single)
    per_image = cached.nbytes // len(cached.keys)
    assert cache_features(model, counting, cfg1, cpu, 2 * per_image, batch_size=1, shuffle=False) is None
    assert counting.served == 1


@pytest.mark.parametrize(
    "overrides,expect",
    [
        ([], ["validation images: frozen encoder run once", "training images: frozen encoder run once"]),
        (
            ["detection.feature_cache_gib=0.000001"],
            ["validation images: encoder maps pass", "training images: encoder maps pass"],
        ),
        (["data.train_transform=g2d_train"], ["data.train_transform=g2d_train augments"]),
    ],
    ids=["cached", "over_the_cap", "augmenting_transform"],
)
def test_detection_runs_with_and_without_the_feature_cache(overrides, expect, data_root, run_dir, tmp_path):
    # The cache is an implementation detail of the same protocol: each way yields a complete result, and
    # the log says which way ran and why.
    rec, text = run_detection(data_root, run_dir, tmp_path, "train.epochs=2", *overrides)
    assert all(e in text for e in expect), text
    m = rec["metrics"]
    assert m["epochs_run"] == 2 and len(m["val_n_scored_mgca_per_epoch"]) == 2 and m["n_test"] > 0


def test_is_deterministic_names_the_augmenting_transforms():
    from pipeline.config import TRANSFORM_NAMES, is_deterministic

    assert {t for t in TRANSFORM_NAMES if is_deterministic(t)} == {"eval", "g2d_paper_eval", "mgca_eval"}
    assert not is_deterministic("checkpoint")


def test_detection_select_on_is_checked_and_recorded(data_root, run_dir, tmp_path):
    with pytest.raises(ConfigError, match="select_on"):
        load_task_config("rsna_detection", "1.0", data_root, ["detection.select_on=map_best"])
    m = run_detection(data_root, run_dir, tmp_path, "detection.select_on=map_all_images")[0]["metrics"]
    assert m["selected_on"] == "map_all_images" and "best_val_map_all_images" in m and "best_val_map_mgca" not in m


def test_bench_detection_times_both_arms_and_writes_its_section(data_root, run_dir, tmp_path):
    # make bench-detection's module on the tiny data: both arms run every epoch (no early stop), the
    # cached one records its fill, JSON and the docs/performance.md section are written.
    from bench import detection_cache

    results, doc = tmp_path / "detection_cache.json", tmp_path / "performance.md"
    argv = ["--ckpt", str(run_dir), "--data", data_root, "--fraction", "1.0", "--epochs", "2"]
    argv += ["--results", str(results), "--doc", str(doc), "--output-root", str(tmp_path / "runs")]
    assert detection_cache.main([*argv, *tiny_detection()]) == 0
    saved = strict_json(results)
    streaming, cached = saved["arms"]["streaming"], saved["arms"]["cached"]
    assert streaming["epochs_run"] == cached["epochs_run"] == 2 and streaming["feature_cache"] == {}
    assert (
        set(cached["feature_cache"]) == {"validation", "training"} and cached["feature_cache"]["training"]["images"] > 0
    )
    assert saved["train_speedup"] == pytest.approx(streaming["train_seconds"] / cached["train_seconds"])
    text = doc.read_text()
    assert (
        "## Detection: the frozen encoder once per split" in text and "| streaming |" in text and "| cached |" in text
    )
