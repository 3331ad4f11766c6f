"""pipeline/: plan partitioning, backend agreement, tokenisation, resume, bad data, masks and boxes.

Everything runs on tiny packed datasets (tests/pipeline_fixtures.py) with the CPU variants of both
backends: DALI with device_id=None, torch DataLoader workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from common.config import ConfigError
from common.dist import DistInfo
from pipeline import CorruptSampleError, CorruptSampleWarning, DataConfig, build_loader
from pipeline.plan import DatasetIndex, make_plan, num_batches
from pipeline.transforms import build_spec, draw_params
from shards.schema import ManifestError
from tests.pipeline_fixtures import ROOT, all_texts, child_env, corrupt_member, pack_tiny, tiny_tokenizer

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
BACKENDS = ("torch", "dali")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    manifest = pack_tiny(root)
    return root, manifest


@pytest.fixture(scope="module")
def tiny_masks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_masks")
    return root, pack_tiny(root, n_train=24, n_valid=8, masks=True, seed=3)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny_tokenizer(all_texts(tiny[0]))


def config(root, **kw) -> DataConfig:
    base = dict(shards=str(root), batch_size_per_gpu=8, num_workers=2, prefetch=2, seed=7)
    base.update(kw)
    return DataConfig(**base)


def unnormalise(image: torch.Tensor, cfg: DataConfig, name: str) -> torch.Tensor:
    spec = build_spec(cfg, name)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (image.cpu() * std + mean) * 255.0  # [B, C, H, W] in 0..255


def collect(loader) -> list:
    return [b for b in loader]


# ---- plan ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
def test_plan_partitions_epoch_into_equal_disjoint_rank_blocks(tiny, world):
    root, _ = tiny
    index = DatasetIndex(root, "train")
    n, batch = index.num_selected, 4
    for epoch in (0, 1):
        plans = [make_plan(index, 5, epoch, r, world, batch, shuffle=True, drop_last=True) for r in range(world)]
        counts = {len(p) for p in plans}
        assert counts == {n // (world * batch)}  # same batch count on every rank
        seen = [g for p in plans for b in p.batches for g in b.tolist()]
        assert all(len(b) == batch for p in plans for b in p.batches)
        assert len(seen) == len(set(seen)) == (n // (world * batch)) * world * batch  # disjoint, remainder dropped
        assert n - len(seen) < world * batch
        again = make_plan(index, 5, epoch, world - 1, world, batch, shuffle=True, drop_last=True)
        assert [b.tolist() for b in again.batches] == [b.tolist() for b in plans[-1].batches]  # deterministic
    order0 = make_plan(index, 5, 0, 0, 1, batch, True, True).batches
    order1 = make_plan(index, 5, 1, 0, 1, batch, True, True).batches
    assert [b.tolist() for b in order0] != [b.tolist() for b in order1]  # reshuffled per epoch
    first_shards0 = index.shard_id(np.concatenate(order0))[:: index.shards[0].offsets.shape[0]]
    first_shards1 = index.shard_id(np.concatenate(order1))[:: index.shards[0].offsets.shape[0]]
    assert first_shards0.tolist() != first_shards1.tolist()  # shard order changes too


def test_plan_without_drop_last_covers_every_sample(tiny):
    root, _ = tiny
    index = DatasetIndex(root, "valid")
    n = index.num_selected
    plans = [make_plan(index, 0, 0, r, 3, 8, shuffle=False, drop_last=False) for r in range(3)]
    seen = [g for p in plans for b in p.batches for g in b.tolist()]
    assert sorted(seen) == list(range(n))
    assert [len(p) for p in plans] == [num_batches(n, r, 3, 8, False) for r in range(3)]


def test_subset_reads_only_its_keys_with_both_backends(tiny):
    root, manifest = tiny
    wanted = set(manifest["subsets"]["train"]["0.5"])
    keys = {}
    for backend in BACKENDS:
        cfg = config(root, backend=backend, subset="0.5", transform="eval", batch_size_per_gpu=4)
        loader = build_loader(cfg, "train", CPU)
        keys[backend] = [k for b in loader for k in b.keys]
        assert len(loader) == len(wanted) // 4
    assert keys["torch"] == keys["dali"]
    assert set(keys["torch"]) <= wanted and len(keys["torch"]) == (len(wanted) // 4) * 4
    with pytest.raises(ManifestError, match="no subset '0.2'"):
        build_loader(config(root, subset="0.2"), "train", CPU)


def test_max_samples_keeps_the_lowest_key_hashes_whatever_the_seed_or_backend(tiny):
    """data.max_samples: the same samples for every seed and backend (the keys' SHA-1 order), applied
    after the subset; 0 or a cap above the split keeps everything."""
    root, manifest = tiny

    def read(backend, **kw):
        cfg = config(
            root, backend=backend, transform="eval", shuffle=False, drop_last=False, batch_size_per_gpu=4, **kw
        )
        return [k for b in build_loader(cfg, "train", CPU) for k in b.keys]

    everything = read("torch")
    lowest = sorted(everything, key=lambda k: hashlib.sha1(k.encode()).digest())[:5]
    capped = {(backend, seed): read(backend, max_samples=5, seed=seed) for backend in BACKENDS for seed in (0, 7)}
    for keys in capped.values():
        assert keys == [k for k in everything if k in lowest]  # the pick, in the split's order
    assert read("torch", max_samples=len(everything) + 3) == everything
    subset = set(manifest["subsets"]["train"]["0.5"])
    in_subset = read("torch", subset="0.5", max_samples=3)
    assert len(in_subset) == 3 and set(in_subset) <= subset
    assert set(in_subset) == set(sorted(subset, key=lambda k: hashlib.sha1(k.encode()).digest())[:3])
    with pytest.raises(ConfigError, match="max_samples"):
        config(root, max_samples=-1)


def test_missing_shard_or_index_fails_at_start_with_its_path(tiny, tmp_path):
    root, _ = tiny
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "train" / "train-000002.idx").unlink()
    with pytest.raises(ManifestError, match="train-000002.idx"):
        build_loader(config(copy, backend="torch"), "train", CPU)
    (copy / "train" / "train-000001.tar").unlink()
    with pytest.raises(ManifestError, match=r"shard missing: .*train-000001\.tar"):
        build_loader(config(copy, backend="torch"), "train", CPU)


# ---- backends agree ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["eval", "mgca_eval", "g2d_train"])
def test_backends_produce_the_same_batches(tiny, tokenizer, name):
    root, _ = tiny
    out = {}
    for backend in BACKENDS:
        cfg = config(root, backend=backend, transform=name, shuffle=name == "g2d_train", drop_last=False)
        loader = build_loader(cfg, "valid", CPU, tokenizer=tokenizer)
        loader.set_epoch(2)
        out[backend] = collect(loader)
    t, d = out["torch"], out["dali"]
    assert [b.keys for b in t] == [b.keys for b in d]
    assert [b.texts for b in t] == [b.texts for b in d]
    assert [m["labels"] for b in t for m in b.meta] == [m["labels"] for b in d for m in b.meta]
    for bt, bd in zip(t, d):
        assert torch.equal(bt.input_ids, bd.input_ids) and torch.equal(bt.attention_mask, bd.attention_mask)
        assert bt.image.shape == bd.image.shape
    ti = unnormalise(torch.cat([b.image for b in t]), cfg, name)
    di = unnormalise(torch.cat([b.image for b in d]), cfg, name)
    size = 224 if name.startswith("mgca") else 256
    assert ti.shape == (sum(len(b) for b in t), 3, size, size)
    mad = (ti - di).abs().mean().item()
    assert mad < 2.0, f"{name}: mean abs difference {mad:.3f}/255 between backends"


def test_eval_transform_is_a_squash_resize_with_imagenet_normalisation(tiny):
    root, _ = tiny
    cfg = config(
        root, backend="torch", transform="eval", shuffle=False, drop_last=False, image_size=96, eval_transform="eval"
    )
    batch = next(iter(build_loader(cfg, "valid", CPU)))
    assert batch.image.shape == (8, 3, 96, 96) and batch.image.dtype == torch.float32
    img = unnormalise(batch.image, cfg, "eval")
    assert torch.allclose(img[:, 0], img[:, 1], atol=1e-3) and torch.allclose(img[:, 0], img[:, 2], atol=1e-3)
    assert img.min() >= -1e-3 and img.max() <= 255 + 1e-3
    paper = config(root, backend="torch", transform="g2d_paper", channels=1, shuffle=False, drop_last=False)
    batch = next(iter(build_loader(paper, "valid", CPU)))
    assert batch.image.shape == (8, 1, 224, 224)
    assert batch.image.min() >= 0 and batch.image.max() <= 1  # intensities in [0, 1]


def test_affine_matrix_reproduces_torchvision_random_affine():
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from pipeline.transforms import inverse_affine_matrix

    yy, xx = np.mgrid[0:64, 0:64]
    img = Image.fromarray(((np.sin(xx / 5.0) * np.cos(yy / 7.0) + 1) * 120).astype(np.uint8))
    for angle, shear in [(12.3, -7.7), (-15.0, 15.0), (3.0, 0.0)]:
        ours = img.transform(
            (64, 64),
            Image.Transform.AFFINE,
            tuple(inverse_affine_matrix(64, angle, shear).reshape(-1)),
            Image.Resampling.BILINEAR,
            fillcolor=0,
        )
        theirs = F.affine(
            img,
            angle=angle,
            translate=[0, 0],
            scale=1.0,
            shear=[shear, 0.0],
            interpolation=F.InterpolationMode.BILINEAR,
            fill=0,
        )
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_augmentation_draws_depend_on_seed_epoch_and_key_only(tiny):
    root, _ = tiny
    spec = build_spec(config(root), "g2d_train")
    a = draw_params(spec, 7, 3, "tr0001")
    assert a == draw_params(spec, 7, 3, "tr0001")
    assert a != draw_params(spec, 7, 4, "tr0001") and a != draw_params(spec, 7, 3, "tr0002")
    assert abs(a.angle) <= 15 and abs(a.shear) <= 15 and 0.8 <= a.brightness <= 1.2 and 0.8 <= a.contrast <= 1.2


# ---- tokenisation --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_are_padded_per_batch_and_capped(tiny, tokenizer, backend):
    root, _ = tiny
    cfg = config(root, backend=backend, transform="eval", max_text_length=32, shuffle=False, drop_last=False)
    loader = build_loader(cfg, "train", CPU, tokenizer=tokenizer)
    lengths = set()
    for batch in loader:
        own = [len(tokenizer(t, truncation=True, max_length=32)["input_ids"]) for t in batch.texts]
        width = batch.input_ids.shape[1]
        assert width == min(32, -(-max(own) // 8) * 8)  # longest, rounded to 8, capped
        assert batch.attention_mask.sum(1).tolist() == own
        assert batch.input_ids.dtype == torch.int64
        lengths.add(width)
    assert 32 in lengths and len(lengths) > 1  # long reports truncated, short batches stay short
    stats = loader.stats.as_dict()
    assert stats["tokenize_s"] > 0 and stats["tokenize_s_per_batch"] > 0 and stats["data_wait_s"] > 0
    assert stats["batches"] == len(loader) and stats["samples"] == 52 and stats["skipped"] == 0


# ---- determinism and resume ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_yields_the_tail_of_the_uninterrupted_epoch(tiny, tokenizer, backend):
    root, _ = tiny
    cfg = config(root, backend=backend, transform="g2d_train", batch_size_per_gpu=3)
    full_loader = build_loader(cfg, "valid", CPU, tokenizer=tokenizer)
    full_loader.set_epoch(1)
    full = collect(full_loader)
    assert len(full) == len(full_loader) == 20 // 3

    first = build_loader(cfg, "valid", CPU, tokenizer=tokenizer)
    first.set_epoch(1)
    it = iter(first)
    head = [next(it) for _ in range(2)]
    state = first.state_dict()
    it.close()
    assert state["epoch"] == 1 and state["batches"] == 2

    # Resume in a "new process" with a different worker count: same plan, same draws.
    resumed = build_loader(DataConfig(**{**cfg.__dict__, "num_workers": 1}), "valid", CPU, tokenizer=tokenizer)
    resumed.load_state_dict(state)
    tail = collect(resumed)
    assert [b.keys for b in head + tail] == [b.keys for b in full]
    for got, want in zip(head + tail, full):
        assert torch.allclose(got.image, want.image, atol=1e-5)
        assert torch.equal(got.input_ids, want.input_ids)
    assert resumed.state_dict()["batches"] == len(resumed)

    done = build_loader(cfg, "valid", CPU)
    done.load_state_dict(resumed.state_dict())
    assert collect(done) == []  # resumed at the epoch end: nothing left
    done.set_epoch(2)
    assert len(collect(done)) == len(done)


def test_epochs_reshuffle_and_worker_count_does_not_change_batches(tiny):
    root, _ = tiny
    keys = {}
    for workers in (1, 2):
        cfg = config(root, backend="torch", transform="g2d_train", num_workers=workers, batch_size_per_gpu=4)
        loader = build_loader(cfg, "valid", CPU)
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            batches = collect(loader)
            keys[workers, epoch] = [b.keys for b in batches]
            if epoch == 1:
                keys[workers, "image"] = torch.cat([b.image for b in batches])
                assert [b.keys for b in collect(loader)] == keys[workers, 1]  # a finished pass replays
    assert keys[1, 0] == keys[2, 0] and keys[1, 1] == keys[2, 1]
    assert torch.equal(keys[1, "image"], keys[2, "image"])
    assert keys[1, 0] != keys[1, 1]


# ---- bad data --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_samples_are_skipped_and_counted_or_raise(tiny, tokenizer, tmp_path, backend):
    root, manifest = tiny
    copy = tmp_path / "corrupt"
    shutil.copytree(root, copy)
    bad_jpg = corrupt_member(copy, manifest, "tr0009", "jpg")  # header destroyed
    corrupt_member(copy, manifest, "tr0030", "json", b"{not json")

    cfg = config(copy, backend=backend, transform="g2d_train", batch_size_per_gpu=4)
    loader = build_loader(cfg, "train", CPU, tokenizer=tokenizer)
    with pytest.warns(CorruptSampleWarning) as record:
        batches = collect(loader)
    assert len(batches) == len(loader) and all(len(b) == 4 for b in batches)  # drop_last: refilled to B
    assert all(b.image.shape[0] == 4 and b.input_ids.shape[0] == 4 for b in batches)
    seen = {k for b in batches for k in b.keys}
    assert "tr0009" not in seen and "tr0030" not in seen
    stats = loader.stats.as_dict()
    assert stats["skipped"] == 2 and stats["filled"] == 2
    assert stats["skipped_by_reason"] == {"jpg": 1, "json": 1}
    assert {s["key"] for s in stats["skipped_samples"]} == {"tr0009", "tr0030"}
    assert {str(w.message).split()[3] for w in record} == {"tr0009", "tr0030"}

    # A second epoch knows the bad samples up front (no DALI rebuild), and keeps counting them.
    rebuilds = loader.stats.dali_rebuilds
    loader.set_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptSampleWarning)  # warned once per sample
        assert len(collect(loader)) == len(loader)
    assert loader.stats.skipped == 4 and loader.stats.dali_rebuilds == rebuilds

    strict = build_loader(DataConfig(**{**cfg.__dict__, "on_error": "raise"}), "train", CPU)
    with pytest.raises(CorruptSampleError, match=rf"{bad_jpg.split('/')[1]}.*tr0009|tr0030"):
        collect(strict)

    # Evaluation (no drop_last): the bad samples are dropped, never duplicated.
    ev = build_loader(DataConfig(**{**cfg.__dict__, "drop_last": False, "shuffle": False}), "train", CPU)
    with pytest.warns(CorruptSampleWarning):
        keys = [k for b in ev for k in b.keys]
    assert len(keys) == len(set(keys)) == 50


# ---- dense targets -------------------------------------------------------------------------------


def _box_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0]


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("name", ["g2d_train", "mgca_train"])
def test_masks_and_boxes_follow_the_image_geometry(tiny_masks, name):
    root, _ = tiny_masks
    out = {}
    for backend in BACKENDS:
        cfg = config(root, backend=backend, transform=name, load_masks=True, load_boxes=True, batch_size_per_gpu=6)
        loader = build_loader(cfg, "train", CPU)
        loader.set_epoch(1)
        out[backend] = collect(loader)
    for backend, batches in out.items():
        for batch in batches:
            assert batch.mask.shape == (len(batch), 1) + batch.image.shape[2:]
            masks = batch.mask[:, 0].numpy()  # [B, H, W]
            assert set(np.unique(masks).tolist()) <= {0.0, 1.0}
            image = unnormalise(batch.image, cfg, name)[:, 0].numpy()
            for i in range(len(batch)):
                m = masks[i] > 0
                if m.sum() < 20:
                    continue  # rectangle cropped away
                assert image[i][m].mean() > image[i][~m].mean() + 60  # bright rectangle under the mask
                assert batch.boxes[i].shape == (1, 4)
                assert _iou(batch.boxes[i][0].tolist(), _box_of(m)) > 0.8, (backend, batch.keys[i])
    masks_t = torch.cat([b.mask for b in out["torch"]])
    masks_d = torch.cat([b.mask for b in out["dali"]])
    agree = (masks_t == masks_d).float().mean().item()
    assert agree > 0.995
    boxes_t = [b for batch in out["torch"] for b in batch.boxes]
    boxes_d = [b for batch in out["dali"] for b in batch.boxes]
    assert all(torch.allclose(a, b) for a, b in zip(boxes_t, boxes_d))


def test_masks_required_when_requested(tiny):
    root, _ = tiny
    with pytest.raises(ManifestError, match="no .png member"):
        build_loader(config(root, load_masks=True), "train", CPU)


@pytest.mark.parametrize("name", ["mgca_train", "g2d_train"])
def test_gpu_decode_path_matches_the_pil_path(tiny, name):
    """The torch_gpu_decode code path (decode_jpeg + geometry on tensors), run on the CPU."""
    from pipeline.batch import SampleReader
    from pipeline.plan import PlanArgs
    from pipeline.torch_backend import EpochBatches, gpu_decode

    root, _ = tiny
    cfg = config(root, transform=name)
    index = DatasetIndex(root, "valid")
    args = PlanArgs(seed=7, rank=0, world_size=1, batch_size=8, shuffle=True, drop_last=True)
    plan = args.make(index, 0)
    spec = build_spec(cfg, name)
    loader = build_loader(cfg, "valid", CPU)
    reader = SampleReader(index)
    pil = EpochBatches(index, args, loader.options, None).build(plan, 1, reader)
    raw = EpochBatches(index, args, dataclasses.replace(loader.options, gpu_decode=True), None).build(plan, 1, reader)
    reader.close()
    assert raw.image is None and len(raw.jpeg) == 8
    assert gpu_decode(raw, spec, torch.device("cpu"), keep_size=True) == []
    side = spec.out_size
    assert raw.keys == pil.keys and raw.image.shape == pil.image.shape == (8, 1, side, side)
    assert (raw.image.float() - pil.image.float()).abs().mean() < 2.0


def test_workers_do_not_deadlock_after_the_parent_used_opencv(tiny, tmp_path):
    """OpenCV's thread pool, once created in a process, deadlocks forked children that reconfigure it;
    pipeline.transforms fixes the thread count at import so the parent never creates one. The loader
    runs in a subprocess, so a regression fails on the timeout instead of hanging the suite."""
    script = tmp_path / "fork_after_warp.py"
    script.write_text(f"""
import numpy as np, torch
from common.config import ConfigError
from common.dist import DistInfo
from pipeline import DataConfig, build_loader
from pipeline.transforms import _warp_array
big = (np.random.default_rng(0).random((900, 900)) * 255).astype(np.uint8)
for _ in range(10):
    _warp_array(big, np.array([[0.9, 0.2, 5.0], [-0.2, 0.95, 3.0]]), 800, False)   # parent warps first
cfg = DataConfig(shards={str(tiny[0])!r}, backend="torch", batch_size_per_gpu=8, num_workers=2, transform="g2d_train")
loader = build_loader(cfg, "train", DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
loader.set_epoch(0)
print("batches", sum(1 for _ in loader))
""")
    out = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"batches {52 // 8}"


def test_batched_tensor_warp_matches_one_image_at_a_time():
    """The GPU-decode path warps a whole batch of differently sized images on one zero-padded canvas."""
    from pipeline.transforms import warp_tensors

    rng = np.random.default_rng(0)
    images = [
        torch.from_numpy((rng.random((1, h, w)) * 255).astype(np.uint8)) for h, w in ((96, 80), (64, 100), (100, 100))
    ]
    matrices = np.stack(
        [
            np.array([[1.1, 0.2, -3.0], [-0.15, 0.9, 4.0]]),
            np.array([[0.7, 0.0, 10.0], [0.1, 0.8, 0.0]]),
            np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
        ]
    )
    batch = warp_tensors(images, matrices, 72)
    single = torch.cat([warp_tensors([x], m[None], 72) for x, m in zip(images, matrices)])
    assert batch.shape == (3, 1, 72, 72) and batch.dtype == torch.uint8
    diff = (batch.int() - single.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01
    assert torch.equal(batch[2, 0], images[2][0, :72, :72])  # the identity map copies pixels


# ---- batches across shards, epoch boundaries, CPU colour step ----------------------------------------


def test_batches_draw_from_many_shards_and_shard_mix_bounds_the_window(tmp_path):
    from pipeline.plan import PlanArgs, distinct_shards

    root = tmp_path / "many"
    pack_tiny(root, n_train=96, n_valid=8, per_shard=6)  # 16 train shards
    index = DatasetIndex(root, "train")
    counts = {}
    for mix in (0, 4, 1):
        args = PlanArgs(seed=1, rank=0, world_size=2, batch_size=16, shuffle=True, drop_last=True, shard_mix=mix)
        counts[mix] = np.concatenate([distinct_shards(index, args.make(index, e)) for e in range(3)])
    assert counts[0].mean() >= 8  # min(8, shards per rank) with the whole split mixed
    # A batch of 16 spans at most two windows of 4 x 6 samples, or four single 6-sample shards.
    assert counts[4].max() <= 8 and counts[1].max() <= 4
    assert counts[0].mean() > counts[1].mean() + 4
    with pytest.raises(Exception, match="shard_mix"):
        DataConfig(shards=str(root), shard_mix=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_workers_and_pipeline_outlive_epochs_and_early_stops(tiny, tokenizer, backend):
    """One worker pool / one DALI pipeline for the loader's lifetime: epochs and an abandoned pass
    start no new ones, and a pass after an early stop is still exactly the planned one."""
    root, _ = tiny
    cfg = config(root, backend=backend, transform="g2d_train", batch_size_per_gpu=4)
    loader = build_loader(cfg, "train", CPU, tokenizer=tokenizer)
    loader.set_epoch(0)
    first = [b.keys for b in loader]
    pool = loader._workers
    ids = [p.pid for p in pool.loader._iterator._workers] if backend == "torch" else pool.builds
    loader.set_epoch(1)
    it = iter(loader)
    next(it)
    it.close()  # stop early, mid-epoch
    loader.set_epoch(0)
    again = [b.keys for b in loader]
    assert again == first and loader._workers is pool
    if backend == "torch":
        assert [p.pid for p in pool.loader._iterator._workers] == ids
    else:
        assert pool.builds == ids == 1
    loader.close()
    assert loader._workers is None


def test_cpu_colour_step_matches_the_batched_float_path():
    from pipeline.transforms import colour_normalise, colour_normalise_cpu

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 1, 32, 24), dtype=torch.uint8, generator=gen)
    colour = 0.8 + 0.4 * torch.rand(5, 2, generator=gen)
    for name in ("g2d_train", "eval", "mgca_eval"):
        for channels in (1, 3):
            spec = build_spec(DataConfig(channels=channels), name)
            want = colour_normalise(images, colour if spec.has_jitter else None, spec)
            got = colour_normalise_cpu(images, colour if spec.has_jitter else None, spec)
            assert got.shape == want.shape == (5, channels, 32, 24)
            assert torch.allclose(got, want, atol=1e-5), name


def test_cpu_colour_step_recycles_only_buffers_nothing_refers_to():
    from pipeline.transforms import CpuColourNormalise, colour_normalise

    spec = build_spec(DataConfig(), "g2d_train")
    step = CpuColourNormalise(spec, keep=2)
    gen = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8, generator=gen) for _ in range(4)]
    colour = 0.8 + 0.4 * torch.rand(3, 2, generator=gen)

    def buffer(t):  # where a batch's memory starts (views included)
        return t.untyped_storage().data_ptr()

    first = step(images[0], colour)
    view = first[1:]  # a view keeps the buffer busy after `first` is gone
    start = buffer(first)
    del first
    second = step(images[1], colour)
    third = step(images[2], colour)  # both pooled buffers busy: fresh memory, not pooled
    assert len({start, buffer(second), buffer(third)}) == 3 and buffer(view) == start
    kept = view.clone()
    del view
    fourth = step(images[3], colour)
    assert buffer(fourth) == start  # idle again: reused
    assert torch.allclose(fourth, colour_normalise(images[3], colour, spec), atol=1e-5)
    assert torch.allclose(second, colour_normalise(images[1], colour, spec), atol=1e-5)
    assert torch.allclose(kept, colour_normalise(images[0], colour, spec)[1:], atol=1e-5)  # not overwritten


def test_opencv_matrix_is_the_geometry_matrix_in_opencv_pixel_convention(tiny):
    from pipeline.transforms import geometry_matrix, opencv_matrix

    spec = build_spec(DataConfig(image_size=96), "g2d_train")
    for key, (w, h) in zip(["a", "b", "c"], [(96, 96), (48, 60), (200, 130)]):
        params = draw_params(spec, 3, 1, key)
        want = geometry_matrix(spec, params, w, h)
        want[:, 2] += want[:, :2].sum(axis=1) * 0.5 - 0.5
        assert np.allclose(opencv_matrix(spec, params, w, h), want, atol=1e-9)


@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_batch_tokenizer_matches_the_transformers_call(tiny, tokenizer, padding):
    from pipeline.text import BatchTokenizer

    texts = all_texts(tiny[0])[:12] + ["", "a much longer report " * 40]
    ids, mask, seconds = BatchTokenizer(tokenizer, 64, 8, padding)(texts)
    want = tokenizer(texts, padding=padding, truncation=True, max_length=64, pad_to_multiple_of=8, return_tensors="pt")
    assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape[1] == 64 and seconds >= 0


def test_host_batch_sends_its_small_tensors_inline():
    """Pickled for the trip from a worker, colour and tokens travel as numpy (no shared-memory segment
    each); they come back as the same tensors."""
    import pickle

    from pipeline.batch import HostBatch

    hb = HostBatch(index=0, gids=[1], keys=["k"], shards=["s"], texts=["t"], meta=[{}], image=torch.zeros(1, 1, 2, 2))
    hb.colour, hb.input_ids = torch.tensor([[1.1, 0.9]]), torch.tensor([[2, 5, 3]])
    hb.boxes = [torch.ones(1, 4)]
    state = hb.__getstate__()
    assert isinstance(state["colour"], np.ndarray) and isinstance(state["boxes"][0], np.ndarray)
    assert isinstance(state["image"], torch.Tensor)  # the image stays a (shared-memory) tensor
    back = pickle.loads(pickle.dumps(hb))
    assert torch.equal(back.colour, hb.colour) and torch.equal(back.input_ids, hb.input_ids)
    assert torch.equal(back.boxes[0], hb.boxes[0]) and back.attention_mask is None and back.keys == ["k"]


def test_opencv_decode_is_pils_decode_and_bad_bytes_get_pils_reason(tiny):
    """The torch workers' JPEG decode (OpenCV) gives PIL's pixels, sizes and DCT scaling, and every
    JPEG it does not take (truncated, not a JPEG) fails exactly as PIL's decode does."""
    from pipeline.batch import SampleError, SampleReader, decode_gray, jpeg_size, open_gray

    root, _ = tiny
    index = DatasetIndex(root, "train")
    reader = SampleReader(index)
    jpgs = [reader.read(g, ("jpg",))["jpg"] for g in range(8)]
    reader.close()
    for want in ((96, 96), (40, 40), (10, 10), (500, 500)):
        for data in jpgs:
            pixels, size = decode_gray(data, "jpg", lambda w, h, want=want: want)
            img, pil_size = open_gray(data, "jpg", lambda w, h, want=want: want)
            assert size == pil_size == jpeg_size(data) and np.array_equal(pixels, np.asarray(img))
    for bad in (jpgs[0][: len(jpgs[0]) // 2], b"\xff\xd8not a frame\xff\xd9", b"GIF89a"):
        with pytest.raises(SampleError) as ours:
            decode_gray(bad, "jpg", lambda w, h: (96, 96))
        with pytest.raises(SampleError) as pil:
            open_gray(bad, "jpg", lambda w, h: (96, 96))
        same = [re.sub(r"0x[0-9a-f]+", "", e.value.reason) for e in (ours, pil)]  # object addresses aside
        assert same[0] == same[1] and same[0].startswith("jpg: cannot decode")


# ---- structure and user errors --------------------------------------------------------------------


def pipeline_imports() -> dict[str, set[str]]:
    """pipeline module -> the pipeline modules it imports (function-level imports included)."""
    import ast

    graph = {}
    for path in sorted((ROOT / "pipeline").glob("*.py")):
        name = "pipeline" if path.stem == "__init__" else f"pipeline.{path.stem}"
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "pipeline"}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pipeline"):
                # `from pipeline import x` imports the package (or its submodule x).
                found |= {f"pipeline.{a.name}" for a in node.names} if node.module == "pipeline" else {node.module}
        graph[name] = found & ({f"pipeline.{p.stem}" for p in (ROOT / "pipeline").glob("*.py")} | {"pipeline"})
    return graph


def test_pipeline_imports_form_no_cycle():
    graph = pipeline_imports()
    assert graph["pipeline.stream"] and "pipeline.loader" in graph["pipeline.factory"]  # the parse sees edges
    state: dict[str, str] = {}  # module -> "open" (on the DFS path) | "done"

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join(path[path.index(dep) :] + [module, dep])
            if dep not in state:
                visit(dep, path + [module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])
    # The backend-neutral loader knows backends only through their interface.
    assert not graph["pipeline.loader"] & {"pipeline.torch_backend", "pipeline.dali_backend", "pipeline.stream"}


def test_a_batch_larger_than_the_dataset_is_one_line_naming_batch_samples_and_split(mimic_shards, tiny_bert, capsys):
    """`train.batch_size_per_gpu=64` on a smaller dataset, through the trainer's entry point."""
    import train.pretrain as pretrain
    from common.cli import run_main

    n = DatasetIndex(mimic_shards, "train").num_selected
    assert n < 64
    with pytest.raises(SystemExit) as info:
        run_main(
            pretrain.main,
            [
                "--config",
                "configs/pretrain/demo.yaml",
                f"data.shards={mimic_shards}",
                f"model.text_model={tiny_bert}",
                "train.batch_size_per_gpu=64",
                "train.global_batch_size=64",
                "data.backend=torch",
                "data.num_workers=0",
                f"train.output_dir={mimic_shards.parent / 'run_batch64'}",
            ],
        )
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert info.value.code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("error: batch_size_per_gpu=64 ") and f"has {n}" in lines[-1], lines[-1]
    assert "split 'train'" in lines[-1] and "train.batch_size_per_gpu" in lines[-1], lines[-1]
