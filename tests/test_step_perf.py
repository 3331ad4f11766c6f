"""The training step: G2D's PA warm-up reproduced in the optimiser state, FLOP counting / MFU, and
the speed levers (each one numerically equivalent to the plain step on CPU)."""

from __future__ import annotations

import pytest
import torch

from model.registry import build_model, model_config
from model.text import build_tiny_text_model
from train.optim import OptimConfig, build_optimizer
from train.step import TrainStep, make_scaler

REPORTS = [
    "No acute cardiopulmonary process.",
    "Small left pleural effusion with adjacent atelectasis. Heart size is normal.",
    "Lungs are clear. No pneumothorax. Stable cardiomediastinal silhouette.",
    "Mild pulmonary edema and bilateral effusions, right greater than left.",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on two shared cores: one intra-op thread is ~10x faster than oversubscribing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return str(build_tiny_text_model(tmp_path_factory.mktemp("tiny_bert"), REPORTS * 5, hidden=32, layers=2, heads=2))


def make_batch(tiny_bert: str, size: int = 64, n: int = 4, padding="longest", pad_multiple=None, seed: int = 0):
    from transformers import AutoTokenizer

    from pipeline import Batch

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    texts = (REPORTS * n)[:n]
    enc = tok(
        texts, padding=padding, truncation=True, max_length=32, pad_to_multiple_of=pad_multiple, return_tensors="pt"
    )
    gen = torch.Generator().manual_seed(seed)
    return Batch(
        image=torch.randn(n, 3, size, size, generator=gen),
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        keys=[""] * n,
        meta=[{}] * n,
        texts=texts,
    )


def make_train_step(tiny_bert: str, weight_decay: float = 0.0, lr: float = 1e-3, **model_overrides):
    torch.manual_seed(0)
    cfg = model_config("g2d_tiny", text_model=tiny_bert, text_freeze_layers=1, **model_overrides)
    model = build_model(cfg).train()
    optim = build_optimizer(model, OptimConfig(lr=lr, weight_decay=weight_decay, fused=True))
    scaler, fixed = make_scaler(torch.device("cpu"), "fp32", skip_nonfinite=False)
    return TrainStep(model, optim, None, scaler, fixed, "fp32", 0.0, False), model


def adamw_first_update(
    p: torch.Tensor, g: torch.Tensor, lr: float, wd: float, beta1=0.9, beta2=0.999, eps=1e-8, prior_zero_steps: int = 0
) -> torch.Tensor:
    """AdamW's update of p for gradient g, by hand, after `prior_zero_steps` steps of zero gradient
    (0: a parameter the optimiser has never seen, as in G2D's code after its PA warm-up)."""
    k = prior_zero_steps + 1
    m_hat = (1 - beta1) * g / (1 - beta1**k)
    v_hat = (1 - beta2) * g * g / (1 - beta2**k)
    return -lr * wd * p - lr * m_hat / (v_hat.sqrt() + eps)


def test_pa_warmup_leaves_the_decoder_and_its_optimizer_state_untouched(tiny_bert):
    warmup, lr, wd = 3, 1e-3, 0.1
    step_fn, model = make_train_step(tiny_bert, weight_decay=wd, lr=lr, pa_warmup_steps=warmup)
    pa_params = model.pa_parameters()
    pa_ids = {id(p) for p in pa_params}
    assert pa_params and len(pa_ids) < len([p for p in model.parameters() if p.requires_grad])
    before = [p.detach().clone() for p in pa_params]
    for step in range(warmup):
        step_fn([make_batch(tiny_bert, seed=step)], step)
    # Official: no gradient, so no AdamW state and no weight decay for the decoder during warm-up.
    assert all(torch.equal(b, p) for b, p in zip(before, pa_params))
    assert not any(p in step_fn.optimizer.state for p in pa_params)
    encoder_conv = model.image.unet.encoder.conv1.weight
    assert int(step_fn.optimizer.state[encoder_conv]["step"]) == warmup

    # The switch step: capture each decoder gradient as it is accumulated, then compare the actual
    # update with AdamW's first step computed by hand (a reference that never saw the warm-up).
    grads = {}
    hooks = [
        p.register_post_accumulate_grad_hook(lambda q: grads.__setitem__(id(q), q.grad.detach().clone()))
        for p in pa_params
    ]
    wd_of = {id(p): g["weight_decay"] for g in step_fn.optimizer.param_groups for p in g["params"]}
    start = [p.detach().clone() for p in pa_params]
    step_fn([make_batch(tiny_bert, seed=warmup)], warmup)
    for h in hooks:
        h.remove()
    ratios = []
    for p, p0 in zip(pa_params, start):
        g = grads[id(p)]
        assert g.abs().sum() > 0, "PA is active at the switch step: the decoder must get a gradient"
        expected = adamw_first_update(p0, g, lr, wd_of[id(p)])
        # Elements with |g| near AdamW's eps (g*g underflows in fp32) are left out of the exact check.
        sure = g.abs() > 1e-5
        assert sure.float().mean() > 0.5
        err = ((p.detach() - p0) - expected)[sure].abs().max().item()
        assert torch.allclose((p.detach() - p0)[sure], expected[sure], rtol=1e-3, atol=1e-8), (err, tuple(p.shape))
        # What counting the warm-up steps of zero gradient would have given instead (the old bug):
        counted = adamw_first_update(p0, g, lr, wd_of[id(p)], prior_zero_steps=warmup)
        ratios.append(((counted.abs().sum()) / expected.abs().sum()).item())
    # After 3 zero steps the bias correction makes updates ~0.58x (after G2D's 200: ~1.35x): the check bites.
    assert max(abs(r - 1) for r in ratios) > 0.3 and min(abs(r - 1) for r in ratios) > 0.3


# ---- the speed levers: each one gives the plain step's losses (dropout off: RNG streams differ) ----


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def image_only_pseudo_mask(model: torch.nn.Module) -> torch.nn.Module:
    """A pseudo-mask target from the image alone. The real one thresholds the attention map at a
    quantile, so a rounding-level difference (aot_eager's decomposed kernels vs eager, which differ
    between CPUs) can flip a cell and move the PA loss and its gradients by far more than rounding;
    with this target both runs see the same mask and the comparison is about the compiled parts."""
    model.make_pseudo_mask = lambda attention, image: (image.mean(1, keepdim=True) > image.mean()).float()
    return model


def run_losses(step_fn, batches, start: int = 0) -> torch.Tensor:
    return torch.stack([step_fn([b], start + i)[0] for i, b in enumerate(batches)])  # [steps, 4]: 3 losses + mask IoU


def grads_and_losses(step_fn, batches) -> tuple[dict, torch.Tensor]:
    """Gradients of one forward/backward on batches[0] (PA active), then the losses of a short run."""
    model = step_fn.model
    image = batches[0].image
    image = image.contiguous(memory_format=torch.channels_last) if step_fn.channels_last else image
    model(image, batches[0].input_ids, batches[0].attention_mask, step=10**6).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    step_fn.optimizer.zero_grad(set_to_none=True)
    return grads, run_losses(step_fn, batches)


def assert_equivalent(a: tuple[dict, torch.Tensor], b: tuple[dict, torch.Tensor]) -> None:
    """Same gradients to rounding; the first step's losses to rounding; later steps within noise
    (AdamW's first updates are ~lr*sign(g), so rounding-level gradient differences and a flipped
    pseudo-mask cell move the next losses by ~1e-3)."""
    (ga, la), (gb, lb) = a, b
    assert ga.keys() == gb.keys() and len(ga) > 10
    overall = max(g.abs().max() for g in ga.values())  # gradients of ~0 are compared absolutely
    for name in ga:
        assert torch.allclose(ga[name], gb[name], rtol=1e-3, atol=1e-5 * overall), name
    assert torch.allclose(la[0], lb[0], atol=1e-5), (la, lb)
    assert torch.allclose(la[:, :3], lb[:, :3], rtol=1e-2), (la, lb)
    # The 4th column, the pseudo masks' pairwise IoU, counts cells: one flipped cell moves it by ~0.01.
    assert torch.allclose(la[:, 3], lb[:, 3], atol=0.05), (la, lb)


def test_sdpa_and_eager_bert_attention_train_identically(tiny_bert):
    batches = [make_batch(tiny_bert, seed=s) for s in range(3)]
    got = {}
    for impl in ("sdpa", "eager"):
        step_fn, model = make_train_step(tiny_bert, text_attn_implementation=impl, pa_warmup_steps=0)
        assert model.text.bert.config._attn_implementation == impl
        no_dropout(model)
        got[impl] = grads_and_losses(step_fn, batches)
    assert_equivalent(got["sdpa"], got["eager"])
    with pytest.raises(ValueError, match="text_attn_implementation"):
        make_train_step(tiny_bert, text_attn_implementation="flash_attention_2")


def test_text_lengths_bucketed_to_16_train_identically(tiny_bert):
    plain = [make_batch(tiny_bert, seed=s) for s in range(3)]
    bucketed = [make_batch(tiny_bert, seed=s, pad_multiple=16) for s in range(3)]
    assert all(b.input_ids.shape[1] % 16 == 0 for b in bucketed)
    assert any(p.input_ids.shape[1] != b.input_ids.shape[1] for p, b in zip(plain, bucketed))
    got = []
    for batches in (plain, bucketed):
        step_fn, model = make_train_step(tiny_bert, pa_warmup_steps=0)  # BN over real tokens (default)
        no_dropout(model)
        got.append(grads_and_losses(step_fn, batches))
    assert_equivalent(*got)


def test_compiled_parts_train_identically_and_keep_state_dict_keys(tiny_bert):
    from train.step import compile_for_speed

    batches = [make_batch(tiny_bert, seed=s) for s in range(3)]
    ref_fn, ref_model = make_train_step(tiny_bert, pa_warmup_steps=1)
    image_only_pseudo_mask(no_dropout(ref_model))
    keys = list(ref_model.state_dict())
    ref = grads_and_losses(ref_fn, batches)
    step_fn, model = make_train_step(tiny_bert, pa_warmup_steps=1)
    image_only_pseudo_mask(no_dropout(model))
    # aot_eager traces forward and backward exactly as inductor does, without the C++ codegen that
    # takes minutes on two shared cores (a 4-step demo run with inductor: ~6.5 min of compiling).
    graphs, note = compile_for_speed(
        model, compile=True, cuda_graphs=False, device=torch.device("cpu"), backend="aot_eager"
    )
    assert not graphs and "torch.compile" in note
    assert model.image._compiled_call_impl is not None
    assert model.text.bert.encoder.layer[1]._compiled_call_impl is not None
    assert_equivalent(grads_and_losses(step_fn, batches), ref)
    assert list(model.state_dict()) == keys  # in place: no `_orig_mod.` prefixes


def test_cuda_graphs_switch_is_a_logged_no_op_on_cpu(tiny_bert):
    from train.step import compile_for_speed

    _, model = make_train_step(tiny_bert)
    graphs, note = compile_for_speed(model, compile=False, cuda_graphs=True, device=torch.device("cpu"))
    assert graphs is False and "no CUDA device" in note
    assert model.image._compiled_call_impl is None  # nothing compiled either


def test_no_sync_is_found_under_compiled_ddp(tiny_bert, tmp_path, monkeypatch):
    """Gradient accumulation must skip the all-reduce on all but the last micro-batch, also when
    torch.compile wraps the DDP model (the old isinstance(model, DDP) check missed that)."""
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from model.export import unwrap
    from train.step import find_ddp

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build_model(model_config("g2d_tiny", text_model=tiny_bert, text_freeze_layers=1)).train()
        ddp = DDP(model)
        wrapped = torch.compile(ddp)  # OptimizedModule around DDP
        assert find_ddp(wrapped) is ddp and find_ddp(model) is None and unwrap(wrapped) is model
        calls = []
        real = DDP.no_sync
        monkeypatch.setattr(DDP, "no_sync", lambda self: calls.append(1) or real(self))
        optim = build_optimizer(model, OptimConfig(lr=1e-4))
        scaler, fixed = make_scaler(torch.device("cpu"), "fp32", skip_nonfinite=False)
        step_fn = TrainStep(ddp, optim, None, scaler, fixed, "fp32", 0.0, False)
        step_fn([make_batch(tiny_bert, seed=s) for s in range(3)], 100)  # accumulation over 3
        assert len(calls) == 2
    finally:
        tdist.destroy_process_group()


def test_decoder_tail_runs_in_bf16_channels_last():
    """The full-resolution decoder maps are memory-bound: under bf16 autocast with channels_last they
    must stay bf16 and NHWC all the way to the segmentation head (no format/dtype round trips)."""
    from model.image import ImageEncoderDecoder

    cfg = model_config("g2d_tiny", text_model="unused")
    image_tower = ImageEncoderDecoder(cfg).to(memory_format=torch.channels_last)
    seen = []
    for block in (image_tower.unet.decoder.blocks[-1], image_tower.unet.segmentation_head[0]):
        block.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image_tower(x)
    tail, head = seen
    assert tail.shape == (2, cfg.decoder_channels[-1], 128, 128)  # [B,8,H,W] full resolution
    assert tail.dtype == head.dtype == torch.bfloat16
    assert tail.is_contiguous(memory_format=torch.channels_last) and not tail.is_contiguous()


# ---- FLOPs, peak and MFU ------------------------------------------------------------------------


def test_step_flops_scale_with_the_batch_and_leave_the_run_unchanged(tiny_bert):
    from train.flops import count_step_flops

    step_fn, model = make_train_step(tiny_bert, pa_warmup_steps=0)
    small, large = make_batch(tiny_bert, n=4), make_batch(tiny_bert, n=8)
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    per_4 = count_step_flops(model, small, 0, step_fn.autocast, False)
    per_8 = count_step_flops(model, large, 0, step_fn.autocast, False)
    # Convolutions and matmuls are linear in the batch; only the [B,B] similarity matrix is not.
    assert per_4 > 1e8 and abs(per_8 / per_4 - 2) < 0.01
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # BN running stats restored
    assert torch.equal(rng, torch.get_rng_state())  # dropout stream restored
    assert all(p.grad is None for p in model.parameters())
    # So a run that counted first trains exactly like one that did not (dropout on).
    ref_fn, _ = make_train_step(tiny_bert, pa_warmup_steps=0)
    torch.manual_seed(1)
    counted = run_losses(step_fn, [small, small])
    torch.manual_seed(1)
    assert torch.equal(counted, run_losses(ref_fn, [small, small]))


def test_peak_flops_table_override_and_mfu(monkeypatch):
    from train.flops import mfu, peak_flops

    gpu = torch.device("cuda", 0)
    for name, bf16, fp32 in (
        ("NVIDIA H200", 989.4, 66.9),
        ("NVIDIA H100 80GB HBM3", 989.4, 66.9),
        ("NVIDIA H100 PCIe", 756.5, 51.2),
        ("NVIDIA A100-SXM4-80GB", 312.0, 19.5),
        ("NVIDIA L40S", 362.05, 91.6),
        ("NVIDIA L4", 121.0, 30.3),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_flops(gpu, "bf16")[0] == pytest.approx(bf16 * 1e12)
        assert peak_flops(gpu, "fp32")[0] == pytest.approx(fp32 * 1e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Imaginary GPU 9000")
    peak, why = peak_flops(gpu, "bf16")
    assert peak is None and "train.peak_tflops" in why
    assert peak_flops(gpu, "bf16", override_tflops=100.0) == (1e14, "train.peak_tflops")
    cpu_peak, why = peak_flops(torch.device("cpu"), "fp32")
    assert cpu_peak > 1e9 and "cpu estimate" in why
    # bf16 autocast on a CPU: AMX tiles (1024 FLOP/cycle) or AVX512-BF16 (128), else the fp32 bound.
    from train.flops import _cpu_peak

    threads = torch.get_num_threads()
    cpuinfo = "cpu MHz\t\t: 2000.000\nflags\t\t: fma avx2 avx512f {}\n"
    assert _cpu_peak("bf16", cpuinfo.format("amx_bf16 avx512_bf16"))[0] == pytest.approx(threads * 2e9 * 1024)
    assert _cpu_peak("bf16", cpuinfo.format("avx512_bf16"))[0] == pytest.approx(threads * 2e9 * 128)
    assert _cpu_peak("bf16", cpuinfo.format(""))[0] == _cpu_peak("fp32", cpuinfo.format("amx_bf16"))[0]
    assert "AMX bf16" in _cpu_peak("bf16", cpuinfo.format("amx_bf16"))[1]
    assert mfu(2e9, 100.0, 1e12) == pytest.approx(0.2) and mfu(2e9, 100.0, None) is None


def test_pretrain_logs_mfu_and_memory_per_sample_and_says_cuda_graphs_are_off_on_cpu(mimic_shards, tiny_bert, tmp_path):
    import json

    from tests.test_train import finish, overrides, run_pretrain

    out = tmp_path / "run"
    text = finish(
        run_pretrain(
            overrides(
                mimic_shards,
                tiny_bert,
                out,
                **{"train.max_steps": 2, "train.cuda_graphs": "true", "data.text_pad_multiple": 16},
            )
        )
    )
    assert "GFLOP per sample (forward + backward, text padded to" in text
    assert "train.cuda_graphs: no CUDA device (cpu)" in text
    assert "mfu " in text  # the per-step line (progress off)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert 0 < r["mfu"] < 1 and r["gflops_per_sample"] > 0.01
        assert r["mem_mb_per_sample"] == pytest.approx(r["mem_mb"] / 4)
