"""Logging of the trainer: `logging` set-up per rank, Weights & Biases (error without the package, the
calls with a fake one), the loss-curve PNG, and the training-health statistics and warnings (also on
a deliberately collapsed model run end to end)."""

from __future__ import annotations

import importlib.machinery
import json
import logging
import math
import sys
import types

import pytest
import torch

from common.cli import UserError
from common.dist import DistInfo
from common.log import get_logger, setup_logging
from tests.test_train import overrides
from train.config import load_pretrain_config
from train.health import HealthCheck, build_health_check, chance_vla_loss, embedding_stats
from train.metrics_log import MetricsLog
from train.visualize import save_loss_curves

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_rank0_logs_to_console_every_rank_to_its_file(tmp_path, capsys):
    for rank in (1, 0):
        path = setup_logging(rank, tmp_path / "logs")
        get_logger("train").info("hello from %d", rank)
        get_logger("train").debug("not at INFO level")
    err = capsys.readouterr().err
    assert "hello from 0" in err and "hello from 1" not in err  # console: rank 0 only
    assert path == tmp_path / "logs" / "rank0.log"
    for rank in (0, 1):
        text = (tmp_path / "logs" / f"rank{rank}.log").read_text()
        assert f"[rank {rank}] g2d.train: hello from {rank}" in text and "not at INFO" not in text
    # A second set-up replaces the handlers: no duplicated lines, no writes to the old folder.
    setup_logging(0, tmp_path / "other")
    get_logger("train").warning("once")
    assert capsys.readouterr().err.count("once") == 1
    assert "once" not in (tmp_path / "logs" / "rank0.log").read_text()
    logging.getLogger("g2d").handlers.clear()


def _fake_wandb(calls: list) -> types.ModuleType:
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class Run:
        def log(self, data, step):
            calls.append(("log", dict(data), step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    module.init = init
    return module


def test_wandb_calls_with_a_fake_module(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    log = MetricsLog(
        tmp_path / "metrics.jsonl",
        0,
        True,
        wandb=True,
        wandb_project="proj",
        run_id="abc",
        config={"train": {"seed": 1}},
    )
    log.write({"step": 3, "loss": 1.5, "pa_active": True, "health": ["x"], "mfu": None, "val/auc": 0.7})
    log.close()
    assert calls[0] == (
        "init",
        {"project": "proj", "id": "abc", "resume": "allow", "dir": str(tmp_path), "config": {"train": {"seed": 1}}},
    )
    # Numbers only (flags, lists and None stay in metrics.jsonl), at the record's step.
    assert calls[1] == ("log", {"loss": 1.5, "val/auc": 0.7}, 3)
    assert calls[2] == ("finish",)
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["health"] == ["x"]


def test_wandb_without_the_package_is_a_clear_error(mimic_shards, tiny_bert, tmp_path, monkeypatch):
    import train.pretrain as pretrain

    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails, find_spec says "not installed"
    monkeypatch.setattr(pretrain, "build_model", lambda cfg: pytest.fail("built a model before the check"))
    cfg = load_pretrain_config(
        "configs/pretrain/demo.yaml", overrides(mimic_shards, tiny_bert, tmp_path / "run", **{"train.wandb": "true"})
    )
    with pytest.raises(UserError, match=r"train.wandb=true but the wandb package is not installed"):
        pretrain.train(cfg, CPU)


def test_loss_curves_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 3.0 - s / 10, "vla_loss": 2.0, "pa_loss": 1.0 - s / 10, "lr": 1e-3} for s in (1, 2, 3)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"step": 3, "val/auc": 0.5}) + "\n")
    png = save_loss_curves(metrics, tmp_path / "plots" / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    metrics.write_text(json.dumps({"step": 3, "val/auc": 0.5}) + "\n")
    with pytest.raises(ValueError, match="no training rows"):
        save_loss_curves(metrics, tmp_path / "x.png")


def test_embedding_stats_and_health_rules():
    torch.manual_seed(0)
    spread = torch.nn.functional.normalize(torch.randn(64, 128), dim=-1)
    std_img, std_txt, pos, neg = embedding_stats(spread, spread).tolist()
    assert abs(std_img - 1 / math.sqrt(128)) < 0.01 and std_txt == pytest.approx(std_img)
    assert pos == pytest.approx(1.0) and abs(neg) < 0.05  # matched pairs identical, others ~orthogonal
    same = torch.nn.functional.normalize(torch.ones(8, 128), dim=-1)  # a collapsed tower: one point
    std_img, _, pos, neg = embedding_stats(same, spread[:8]).tolist()
    assert std_img == pytest.approx(0.0, abs=1e-6) and pos == pytest.approx(neg, abs=1e-6)

    assert chance_vla_loss(8, "mean") == pytest.approx(math.log(8))
    assert chance_vla_loss(8, "sum") == pytest.approx(2 * math.log(8))
    check = HealthCheck(chance_vla_loss(32, "mean"), after_step=50, loss_margin=0.03, min_spread=0.1, dim=128)
    assert check.problems(40, math.log(32), 0.0, 0.0) == []  # still warming up
    stuck = check.problems(60, math.log(32) * 0.99, 0.08, 0.08)
    assert len(stuck) == 1 and "not 3% below chance" in stuck[0]
    collapsed = check.problems(60, 1.0, 0.001, 0.08)
    assert len(collapsed) == 1 and "image embeddings collapsed" in collapsed[0]
    assert check.problems(60, math.log(32) * 0.9, 0.08, 0.08) == []  # learning, spread kept


# The VLA loss per log step of the documented `make demo` run (configs/pretrain/demo.yaml: batch 32,
# 176 steps; runs/demo/pretrain/metrics.jsonl). Slow at first, but learning.
DEMO_VLA = [
    (10, 3.511),
    (20, 3.471),
    (30, 3.451),
    (40, 3.448),
    (50, 3.361),
    (60, 3.244),
    (70, 3.197),
    (80, 3.076),
    (90, 2.929),
    (100, 2.737),
    (110, 2.826),
    (120, 2.664),
    (130, 2.498),
    (140, 2.37),
    (150, 2.267),
    (160, 2.291),
    (170, 2.116),
    (176, 2.265),
]


def test_demo_recipe_does_not_warn_batch_8_does():
    cfg = load_pretrain_config("configs/pretrain/demo.yaml", [])
    check = build_health_check(cfg, world_size=1, max_steps=176)
    assert check.chance_loss == pytest.approx(math.log(32)) and check.after_step == 58  # 176 // 3
    for step, vla in DEMO_VLA:
        assert check.problems(step, vla, 0.05, 0.05) == [], step
    # The run: demo recipe at batch 8 for 600 steps, VLA loss flat at ln(8) -> warned from step 200.
    small = build_health_check(
        load_pretrain_config("configs/pretrain/demo.yaml", ["train.batch_size_per_gpu=8"]), world_size=1, max_steps=600
    )
    assert small.problems(199, math.log(8), 0.05, 0.05) == []
    assert "not 3% below chance 2.0794" in small.problems(200, math.log(8), 0.05, 0.05)[0]


def _collapse_image_tower(model):
    """Every image gets the same pooled embedding (the graph kept, so the step still runs)."""

    def constant_pooled(module, inputs, output):
        seg, dense, pooled, attention = output
        return seg, dense, pooled * 0 + 1, attention

    model.image.register_forward_hook(constant_pooled)
    return model


def test_collapsed_model_run_warns(mimic_shards, tiny_bert, tmp_path, monkeypatch):
    import train.pretrain as pretrain

    real_build = pretrain.build_model
    monkeypatch.setattr(pretrain, "build_model", lambda cfg: _collapse_image_tower(real_build(cfg)))
    out = tmp_path / "collapsed"
    cfg = load_pretrain_config(
        "configs/pretrain/demo.yaml",
        overrides(
            mimic_shards,
            tiny_bert,
            out,
            **{
                "train.max_steps": 4,
                "data.num_workers": 0,
                "train.log_every": 2,
                "train.health_after_steps": 3,
                "train.val_batches": 1,
            },
        ),
    )
    pretrain.train(cfg, CPU)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "vla_loss" in r]
    assert "health" not in steps[0]  # step 2: before health_after_steps
    problems = steps[1]["health"]  # step 4
    assert any("image embeddings collapsed" in p for p in problems)
    assert any("below chance" in p for p in problems)  # vla >= ln(4) with one image point
    assert steps[1]["img_emb_std"] < 1e-4
    assert "[health] step 4: image embeddings collapsed" in (out / "logs" / "rank0.log").read_text()
    logging.getLogger("g2d").handlers.clear()


class _BarRecorder:
    """Stands in for tqdm: records each bar's settings (a known total is what gives the ETA) and count."""

    bars: list = []

    def __init__(self, iterable, **kwargs):
        self.iterable, self.kwargs = iterable, kwargs
        _BarRecorder.bars.append(self)

    def __iter__(self):
        self.count = 0
        for item in self.iterable:
            self.count += 1
            yield item


def test_verify_and_synthetic_rendering_show_bars_with_totals(mimic_shards, tmp_path, monkeypatch):
    import shards.synthetic.mimic as synth
    import shards.verify as verify

    monkeypatch.setattr(verify, "tqdm", _BarRecorder)
    monkeypatch.setattr(synth, "tqdm", _BarRecorder)
    _BarRecorder.bars = []
    summary = verify.verify_dataset(mimic_shards)
    synth.generate_mimic(tmp_path / "corpus", n=3, seed=1, size=64, workers=1)
    check, render = _BarRecorder.bars
    shards = sum(s["shards"] for s in summary["splits"].values())
    assert check.kwargs["total"] == check.count == shards and check.kwargs["unit"] == "shard"
    assert render.kwargs["total"] == render.count == 3 and render.kwargs["unit"] == "study"
