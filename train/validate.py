"""Validation during pretraining: retrieval top-1/top-5 and zero-shot AUC of a few findings on the
valid split (rank 0, eval transform). Same functions as the demo and the zero-shot eval tasks."""

from __future__ import annotations

import dataclasses

from common.dist import DistInfo
from eval.metrics import roc_auc
from eval.zeroshot import DEFAULT_PROMPTS, chexpert_targets, embed_loader, retrieval_topk, zeroshot_probabilities
from pipeline import build_loader


def validate(model, cfg, tokenizer, dist: DistInfo, max_batches: int = 0, split: str = "valid") -> dict:
    if dist.rank != 0:
        return {}
    single = DistInfo(rank=0, world_size=1, local_rank=dist.local_rank, device=dist.device)
    data = cfg.resolved_data
    data_cfg = dataclasses.replace(data, transform=data.eval_transform, shuffle=False, drop_last=False)
    loader = build_loader(data_cfg, split, single, tokenizer=tokenizer)
    loader.set_epoch(0)
    emb = embed_loader(model, loader, max_batches)
    metrics = {f"retrieval_{k}": v for k, v in retrieval_topk(emb.image, emb.text).items()}
    probs = zeroshot_probabilities(model, tokenizer, emb.image, DEFAULT_PROMPTS, dist.device)
    aucs = []
    for name, p in probs.items():
        labels, keep = chexpert_targets(emb.meta, name)
        if 0 < labels[keep].sum() < keep.sum():
            auc = roc_auc(labels[keep].numpy(), p[keep].numpy())
            metrics[f"auc/{name}"] = float(auc)
            aucs.append(auc)
    if aucs:
        metrics["auc/mean"] = float(sum(aucs) / len(aucs))
    metrics["num_samples"] = len(emb.keys)
    return metrics
