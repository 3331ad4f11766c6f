"""Pseudo-mask quality: do the model's pseudo-segmentation targets land on the drawn findings?

The synthetic corpus records where every finding was drawn (`synthetic_regions.jsonl` beside the
MIMIC tree: per image, per region a full-size RLE mask). For each valid-split image with at least one
pathological region, the model's pseudo-mask (model.make_pseudo_mask: attention -> upsample -> body
mask -> 85% quantile -> bilateral smoothing, exactly the PA training target) is compared with the
union of the true regions, both in the eval view the model sees:

    iou           |pseudo & truth| / |pseudo | truth|
    pointing      1 if the attention's peak cell centre lies inside the truth (chance = truth area share)
    collapse_iou  mean IoU of this image's pseudo-mask with every other scored image's (issue 27 item 7:
                  a mask that sits in one place on every image teaches position, not findings; masks
                  placed independently overlap little, one region for all images gives ~1)

This is the direct evidence behind the Table 5a question: PA can only improve dense transfer if the
pseudo-masks it trains on carry location. Random init gives the chance-level reference.
Support devices are left out of the truth: they are drawn and reported, but they are not findings.

    pseudo_mask_predictions(weights, pretrain_data, text_model, corpus_root, device) -> per-image arrays
    pseudo_mask_summary({arm: predictions}) -> per arm mean + 95% CI, paired differences
    collapse_iou(masks) -> per image: mean IoU with the other images' pseudo-masks
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.config import config_from_dict
from common.dist import DistInfo
from eval.bootstrap import N_RESAMPLES, percentile_ci, resample_weights
from eval.checkpoint import Pretrained
from model.text import load_tokenizer
from pipeline import DataConfig, build_loader
from shards.synthetic.mimic import REGIONS_NAME
from shards.synthetic.rle import decode_mask_rle

NOT_FINDINGS = frozenset({"support_device"})


def load_regions(corpus_root: str | Path) -> dict[str, list[dict]]:
    """dicom_id -> its pathological regions (support devices dropped), from synthetic_regions.jsonl."""
    path = Path(corpus_root) / REGIONS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ground-truth regions (only the synthetic corpus records them)")
    out = {}
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            try:
                row = json.loads(line)
                out[row["dicom_id"]] = [r for r in row["regions"] if r["finding"] not in NOT_FINDINGS]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{line_no}: malformed region line ({exc})") from exc
    return out


def truth_mask(regions: list[dict], meta: dict, size: tuple[int, int]) -> torch.Tensor:
    """Union of the regions' full-size masks -> the eval view: cropped to the sample's crop_box (what
    the packer stored) and squashed to size (H, W) as the eval transform squashes the image. [H, W] bool."""
    union = None
    for region in regions:
        m = decode_mask_rle(region["mask_rle"])
        union = m if union is None else union | m
    x0, y0, x1, y1 = (int(v) for v in meta["crop_box"])
    crop = torch.from_numpy(np.ascontiguousarray(union[y0:y1, x0:x1])).float()[None, None]
    return F.interpolate(crop, size=size, mode="nearest")[0, 0] > 0.5


def eval_data_config(pretrain_data: dict, batch_size: int) -> DataConfig:
    """A pretraining run's saved data section read the way its evaluation reads it: the eval transform,
    every sample once in order, in the main process."""
    data_cfg = config_from_dict(DataConfig, pretrain_data)
    return dataclasses.replace(
        data_cfg,
        transform=data_cfg.eval_transform,
        shuffle=False,
        drop_last=False,
        batch_size_per_gpu=batch_size,
        num_workers=0,
    )


@torch.no_grad()
def pseudo_mask_predictions(
    weights: Pretrained,
    pretrain_data: dict,
    text_model: str,
    corpus_root: str | Path,
    device,
    batch_size: int = 32,
    seed: int = 0,
) -> dict:
    """-> {keys, iou, pointing, truth_frac, findings, collapse_iou} over the valid-split images that have
    a finding (numpy arrays; findings: '+'-joined finding names per image). `seed` draws the random
    arm's weights (one draw per pretraining seed)."""
    regions = load_regions(corpus_root)
    data_cfg = eval_data_config(pretrain_data, batch_size)
    torch.manual_seed(seed)  # the random arm's weights: the same draw for the same seed
    model = weights.build_g2d(text_model).to(device).eval()
    loader = build_loader(
        data_cfg,
        "valid",
        DistInfo(rank=0, world_size=1, local_rank=0, device=device),
        tokenizer=load_tokenizer(text_model),
    )
    loader.set_epoch(0)
    keys, iou, pointing, frac, findings, kept = [], [], [], [], [], []
    try:
        for batch in loader:
            _emb, _dense, attention = model.encode_image(batch.image)  # attention [B,heads,h,w]
            masks = model.make_pseudo_mask(attention, batch.image)[:, 0] > 0.5  # [B,H,W] bool
            h, w = attention.shape[-2:]
            peak = attention.float().mean(dim=1).flatten(1).argmax(dim=1)  # [B] cell index
            H, W = masks.shape[-2:]
            for i, meta in enumerate(batch.meta):
                found = regions.get(meta["dicom_id"])
                if found is None:
                    raise KeyError(f"sample {batch.keys[i]}: dicom_id {meta['dicom_id']} is not in {REGIONS_NAME}")
                if not found:
                    continue
                truth = truth_mask(found, meta, (H, W)).to(masks.device)
                if not truth.any():
                    continue  # the region lay outside the stored crop
                pred = masks[i]
                inter, union = (pred & truth).sum().item(), (pred | truth).sum().item()
                cy, cx = divmod(int(peak[i]), w)
                py, px = int((cy + 0.5) * H / h), int((cx + 0.5) * W / w)  # the peak cell's centre pixel
                keys.append(batch.keys[i])
                iou.append(inter / union)
                pointing.append(float(truth[py, px]))
                frac.append(truth.float().mean().item())
                findings.append("+".join(sorted({r["finding"] for r in found})))
                kept.append(pred.cpu())
    finally:
        loader.close()
    if not keys:
        raise ValueError("pseudo-mask quality: no valid-split image with a drawn finding")
    return {
        "keys": np.asarray(keys, dtype=str),
        "iou": np.asarray(iou),
        "pointing": np.asarray(pointing),
        "truth_frac": np.asarray(frac),
        "findings": np.asarray(findings, dtype=str),
        "collapse_iou": collapse_iou(torch.stack(kept)),
    }


def collapse_iou(masks: torch.Tensor) -> np.ndarray:
    """masks [N,H,W] bool -> [N] float64: each mask's mean IoU with the N-1 others (two empty masks
    count as identical, IoU 1, as train/health.py's batch signal counts them); the mean over images is
    the mean pairwise IoU. One image: nan (no pair)."""
    n = masks.shape[0]
    if n < 2:
        return np.full(n, np.nan)
    flat = masks.flatten(1).double()  # [N, P]; float64 keeps pixel counts exact
    inter = flat @ flat.T  # [N, N] shared pixels
    area = flat.sum(dim=1)
    union = area[:, None] + area[None, :] - inter
    pair = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    pair.fill_diagonal_(0.0)
    return (pair.sum(dim=1) / (n - 1)).numpy()


# (b, a) pairs reported as b - a: every arm against G2D (Table 5a / Table 8's question), then every
# trained arm against random init (the floor). The first three were the two-arm benchmark's pairs.
COMPARISONS = (
    ("g2d", "vla_only"),
    ("g2d", "random"),
    ("vla_only", "random"),
    ("g2d", "reconstruction"),
    ("g2d", "g2d_shuffled"),
    ("reconstruction", "random"),
    ("g2d_shuffled", "random"),
)
# Per-image metrics summarised per arm (collapse_iou: absent from predictions written before it existed).
PER_IMAGE_METRICS = ("iou", "pointing", "collapse_iou")


def pseudo_mask_summary(preds: dict[str, dict], seed: int = 0) -> dict:
    """{arm: predictions} (same images) -> {num_images, pointing_chance, arms: {arm: {iou, pointing,
    collapse_iou: {value, ci95}, per_finding_iou}}, diffs: {"b-a": {diff, ci95, p_b_better}} of the mean IoU}."""
    arms = list(preds)
    base = preds[arms[0]]["keys"]
    for arm in arms:
        if not np.array_equal(preds[arm]["keys"], base):
            raise ValueError(f"pseudo-mask quality: arm {arm} was scored on other images than {arms[0]}")
    n = len(base)
    W = resample_weights(n, None, N_RESAMPLES, seed)  # [R, n] images resampled with replacement
    out = {"num_images": n, "pointing_chance": float(preds[arms[0]]["truth_frac"].mean()), "arms": {}, "diffs": {}}
    for arm, p in preds.items():
        per_finding = {}
        for name in sorted(set(p["findings"].tolist())):
            sel = p["findings"] == name
            per_finding[name] = {"n": int(sel.sum()), "iou": float(p["iou"][sel].mean())}
        out["arms"][arm] = {
            m: {"value": float(p[m].mean()), "ci95": percentile_ci(W @ p[m] / W.sum(1))}
            for m in PER_IMAGE_METRICS
            if m in p
        }
        out["arms"][arm]["per_finding_iou"] = per_finding
    for b, a in COMPARISONS:
        if a in preds and b in preds:
            boot = W @ (preds[b]["iou"] - preds[a]["iou"]) / W.sum(1)
            out["diffs"][f"{b}-{a}"] = {
                "diff": float(preds[b]["iou"].mean() - preds[a]["iou"].mean()),
                "ci95": percentile_ci(boot),
                "p_b_better": float((boot > 0).mean()),
            }
    return out
