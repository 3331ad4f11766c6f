"""The CUDA code paths, checked where a GPU is present (skipped on CPU-only machines and in CI).

`tools/device_check.sh` runs this file on a lent GPU machine. The CPU twins of every check live in
test_pipeline.py / test_train.py; here the same contracts are asserted for what only runs with CUDA:
DALI's "mixed" (nvJPEG) decode + GPU augmentation, torchvision's GPU decode, batches delivered on the
device, and the trainer in bf16 / fp16 + GradScaler with fused AdamW.
"""
from __future__ import annotations

import json

import pytest
import torch

from common.dist import DistInfo
from pipeline import DataConfig, build_loader
from pipeline.dali_backend import dali_available
from tests.pipeline_fixtures import all_texts, pack_tiny, tiny_tokenizer
from tests.test_pipeline import config, unnormalise
from tests.test_train import finish, losses, overrides, run_pretrain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
GPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_gpu")
    return root, pack_tiny(root)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny_tokenizer(all_texts(tiny[0]))


def batches(cfg: DataConfig, dist: DistInfo, tokenizer, epoch: int = 2) -> list:
    loader = build_loader(cfg, "valid", dist, tokenizer=tokenizer)
    loader.set_epoch(epoch)
    return [b for b in loader]


def assert_same_batches(ref: list, got: list, cfg: DataConfig, name: str, device: torch.device) -> float:
    assert [b.keys for b in ref] == [b.keys for b in got]
    assert [b.texts for b in ref] == [b.texts for b in got]
    for br, bg in zip(ref, got):
        assert bg.image.device.type == device.type and bg.image.dtype == torch.float32
        assert bg.input_ids.device.type == device.type
        assert torch.equal(br.input_ids, bg.input_ids.cpu())
        assert br.image.shape == bg.image.shape
    mad = (unnormalise(torch.cat([b.image for b in ref]), cfg, name)
           - unnormalise(torch.cat([b.image for b in got]), cfg, name)).abs().mean().item()
    assert mad < 2.0, f"{name}: mean abs difference {mad:.3f}/255 vs the CPU torch backend"
    return mad


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
@pytest.mark.parametrize("name", ["eval", "mgca_eval", "g2d_train"])
def test_dali_mixed_decode_matches_the_cpu_torch_backend(tiny, tokenizer, name):
    root, _ = tiny
    kw = dict(transform=name, shuffle=name == "g2d_train", drop_last=False)
    ref = batches(config(root, backend="torch", **kw), CPU, tokenizer)
    cfg = config(root, backend="dali", **kw)
    loader = build_loader(cfg, "valid", GPU, tokenizer=tokenizer)
    assert loader.backend == "dali"
    got = batches(cfg, GPU, tokenizer)
    assert_same_batches(ref, got, cfg, name, GPU.device)


@pytest.mark.parametrize("name", ["eval", "g2d_train", "mgca_train"])
def test_torchvision_gpu_decode_matches_the_cpu_torch_backend(tiny, tokenizer, name):
    root, _ = tiny
    kw = dict(transform=name, shuffle=True, drop_last=False)
    ref = batches(config(root, backend="torch", **kw), CPU, tokenizer)
    cfg = config(root, backend="torch", torch_gpu_decode=True, **kw)
    got = batches(cfg, GPU, tokenizer)
    assert_same_batches(ref, got, cfg, name, GPU.device)


def test_auto_backend_picks_dali_on_a_gpu(tiny):
    loader = build_loader(config(tiny[0], backend="auto"), "train", GPU)
    assert loader.backend == ("dali" if dali_available() else "torch")


@pytest.mark.parametrize("precision,backend", [("bf16", "dali"), ("fp16", "torch")])
def test_pretrain_runs_on_the_gpu(precision, backend, mimic_shards, tiny_bert, tmp_path):
    if backend == "dali" and not dali_available():
        pytest.skip("nvidia-dali not installed")
    out = tmp_path / precision
    text = finish(run_pretrain(overrides(mimic_shards, tiny_bert, out, **{
        "train.max_steps": 6, "train.precision": precision, "data.backend": backend,
        "train.channels_last": True, "train.checkpoint_every": 3})))
    assert "final_step" in text
    got = losses(out)
    assert sorted(got) == list(range(1, 7)) and all(v == v and abs(v) < 1e4 for v in got.values())
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert max(r.get("mem_mb", 0.0) for r in rows) > 0          # torch.cuda.max_memory_allocated
    ckpt = torch.load(out / "checkpoints" / "step_00000006.pt", weights_only=True, map_location="cpu")
    assert ckpt["config"]["train"]["precision"] == precision
