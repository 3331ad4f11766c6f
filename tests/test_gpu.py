"""The CUDA code paths, checked where a GPU is present (skipped on CPU-only machines and in CI).

`tools/device_check.sh` runs this file on a lent GPU machine. The CPU twins of every check live in
test_pipeline.py / test_train.py; here the same contracts are asserted for what only runs with CUDA:
DALI's "mixed" (nvJPEG) decode + GPU augmentation, torchvision's GPU decode, batches delivered on the
device, the trainer in bf16 / fp16 + GradScaler with fused AdamW (with MFU and memory per sample
logged), and the training step's levers: compiled parts and CUDA graphs, SDPA vs eager BERT attention,
and bench-train's max-batch search (CPU twins in test_step_perf.py, test_bench_train.py).
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
from train.flops import peak_flops

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
    mad = (
        (
            unnormalise(torch.cat([b.image for b in ref]), cfg, name)
            - unnormalise(torch.cat([b.image for b in got]), cfg, name)
        )
        .abs()
        .mean()
        .item()
    )
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
    text = finish(
        run_pretrain(
            overrides(
                mimic_shards,
                tiny_bert,
                out,
                **{
                    "train.max_steps": 6,
                    "train.precision": precision,
                    "data.backend": backend,
                    "train.channels_last": True,
                    "train.checkpoint_every": 3,
                },
            )
        )
    )
    assert "final_step" in text
    got = losses(out)
    assert sorted(got) == list(range(1, 7)) and all(v == v and abs(v) < 1e4 for v in got.values())
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert max(r.get("mem_mb", 0.0) for r in rows) > 0  # torch.cuda.max_memory_allocated
    steps = [r for r in rows if "loss" in r]
    assert all(r["mem_mb_per_sample"] > 0 and r["gflops_per_sample"] > 0 for r in steps)
    if peak_flops(GPU.device, precision)[0]:  # a GPU in train/flops.py's table
        assert all(0 < r["mfu"] < 1 for r in steps)
    ckpt = torch.load(out / "checkpoints" / "step_00000006.pt", weights_only=True, map_location="cpu")
    assert ckpt["config"]["train"]["precision"] == precision


# ---- the training step's GPU levers (CPU twins: tests/test_step_perf.py) --------------------------


@pytest.fixture(scope="module")
def step_bert(tmp_path_factory):
    from model.text import build_tiny_text_model
    from tests.test_step_perf import REPORTS

    return str(build_tiny_text_model(tmp_path_factory.mktemp("step_bert"), REPORTS * 5, hidden=32, layers=2, heads=2))


def gpu_step(bert: str, precision: str = "bf16", **model_overrides):
    from model.registry import build_model, model_config
    from tests.test_step_perf import no_dropout
    from train.optim import OptimConfig, build_optimizer
    from train.step import TrainStep, make_scaler

    torch.manual_seed(0)
    cfg = model_config("g2d_tiny", text_model=bert, text_freeze_layers=1, pa_warmup_steps=0, **model_overrides)
    model = no_dropout(build_model(cfg)).to(GPU.device).to(memory_format=torch.channels_last).train()
    optim = build_optimizer(model, OptimConfig(lr=1e-4))
    scaler, fixed = make_scaler(GPU.device, precision, skip_nonfinite=False)
    return TrainStep(model, optim, None, scaler, fixed, precision, 0.0, True), model


def gpu_batches(bert: str, n: int = 3, pad_multiple=16):
    from tests.test_step_perf import make_batch

    out = []
    for s in range(n):
        b = make_batch(bert, size=128, n=8, pad_multiple=pad_multiple, seed=s)
        out.append(
            type(b)(
                image=b.image.cuda(),
                input_ids=b.input_ids.cuda(),
                attention_mask=b.attention_mask.cuda(),
                keys=b.keys,
                meta=b.meta,
                texts=b.texts,
            )
        )
    return out


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_compiled_step_and_cuda_graphs_train_like_the_eager_step(step_bert, cuda_graphs):
    from tests.test_step_perf import run_losses
    from train.step import compile_for_speed

    batches = gpu_batches(step_bert)
    ref_fn, _ = gpu_step(step_bert)
    ref = run_losses(ref_fn, batches)
    step_fn, model = gpu_step(step_bert)
    graphs, note = compile_for_speed(model, compile=True, cuda_graphs=cuda_graphs, device=GPU.device)
    step_fn.cuda_graphs = graphs
    assert graphs == cuda_graphs and ("reduce-overhead" in note) == cuda_graphs
    got = run_losses(step_fn, batches + batches)  # second pass: graph replays
    assert torch.isfinite(got).all()
    # bf16 autocast: compiled kernels round differently; a few steps stay within bf16 noise.
    assert torch.allclose(got[:3], ref, rtol=3e-2, atol=3e-2), (got, ref)


def test_sdpa_and_eager_attention_agree_on_gpu(step_bert):
    from tests.test_step_perf import run_losses

    batches = gpu_batches(step_bert)
    got = [run_losses(gpu_step(step_bert, text_attn_implementation=impl)[0], batches) for impl in ("sdpa", "eager")]
    assert torch.allclose(got[0], got[1], rtol=3e-2, atol=3e-2), got


def test_max_batch_search_finds_the_oom_boundary(step_bert):
    """bench-train's max-batch search, on the tiny model with the GPU capped to a few GiB so the
    boundary is reached in seconds."""
    from bench.train import max_batch

    texts = ["No acute cardiopulmonary process. Heart size is normal."] * 64
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 6 * 2**30 / total), 0)
    try:
        found = max_batch("g2d_tiny", step_bert, "ours", GPU.device, texts, start=64, limit=1 << 16)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
    good, bad = found["max_batch"], found["first_oom"]
    assert bad is not None and 1 <= good < bad and bad - good <= max(1, good // 16)
    assert any(ok for _, ok in found["probes"]) and any(not ok for _, ok in found["probes"])


def test_flops_table_knows_this_gpu():
    peak, source = peak_flops(GPU.device, "bf16")
    name = torch.cuda.get_device_name(0)
    if any(k in name for k in ("H100", "H200", "A100", "L40S", "L4")):
        assert peak and peak > 1e14, source
