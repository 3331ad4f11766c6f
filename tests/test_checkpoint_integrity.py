"""Checkpoints and exports carry a checksum, checked wherever they are loaded (issue #29): damaged
tensor bytes are found at resume and at evaluation, a damaged newest checkpoint falls back to the one
before it, a damaged file named explicitly is one line `error: ...`; older files without a checksum
load with a warning. Also the weights files a user names that are not weights (model.encoder_weights,
an export's config.yaml, ImageNet offline) and weights of another shape: one line each."""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
import urllib.error
import zipfile
from pathlib import Path

import pytest
import torch

from common.cli import run_main
from common.io import DIGEST_KEY, payload_digest, sidecar_path
from common.run_layout import checkpoint_path
from eval.checkpoint import resolve_weights
from model.registry import model_config
from tests.pipeline_fixtures import ROOT, child_env
from tests.test_reliability_train import run_overrides
from tools.eval import EVAL_USER_ERRORS
from tools.eval import main as eval_cli_main
from train.checkpoint import CheckpointError, find_resume_checkpoint, load_checkpoint, save_checkpoint
from train.pretrain import main as pretrain_main

DEMO = str(ROOT / "configs/pretrain/demo.yaml")


def zero_inside_largest_tensor(path: Path, nbytes: int = 4096) -> str:
    """Overwrite `nbytes` in the middle of the checkpoint's largest tensor record with zeros (the zip
    stays valid: torch.load does not check the CRCs). -> the record's name."""
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    assert info.file_size > 2 * nbytes and info.compress_type == zipfile.ZIP_STORED
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        fh.seek(start)
        assert fh.read(nbytes) != bytes(nbytes), "the region was zero already: no damage to find"
        fh.seek(start)
        fh.write(bytes(nbytes))
    return info.filename


def exit_of(main, argv, capsys, extra=()) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        run_main(main, argv, extra_errors=extra)
    return info.value.code, capsys.readouterr().err


def assert_one_line(code, err, *needles):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def payload(step: int) -> dict:
    return {
        "model": {"w": torch.randn(64, 1024)},  # 256 KiB: room for 4 KiB of damage inside one tensor
        "optimizer": {},
        "scheduler": {},
        "scaler": {},
        "step": step,
        "loader": {"epoch": 0},
        "rng": [],
        "config": {"model": {}},
        "run_id": "me",
    }


# ---- the digest itself ----------------------------------------------------------------------


def test_digest_covers_every_tensor_byte_and_value_and_survives_a_round_trip(tmp_path):
    p = {"a": torch.randn(3, 5).t(), "b": [1, 2.5, "x", None, (3, 4)], "c": {0: torch.tensor(3.0), "e": torch.zeros(0)}}
    p["bf16"] = torch.randn(7).to(torch.bfloat16)
    torch.save(p, tmp_path / "p.pt")
    assert payload_digest(torch.load(tmp_path / "p.pt", weights_only=True)) == payload_digest(p)
    for change in (
        lambda q: q["a"][1, 2].copy_(torch.nextafter(q["a"][1, 2], torch.tensor(9.0))),  # one float's last bit
        lambda q: q["b"].__setitem__(1, 2.6),
        lambda q: q["c"].__setitem__(0, torch.tensor(3.0, dtype=torch.float64)),  # same value, other dtype
        lambda q: q.__setitem__("a", q["a"].reshape(3, 5)),  # same bytes, other shape
    ):
        q = torch.load(tmp_path / "p.pt", weights_only=True)
        change(q)
        assert payload_digest(q) != payload_digest(p)


def test_damaged_checkpoint_is_refused_and_resume_auto_falls_back(tmp_path, caplog):
    for step in (1, 2):
        save_checkpoint(checkpoint_path(tmp_path, step), payload(step), keep_last=3)
    newest = checkpoint_path(tmp_path, 2)
    assert DIGEST_KEY not in load_checkpoint(newest)  # checked, then removed: the payload as saved
    zero_inside_largest_tensor(newest)
    torch.load(newest, weights_only=True)  # torch alone loads it without a word: the bug
    with pytest.raises(CheckpointError, match=rf"checkpoint {newest} is damaged: .*checksum"):
        load_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="g2d"):
        path, ckpt = find_resume_checkpoint(tmp_path)
    assert path == checkpoint_path(tmp_path, 1) and ckpt["step"] == 1
    assert any("skipping" in r.message and "damaged" in r.message for r in caplog.records)


def test_checkpoint_without_a_checksum_loads_with_a_warning(tmp_path, caplog):
    (tmp_path / "checkpoints").mkdir()
    torch.save(payload(3), checkpoint_path(tmp_path, 3))  # as written before checkpoints carried one
    with caplog.at_level(logging.WARNING, logger="g2d"):
        assert load_checkpoint(checkpoint_path(tmp_path, 3))["step"] == 3
    assert any("no checksum" in r.message for r in caplog.records)


# ---- through the commands: a real run -------------------------------------------------------


def run_args(shards, bert, out, **extra) -> list[str]:
    """The reliability tests' tiny run, checkpointed at steps 2 and 4."""
    return run_overrides(out, shards, bert, **{"train.checkpoint_every": 2, "train.max_steps": 4, **extra})


@pytest.fixture(scope="module")
def trained(mimic_shards, tiny_bert, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 and both exports (a subprocess, as users run it)."""
    out = tmp_path_factory.mktemp("run") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "train.pretrain", "--config", DEMO, *run_args(mimic_shards, tiny_bert, out)],
        cwd=ROOT,
        env=child_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def damaged_copy(trained: Path, dest: Path) -> Path:
    """A copy of the run whose newest checkpoint (step 4) has 4 KiB zeroed inside a tensor."""
    (dest / "checkpoints").mkdir(parents=True)
    for step in (2, 4):
        checkpoint_path(dest, step).write_bytes(checkpoint_path(trained, step).read_bytes())
    (dest / "config.yaml").write_bytes((trained / "config.yaml").read_bytes())
    zero_inside_largest_tensor(checkpoint_path(dest, 4))
    return dest


def test_resume_named_damaged_checkpoint_is_one_line(trained, mimic_shards, tiny_bert, tmp_path, capsys, monkeypatch):
    run = damaged_copy(trained, tmp_path / "run")
    bad = checkpoint_path(run, 4)
    args = run_args(mimic_shards, tiny_bert, tmp_path / "new", **{"train.resume": bad, "train.max_steps": 6})
    code, err = exit_of(pretrain_main, ["--config", DEMO, *args], capsys)
    assert_one_line(code, err, str(bad), "is damaged", "checksum")
    assert not list((tmp_path / "new").glob("checkpoints/*.pt"))


def test_resume_auto_skips_the_damaged_newest_and_continues_from_the_one_before(
    trained, mimic_shards, tiny_bert, tmp_path
):
    run = damaged_copy(trained, tmp_path / "run")
    args = run_args(mimic_shards, tiny_bert, run, **{"train.resume": "auto", "train.max_steps": 6})
    proc = subprocess.run(
        [sys.executable, "-m", "train.pretrain", "--config", DEMO, *args],
        cwd=ROOT,
        env=child_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[resume] skipping" in proc.stderr and "is damaged" in proc.stderr
    assert "at step 2" in proc.stderr
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert steps == [3, 4, 5, 6]  # trained on from step 2; the damaged step 4 was replaced
    assert load_checkpoint(checkpoint_path(run, 4))["step"] == 4  # rewritten whole


def eval_main(argv) -> int:
    """The CLI as `make eval` runs it (`python -m tools.eval`): -> exit status."""
    with pytest.raises(SystemExit) as done:
        run_main(eval_cli_main, list(argv), extra_errors=EVAL_USER_ERRORS)
    return done.value.code


def eval_args(ckpt, tmp_path) -> list[str]:
    return [
        "--task",
        "rsna_linear",
        "--ckpt",
        str(ckpt),
        "--data",
        str(tmp_path / "no_data"),
        "--output-root",
        str(tmp_path / "out"),
        "model.baseline=g2d_tiny",
    ]


def test_eval_of_damaged_checkpoint_or_export_is_one_line(trained, tmp_path, capsys, monkeypatch):
    from tools import eval as eval_cli

    monkeypatch.setattr(eval_cli, "ensure_data", lambda *a, **k: pytest.fail("read data before checking the weights"))
    run = damaged_copy(trained, tmp_path / "run")
    bad = checkpoint_path(run, 4)
    assert eval_main(eval_args(bad, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(bad) in err and "is damaged" in err, err
    # The run directory (what CKPT=<run> and the default CKPT read): the step-2 checkpoint, with a warning.
    pre = resolve_weights(str(run), model_config("g2d_tiny"))
    assert pre.kind == "checkpoint" and pre.step == 2
    assert f"skipping {bad} is damaged" in capsys.readouterr().err
    # An export with 4 KiB zeroed: its sidecar no longer matches. Without a sidecar it loads unchecked.
    for name in ("g2d_encoder.pth", "g2d_encoder_decoder.pth"):
        assert sidecar_path(trained / name).is_file(), name
        export = run / name
        export.write_bytes((trained / name).read_bytes())
        sidecar_path(export).write_bytes(sidecar_path(trained / name).read_bytes())
        assert resolve_weights(str(export), model_config("g2d_tiny")).sha256 in sidecar_path(export).read_text()
        zero_inside_largest_tensor(export)
        assert eval_main(eval_args(export, tmp_path)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "is damaged" in err and name in err, err
        sidecar_path(export).unlink()
        resolve_weights(str(export), model_config("g2d_tiny"))


def test_eval_export_with_python_tag_in_config_yaml_is_one_line(trained, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "g2d_encoder.pth").write_bytes((trained / "g2d_encoder.pth").read_bytes())
    (run / "config.yaml").write_text("model: !!python/object/apply:os.system ['touch pwned']\n")
    assert eval_main(eval_args(run / "g2d_encoder.pth", tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "config.yaml, line 1" in err, err
    (run / "config.yaml").write_text("- a list\n")
    assert eval_main(eval_args(run / "g2d_encoder.pth", tmp_path)) == 2
    assert "not a run config" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists() and not (ROOT / "pwned").exists()


def test_resume_with_weights_of_another_shape_names_the_keys(
    trained, mimic_shards, tiny_bert, tmp_path, capsys, monkeypatch
):
    # Same saved config, weights that do not fit it (an edited file, another text model in the same
    # folder): the one line names the keys instead of torch's multi-line load_state_dict report.
    ckpt = load_checkpoint(checkpoint_path(trained, 2))
    ckpt["model"]["image.projector.net.0.weight"] = torch.zeros(3, 3, 1, 1)
    ckpt["model"]["image.extra.weight"] = ckpt["model"].pop("image.attn_pool.c_proj.bias")
    edited = tmp_path / "edited.pt"
    save_checkpoint(edited, ckpt, keep_last=1)
    args = run_args(mimic_shards, tiny_bert, tmp_path / "new", **{"train.resume": edited, "train.max_steps": 6})
    code, err = exit_of(pretrain_main, ["--config", DEMO, *args], capsys)
    assert_one_line(
        code, err, str(edited), "missing ['image.attn_pool.c_proj.bias']", "unexpected ['image.extra.weight']"
    )
    assert "image.projector.net.0.weight: file (3, 3, 1, 1)" in err


# ---- weights files named in the config ------------------------------------------------------


class Pwn:
    def __reduce__(self):
        return (open, ("pwned", "w"))


@pytest.mark.parametrize("kind", ["pickle", "truncated", "text", "list"])
def test_bad_encoder_weights_file_is_one_line(kind, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "weights.pth"
    if kind == "pickle":
        torch.save({"conv1.weight": Pwn()}, path)
    elif kind == "truncated":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "text":
        path.write_text("conv1.weight: 1\n")
    else:
        torch.save([1, 2], path)
    args = run_args("unused", "unused", tmp_path / "run", **{"model.encoder_weights": path})
    code, err = exit_of(pretrain_main, ["--config", DEMO, *args], capsys)
    assert_one_line(code, err, "model.encoder_weights=", str(path))
    assert not (tmp_path / "pwned").exists()


def test_imagenet_weights_offline_is_one_line(tmp_path, capsys, monkeypatch):
    from torchvision.models._api import WeightsEnum

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    args = run_args("unused", "unused", tmp_path / "run", **{"model.encoder_weights": "imagenet"})
    code, err = exit_of(pretrain_main, ["--config", DEMO, *args], capsys)
    assert_one_line(code, err, "could not download the ImageNet weights", "model.encoder_weights=/path/to/file.pth")


def test_damaged_checkpoint_through_the_make_targets_is_one_line(trained, mimic_shards, tiny_bert, tmp_path):
    """The same two refusals as users meet them: `make pretrain ARGS="train.resume=<file>"` and
    `make eval CKPT=<file>` print one `error:` line (make's own Error line may follow) and exit 2."""
    from tests.test_make_targets import assert_one_line as assert_one_make_line
    from tests.test_make_targets import make

    bad = checkpoint_path(damaged_copy(trained, tmp_path / "run"), 4)
    args = run_args(mimic_shards, tiny_bert, tmp_path / "new", **{"train.resume": bad, "train.max_steps": 6})
    done = make("pretrain", f"CONFIG={DEMO}", "ARGS=" + " ".join(args))
    assert_one_make_line(done.returncode, done.stderr, str(bad), "is damaged")
    assert not list((tmp_path / "new").glob("checkpoints/*.pt"))
    no_data = tmp_path / "no_data"
    done = make("eval", "TASK=rsna_linear", f"CKPT={bad}", f"DATA={no_data}", "ARGS=model.baseline=g2d_tiny")
    assert_one_make_line(done.returncode, done.stderr, str(bad), "is damaged")
