"""The trainer end to end on CPU: a smoke run with every artefact, exact resume after SIGKILL,
two gloo ranks under torchrun, non-finite loss handling, config errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch

from common.config import ConfigError
from common.dist import DistInfo
from tests.pipeline_fixtures import ROOT, child_env, shell_env
from train.config import load_pretrain_config

PY = sys.executable


def overrides(shards, bert, out, **extra) -> list[str]:
    args = {
        "data.shards": shards,
        "model.text_model": bert,
        "train.output_dir": out,
        "data.backend": "torch",
        "data.num_workers": 1,
        "data.image_size": 64,
        "model.image_size": 64,
        "train.batch_size_per_gpu": 4,
        "train.log_every": 1,
        "train.checkpoint_every": 4,
        "train.plot_every": 0,
        "train.val_every": 0,
        "train.val_batches": 2,
        "train.progress": False,
        "model.pa_warmup_steps": 2,
        "optim.schedule": "constant",
        "train.resume": "auto",
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def run_pretrain(args: list[str], nproc: int = 0, **popen) -> subprocess.Popen:
    env = child_env(OMP_NUM_THREADS="1")
    if nproc:
        cmd = [
            str(Path(PY).parent / "torchrun"),
            f"--nproc_per_node={nproc}",
            "--master_port=29561",
            "-m",
            "train.pretrain",
        ]
    else:
        cmd = [PY, "-m", "train.pretrain"]
    return subprocess.Popen(
        cmd + ["--config", "configs/pretrain/demo.yaml", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    text, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, text[-3000:]
    return text


def test_smoke_run_writes_every_artefact(mimic_shards, tiny_bert, tmp_path):
    out = tmp_path / "run"
    text = finish(
        run_pretrain(
            overrides(
                mimic_shards,
                tiny_bert,
                out,
                **{"train.max_steps": 5, "train.plot_every": 5, "train.tensorboard": "true"},
            )
        )
    )
    assert "retrieval_top1" in text
    # Logging: console lines come from `logging` and the rank's file holds the same step lines.
    assert "INFO [rank 0] g2d.train: step 5 loss" in text
    assert "step 5 loss" in (out / "logs" / "rank0.log").read_text()
    assert (out / "plots" / "loss_curves.png").stat().st_size > 1000
    # TensorBoard: event files that hold the logged scalars at the logged steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for tag in ("loss", "vla_loss", "pa_loss", "lr", "img_emb_std", "pos_cos", "val/retrieval_top1"):
        assert tag in events.Tags()["scalars"], tag
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    for r in steps:
        for key in (
            "loss",
            "vla_loss",
            "pa_loss",
            "lr",
            "img_per_s",
            "data_wait_frac",
            "mem_mb",
            "img_emb_std",
            "txt_emb_std",
            "pos_cos",
            "neg_cos",
        ):
            assert isinstance(r[key], float) and r[key] == r[key], key
    assert steps[0]["pa_active"] is False and steps[-1]["pa_active"] is True
    assert any("val/retrieval_top5" in r for r in rows)
    cfg = load_pretrain_config(out / "config.yaml", [])
    assert cfg.train.max_steps == 5 and cfg.resolved_model.image_size == 64
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004.pt", "step_00000005.pt"]
    ckpt = torch.load(out / "checkpoints" / "step_00000005.pt", weights_only=True)
    assert ckpt["step"] == 5 and ckpt["config"]["model"]["name"] == "g2d_tiny"
    assert list((out / "plots").glob("*.png"))
    # Exports load into the plain smp U-Net that G2D/MGCA downstream code builds.
    unet = smp.Unet(
        cfg.model.encoder, encoder_weights=None, classes=1, decoder_channels=list(cfg.model.decoder_channels)
    )
    unet.load_state_dict(torch.load(out / "g2d_encoder_decoder.pth", weights_only=True), strict=True)
    unet.encoder.load_state_dict(torch.load(out / "g2d_encoder.pth", weights_only=True), strict=True)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(mimic_shards, tiny_bert, tmp_path):
    steps = 10  # the train split holds ~14 batches of 4 here, so the kill lands mid-epoch
    ref = tmp_path / "ref"
    finish(run_pretrain(overrides(mimic_shards, tiny_bert, ref, **{"train.max_steps": steps})))

    out = tmp_path / "killed"
    # keep_last=1 next to an unreadable step_*.pt sorting last: each save used to prune the checkpoint
    # it had just written, so the resume below restarted at step 0.
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_00000099.pt").write_bytes(b"garbage")
    killed_args = overrides(mimic_shards, tiny_bert, out, **{"train.max_steps": steps, "train.keep_last": 1})
    proc = run_pretrain(killed_args)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step_00000004.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = max(losses(out))
    assert killed_at < steps, "the run finished before it could be killed"
    text = finish(run_pretrain(killed_args))
    assert "[resume]" in text and "at step 4" in text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000010.pt", "step_00000099.pt"]
    got, want = losses(out), losses(ref)
    assert sorted(got) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), f"step {s}"


def test_two_gloo_ranks_under_torchrun(mimic_shards, tiny_bert, tmp_path):
    out = tmp_path / "ddp"
    text = finish(run_pretrain(overrides(mimic_shards, tiny_bert, out, **{"train.max_steps": 3}), nproc=2))
    assert "final_step" in text
    assert max(losses(out)) == 3

    # Both ranks log to their own file, and the losses there are the mean over ranks: the ranks see
    # different samples, so equal lines show the all-reduce happened.
    def loss_lines(rank: int) -> list[str]:
        text = (out / "logs" / f"rank{rank}.log").read_text()
        return [ln.split(": ", 1)[1].split(" img/s")[0] for ln in text.splitlines() if ": step " in ln]

    lines = {r: loss_lines(r) for r in (0, 1)}
    assert len(lines[0]) == 3 and lines[0] == lines[1], lines
    # `make pretrain NGPU=2` is this same launch through torchrun's API (tools/launch.py; the make
    # variables reach it through the environment: tests/test_make_targets.py runs it).
    dry = subprocess.run(
        ["make", "-n", "pretrain", "NGPU=2", "ARGS=train.max_steps=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=shell_env(),
        check=True,
    ).stdout
    assert '-m tools.launch --nproc "$NGPU"' in dry and ' train.pretrain --config "$CONFIG" $ARGS' in dry


def _nan_after(model, step_nan: int):
    real_forward = model.forward

    def forward(image, input_ids, attention_mask, step):
        out = real_forward(image, input_ids, attention_mask, step=step)
        if step >= step_nan:
            out.loss = out.loss * float("nan")
        return out

    model.forward = forward
    return model


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_loss(mode, mimic_shards, tiny_bert, tmp_path, monkeypatch):
    import train.pretrain as pretrain

    real_build = pretrain.build_model
    monkeypatch.setattr(pretrain, "build_model", lambda cfg: _nan_after(real_build(cfg), 2))
    cfg = load_pretrain_config(
        "configs/pretrain/demo.yaml",
        overrides(
            mimic_shards,
            tiny_bert,
            tmp_path / mode,
            **{"train.max_steps": 4, "train.nonfinite": mode, "data.num_workers": 0, "train.log_every": 2},
        ),
    )
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    if mode == "stop":
        with pytest.raises(pretrain.NonFiniteLoss, match="non-finite loss at step 3"):
            pretrain.train(cfg, dist)
    else:
        pretrain.train(cfg, dist)
        rows = [json.loads(ln) for ln in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        assert [r["skipped_steps"] for r in rows if "skipped_steps" in r] == [
            0,
            2,
        ]  # NaN from step 3 on: none by step 2, steps 3-4 by step 4


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown key"):
        load_pretrain_config("configs/pretrain/demo.yaml", ["train.max_stepz=3"])
    with pytest.raises(ConfigError, match="is set from train.batch_size_per_gpu"):
        load_pretrain_config("configs/pretrain/demo.yaml", ["data.batch_size_per_gpu=3"])
    with pytest.raises(ConfigError, match="train.precision"):
        load_pretrain_config("configs/pretrain/demo.yaml", ["train.precision=fp8"])
    for name in ("g2d_paper", "g2d_code", "demo"):
        cfg = load_pretrain_config(f"configs/pretrain/{name}.yaml", [])
        assert cfg.resolved_data.batch_size_per_gpu == cfg.train.batch_size_per_gpu


@pytest.mark.parametrize("name", ["demo", "g2d_code", "g2d_paper"])
def test_model_view_is_derived_from_data_and_configs_keep_their_meaning(name):
    import yaml

    from common.config import config_to_dict
    from model.registry import model_config

    path = f"configs/pretrain/{name}.yaml"
    raw = yaml.safe_load(Path(ROOT, path).read_text())
    # As it resolved before: the registry base updated with the YAML's model keys.
    before = {**config_to_dict(model_config(raw["model"]["name"])), **raw["model"]}
    cfg = load_pretrain_config(path, [])
    after = config_to_dict(cfg.resolved_model)
    changed = {k: (before[k], after[k]) for k in after if before[k] != after[k]}
    # The one intended change: the paper recipe's model is built for the 224 crop it receives.
    assert changed == ({"image_size": (256, 224)} if name == "g2d_paper" else {}), changed
    side = cfg.data.crop_size if name == "g2d_paper" else cfg.data.image_size
    model, data = cfg.resolved_model, cfg.resolved_data
    assert model.image_size == side and model.max_text_length == cfg.data.max_text_length
    assert (data.batch_size_per_gpu, data.seed) == (cfg.train.batch_size_per_gpu, cfg.train.seed)
    # Each value is stored once: the sections hold no copy to go stale, and the saved config repeats none.
    saved = config_to_dict(cfg)
    assert not {"image_size", "max_text_length"} & set(saved["model"]), saved["model"]
    assert not {"batch_size_per_gpu", "seed"} & set(saved["data"]), saved["data"]
    assert not hasattr(cfg.data, "seed") and not hasattr(cfg.model, "image_size")


def test_conflicting_duplicated_knobs_name_both_keys(tmp_path):
    from common.config import save_config

    demo, paper = "configs/pretrain/demo.yaml", "configs/pretrain/g2d_paper.yaml"
    with pytest.raises(ConfigError, match=r"model.image_size=64 conflicts with data.image_size=128"):
        load_pretrain_config(demo, ["model.image_size=64"])
    with pytest.raises(
        ConfigError,
        match=r"model.image_size=256 conflicts with data.crop_size=224 "
        r"\(data.transform=g2d_paper crops\)",
    ):
        load_pretrain_config(paper, ["model.image_size=256"])
    with pytest.raises(ConfigError, match=r"model.max_text_length=64 conflicts with data.max_text_length=128"):
        load_pretrain_config(demo, ["model.max_text_length=64"])
    with pytest.raises(ConfigError, match=r"data.image_size=100 must be a multiple of 32"):
        load_pretrain_config(demo, ["data.image_size=100"])
    with pytest.raises(ConfigError, match=r"data.seed=1 conflicts with train.seed=42"):
        load_pretrain_config(demo, ["data.seed=1"])
    # One knob moves both; the saved resolved config shows the derived values and loads back as is.
    cfg = load_pretrain_config(demo, ["data.image_size=96", "data.max_text_length=64", "train.seed=7"])
    model = cfg.resolved_model
    assert (model.image_size, model.max_text_length, cfg.resolved_data.seed) == (96, 64, 7)
    save_config(cfg, tmp_path / "config.yaml")
    saved = load_pretrain_config(tmp_path / "config.yaml", [])
    assert saved.resolved_model == model and saved == cfg


def test_saved_configs_of_older_runs_still_load(tmp_path):
    """Older runs saved the derived copies (data.batch_size_per_gpu/seed, model.image_size/max_text_length):
    resume (load_pretrain_config, the checkpoint's model comparison) and eval (model_config_from_saved)
    read both layouts to the same resolved model."""
    import dataclasses

    import yaml

    from common.config import config_to_dict
    from eval.checkpoint import model_config_from_saved, saved_model_fields

    cfg = load_pretrain_config("configs/pretrain/g2d_paper.yaml", ["train.seed=3"])
    new = config_to_dict(cfg)
    old = config_to_dict(cfg)
    old["data"].update(batch_size_per_gpu=128, seed=3)
    old["model"].update(image_size=224, max_text_length=256)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert load_pretrain_config(tmp_path / "config.yaml", []) == cfg
    expected = dataclasses.replace(cfg.resolved_model, encoder_weights="none")
    assert model_config_from_saved(new, "new") == expected == model_config_from_saved(old, "old")
    assert saved_model_fields(new, "new") == config_to_dict(cfg.resolved_model)
    # A run from before the derivation keeps the size its model was built with (its weights' shapes).
    older = {**old, "model": {**old["model"], "image_size": 256}}
    assert model_config_from_saved(older, "older").image_size == 256
    with pytest.raises(ConfigError, match=r"data.seed=4 conflicts with train.seed=3"):
        load_pretrain_config(tmp_path / "config.yaml", ["data.seed=4"])
