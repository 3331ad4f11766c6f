"""Zero-shot classification (RSNA, SIIM, ChestX-ray14, CheXpert): no training at all.

    test image -> G2D image encoder -> global embedding [N,128] (L2-normalised)
    class c: positive templates -> mean text embedding p_c; negative templates ("no <finding>") -> n_c
    score_c = softmax([img . p_c, img . n_c] / temperature)[0]

Templates live in configs/eval/zeroshot_<dataset>.yaml (several per class, their normalised embeddings
averaged, CheXzero style; the paper's exact strings are not published). Metrics per class (MedKLIP's):
AUROC, best F1 over thresholds, accuracy at that threshold with MedKLIP's strict score > threshold;
then the macro mean of each.
Images go through the pretraining run's own evaluation view (data.eval_transform: checkpoint), the
view its embeddings were validated on; the paper's "resize 256, centre crop 224, [0, 1]" is
`data.eval_transform=g2d_paper_eval`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from eval.checkpoint import Pretrained
from eval.metrics import zero_shot_metrics
from eval.plots import plot_roc
from eval.tasks.base import TaskConfig
from eval.tasks.data import make_loader, sample_ids
from eval.tasks.fit import log_info
from eval.zeroshot import embed_loader, zeroshot_probabilities
from model.text import load_tokenizer


@dataclass
class ZeroShotSection:
    # class (a json label name) -> {positive: [templates], negative: [templates]}
    prompts: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    temperature: float = 0.07  # softmax temperature over the pair (AUROC/F1/accuracy do not depend on it)


@dataclass
class ZeroShotConfig(TaskConfig):
    zeroshot: ZeroShotSection = field(default_factory=ZeroShotSection)


def check_prompts(prompts: dict, where: str) -> None:
    if not prompts:
        raise ValueError(f"{where}: no prompts configured")
    for name, pair in prompts.items():
        if set(pair) != {"positive", "negative"} or not pair["positive"] or not pair["negative"]:
            raise ValueError(f"{where}.{name}: needs non-empty 'positive' and 'negative' template lists")


def label_matrix(meta: list[dict], names: list[str]) -> np.ndarray:
    """[N, C] 0/1 from each sample's json labels (1.0 = positive; anything else negative)."""
    rows = []
    for m in meta:
        labels = m.get("labels", {})
        missing = [n for n in names if n not in labels]
        if missing:
            raise ValueError(
                f"sample {m.get('key')!r} ({m.get('dataset')}): json labels lack {missing}; "
                f"prompt classes must be label names of the dataset"
            )
        rows.append([1 if labels[n] == 1.0 else 0 for n in names])
    return np.asarray(rows, dtype=np.int64).reshape(len(meta), len(names))


def run(cfg: ZeroShotConfig, weights: Pretrained, out_dir: Path, device: torch.device, log=log_info) -> dict:
    z, d = cfg.zeroshot, cfg.data
    check_prompts(z.prompts, "zeroshot.prompts")
    model = weights.build_g2d(cfg.model.text_model).to(device).eval()
    tokenizer = load_tokenizer(model.cfg.text_model)
    loader = make_loader(cfg, d.test_split, device, weights, train=False)
    emb = embed_loader(model, loader)
    names = list(z.prompts)
    probs = zeroshot_probabilities(model, tokenizer, emb.image, z.prompts, device, z.temperature)
    scores = torch.stack([probs[n] for n in names], dim=1).numpy()  # [N, C]
    labels = label_matrix(emb.meta, names)
    m = zero_shot_metrics(labels, scores)
    metrics = {
        "auc": m["auc"],
        "f1": m["f1"],
        "acc": m["acc"],
        "per_class": {
            n: {
                "auc": m["auc_per_class"][i],
                "f1": m["f1_per_class"][i],
                "acc": m["acc_per_class"][i],
                "threshold": m["threshold_per_class"][i],
                "n_positive": int(labels[:, i].sum()),
            }
            for i, n in enumerate(names)
        },
        "n_test": int(labels.shape[0]),
    }
    plots = []
    if cfg.plots:
        plots.append(
            plot_roc(
                scores,
                labels.astype(np.int64),
                names,
                out_dir / "roc.png",
                f"{cfg.task}: zero-shot ROC (test split)",
            )
        )
    predictions = {
        **sample_ids(emb.keys, emb.meta),
        "names": np.asarray(names, dtype=str),
        "targets": labels,
        "scores": scores,
    }
    return {"metrics": metrics, "headline": "auc", "plots": plots, "predictions": predictions}
