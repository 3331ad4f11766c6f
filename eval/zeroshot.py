"""Embedding-space evaluation shared by pretraining validation, the demo and the zero-shot tasks.

- `embed_loader`: global image and report embeddings of a split (no grad, eval mode).
- `retrieval_topk`: image->text retrieval accuracy (is the paired report among the top k?).
- `prompt_embeddings` / `zeroshot_probabilities`: CheXzero-style scoring - each class has positive
  and negative prompt templates; their normalised mean embeddings are compared with the image
  embedding, and the score is the softmax over the (positive, negative) pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# A few findings the synthetic corpus draws, with prompt templates (several per class, averaged).
DEFAULT_PROMPTS: dict[str, dict[str, list[str]]] = {
    "Pleural Effusion": {
        "positive": ["pleural effusion", "there is a pleural effusion"],
        "negative": ["no pleural effusion", "no effusion is seen"],
    },
    "Pneumothorax": {
        "positive": ["pneumothorax", "there is a pneumothorax"],
        "negative": ["no pneumothorax", "no pneumothorax is seen"],
    },
    "Cardiomegaly": {
        "positive": ["cardiomegaly", "the heart is enlarged"],
        "negative": ["no cardiomegaly", "heart size is normal"],
    },
    "Consolidation": {
        "positive": ["consolidation", "focal consolidation"],
        "negative": ["no consolidation", "no focal consolidation"],
    },
    "Edema": {
        "positive": ["pulmonary edema", "there is pulmonary edema"],
        "negative": ["no pulmonary edema", "no edema"],
    },
}


@dataclass
class Embedded:
    image: torch.Tensor  # [N, D] L2-normalised global image embeddings
    text: torch.Tensor | None  # [N, D] L2-normalised report embeddings (None without tokens)
    meta: list[dict]
    keys: list[str]


@torch.no_grad()
def embed_loader(model: torch.nn.Module, loader, max_batches: int = 0) -> Embedded:
    was_training = model.training
    model.eval()
    images, texts, meta, keys = [], [], [], []
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        img_emb, _dense, _attn = model.encode_image(batch.image)
        images.append(img_emb.float().cpu())
        if batch.input_ids is not None:
            texts.append(model.encode_text(batch.input_ids, batch.attention_mask).float().cpu())
        meta.extend(batch.meta)
        keys.extend(batch.keys)
    model.train(was_training)
    if not images:
        raise ValueError("the evaluation loader yielded no batches (split too small for the batch size?)")
    return Embedded(torch.cat(images), torch.cat(texts) if texts else None, meta, keys)


def retrieval_topk(image: torch.Tensor, text: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict:
    """Image->text retrieval over N pairs: fraction whose own report ranks within the top k."""
    sim = image @ text.T  # [N, N]
    own = sim.diagonal().unsqueeze(1)  # [N, 1]
    rank = (sim > own).sum(dim=1)  # 0 = best; ties count in our favour
    return {f"top{k}": float((rank < k).float().mean()) for k in ks}


@torch.no_grad()
def prompt_embeddings(
    model: torch.nn.Module, tokenizer, prompts: list[str], device, max_length: int = 64
) -> torch.Tensor:
    """Normalised mean embedding of a list of prompt templates: [D]."""
    tok = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    was_training = model.training
    model.eval()
    emb = model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float()
    model.train(was_training)
    return F.normalize(emb.mean(dim=0), dim=0).cpu()


def zeroshot_probabilities(
    model, tokenizer, image: torch.Tensor, prompts: dict[str, dict[str, list[str]]], device, temperature: float = 0.07
) -> dict[str, torch.Tensor]:
    """class -> [N] probability of the positive prompt (softmax over the positive/negative pair)."""
    out = {}
    for name, pair in prompts.items():
        pos = prompt_embeddings(model, tokenizer, pair["positive"], device)
        neg = prompt_embeddings(model, tokenizer, pair["negative"], device)
        logits = torch.stack([image @ pos, image @ neg], dim=1) / temperature  # [N, 2]
        out[name] = logits.softmax(dim=1)[:, 0]
    return out


def chexpert_targets(meta: list[dict], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, keep) for CheXpert label `name`: 1.0 -> 1; 0.0 or blank -> 0; -1.0 (uncertain) dropped."""
    values = [m.get("labels", {}).get(name) for m in meta]
    labels = torch.tensor([1.0 if v == 1.0 else 0.0 for v in values])
    keep = torch.tensor([v != -1.0 for v in values])
    return labels, keep
