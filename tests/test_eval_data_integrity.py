"""A damaged evaluation test set is an error, not a smaller test set.

Through the evaluation CLI (`make eval` runs `python -m tools.eval`): a test sample damaged mid-scan
(JPEG bytes whose crc32 no longer matches), a bad json member or a bad mask fails the run with one line
`error: ...` naming the shard, the sample and the reason, and leaves no run directory; the same damage
in the training split is skipped and recorded in results.json (count and keys), and the test count
results.json reports is the number of images scored (predictions.npz)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common.cli import run_main
from eval.runner import load_predictions
from shards.downstream import convert
from shards.synthetic.downstream import write_all
from tests.pipeline_fixtures import find_member
from tools.eval import EVAL_USER_ERRORS
from tools.eval import main as eval_cli_main

DATASET = "rsna_pneumonia"
TINY = [
    "train.epochs=1",
    "data.image_size=64",
    "data.crop_size=64",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "data.num_workers=0",
    "data.backend=torch",
    "model.baseline=g2d_tiny",
    "plots=false",
]
FAST_LINEAR = ["linear.mode=fast", "linear.lrs=[1.0e-3]", "linear.weight_decays=[0.0]"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """RSNA, ~20 images (12 / 4 / 4), packed at max side 96."""
    src, out = tmp_path_factory.mktemp("rsna_src"), tmp_path_factory.mktemp("rsna_shards")
    write_all(src, 20, 0, datasets=(DATASET,))
    convert(DATASET, src / DATASET, out, max_side=96, workers=1, seed=0, progress=False)
    return out


def damaged_copy(packed: Path, tmp_path: Path, split: str, ext: str, where: str) -> tuple[Path, str, str]:
    """A copy of the shards with one `split` sample's `ext` member damaged in place (same size, so the
    tar and index still fit): `where` = "middle" flips bytes inside the data (a JPEG's scan), "start"
    overwrites the first bytes. Returns (data root, shard name, key)."""
    root = tmp_path / "data"
    shutil.copytree(packed, root)
    manifest = json.loads((root / DATASET / "manifest.json").read_text())
    record = next(r for r in manifest["_shard_records"] if r["name"].startswith(f"{split}/"))
    key = record["keys"][1]
    shard, offset, size = find_member(root / DATASET, manifest, key, ext)
    with open(root / DATASET / shard, "r+b") as fh:
        if where == "middle":
            fh.seek(offset + size // 2)
            chunk = fh.read(16)
            fh.seek(offset + size // 2)
            fh.write(bytes(b ^ 0x5A for b in chunk))
        else:
            fh.seek(offset)
            fh.write(b"{not json"[:size] if ext == "json" else b"\x00" * min(size, 32))
    return root, shard, key


def eval_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        run_main(eval_cli_main, argv, extra_errors=EVAL_USER_ERRORS)
    return done.value.code


def run(task: str, data: Path, out: Path, extra: list[str]) -> int:
    return eval_cli(["--task", task, "--ckpt", "random", "--data", str(data), "--output-root", str(out), *TINY, *extra])


@pytest.mark.parametrize(
    "task, ext, where, reason, extra",
    [
        ("rsna_linear", "jpg", "middle", "jpg: crc32 mismatch", FAST_LINEAR),
        ("rsna_linear", "json", "start", "json", FAST_LINEAR),
        ("rsna_segmentation", "png", "start", "png", []),
    ],
    ids=["jpeg-mid-scan", "bad-json", "bad-mask"],
)
def test_a_damaged_test_sample_fails_the_run_naming_it(packed, tmp_path, capsys, task, ext, where, reason, extra):
    data, shard, key = damaged_copy(packed, tmp_path, "test", ext, where)
    out = tmp_path / "runs"
    assert run(task, data, out, extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # Above it only the run's log lines (stderr, the project's logger); no traceback.
    assert all(" g2d.eval: " in line for line in err[:-1]) and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith(f"error: {task}: the test split has an unreadable sample"), err
    assert f"{shard}: sample {key}: {reason}" in err[-1]
    assert not out.exists()  # no run directory survives, nor the output root this run made


def test_damaged_training_samples_are_skipped_and_recorded(packed, tmp_path, capsys):
    data, shard, key = damaged_copy(packed, tmp_path, "train", "jpg", "middle")
    out = tmp_path / "runs"
    assert run("rsna_linear", data, out, FAST_LINEAR) == 0
    err = capsys.readouterr().err
    assert f"WARNING [rank 0] g2d.eval: [eval] rsna_linear: skipped 1 unreadable train sample(s): {key}" in err
    (results_path,) = out.rglob("results.json")
    results = json.loads(results_path.read_text())
    skipped = results["data"]["skipped_samples"]
    assert list(skipped) == ["train"] and skipped["train"]["count"] == 1
    (sample,) = skipped["train"]["samples"]
    assert sample["key"] == key and sample["shard"] == shard and sample["reason"].startswith("jpg: crc32 mismatch")
    scored = load_predictions(results_path.parent / "predictions.npz")["keys"]
    assert results["data"]["test_scored"] == results["data"]["splits"]["test"] == len(scored) == 4
    assert results["data"]["train_subset"]["images"] == 12  # the subset lists it; the loader left it out
    # The evaluation logs like training: the project's logger on the console and in the run's own file.
    log_file = (results_path.parent / "eval.log").read_text()
    assert "WARNING g2d.eval: [eval] rsna_linear: skipped 1 unreadable train sample(s)" in log_file
    assert "INFO g2d.eval: [eval] rsna_linear: 95% bootstrap intervals" in log_file
    assert "INFO [rank 0] g2d.eval: [eval] rsna_linear: auroc = " in err


def test_an_intact_run_records_no_skips_and_scores_the_whole_test_split(packed, tmp_path):
    out = tmp_path / "runs"
    assert run("rsna_linear", packed, out, FAST_LINEAR) == 0
    (results_path,) = out.rglob("results.json")
    results = json.loads(results_path.read_text())
    assert results["data"]["skipped_samples"] == {}
    assert results["data"]["valid_images"] == results["data"]["splits"]["valid"] == 4  # no cap: all of it
    keys = load_predictions(results_path.parent / "predictions.npz")["keys"]
    manifest = json.loads((packed / DATASET / "manifest.json").read_text())
    test_keys = next(r["keys"] for r in manifest["_shard_records"] if r["name"].startswith("test/"))
    assert sorted(keys.tolist()) == sorted(test_keys) and np.unique(keys).size == results["data"]["test_scored"]


def test_valid_max_images_caps_the_validation_loader_only(packed, tmp_path, monkeypatch):
    """data.valid_max_images=2: the validation loader reads 2 of the 4 valid images, the training
    and test loaders are untouched, and results.json says how many validated."""
    import eval.tasks.data as task_data

    selected = {}

    def recording(cfg, split, dist):
        loader = build_loader(cfg, split, dist)
        selected[split] = loader.index.num_selected
        return loader

    build_loader = task_data.build_loader
    monkeypatch.setattr(task_data, "build_loader", recording)
    out = tmp_path / "runs"
    assert run("rsna_linear", packed, out, FAST_LINEAR + ["data.valid_max_images=2"]) == 0
    results = json.loads(next(out.rglob("results.json")).read_text())
    assert selected == {"train": 12, "valid": 2, "test": 4}
    assert results["data"]["valid_images"] == 2 and results["data"]["splits"]["valid"] == 4
    assert results["config"]["data"]["valid_max_images"] == 2


def test_fewer_test_images_than_the_manifest_lists_is_an_error(packed, tmp_path, capsys):
    """A shard that holds fewer test samples than its manifest claims: the run fails rather than
    report a metric over a smaller test set than results.json would name."""
    data = tmp_path / "data"
    shutil.copytree(packed, data)
    path = data / DATASET / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["splits"]["test"]["num_samples"] += 1
    path.write_text(json.dumps(manifest))
    out = tmp_path / "runs"
    assert run("rsna_linear", data, out, FAST_LINEAR) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"error: rsna_linear: scored 4 test images but {path} lists 5 in split 'test'; "
        "a test set must not shrink: re-pack the dataset"
    )
    assert not any(out.rglob("results.json"))
