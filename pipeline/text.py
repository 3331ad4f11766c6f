"""Report tokenisation inside the loader, padded per batch.

G2D pads every report to 256 tokens; most reports are far shorter, so padding each batch only to its
longest report (capped at `max_length`) removes most of the text tower's work. The length is rounded
up to `pad_multiple` (8: tensor-core friendly shapes, and fewer distinct shapes for kernel caches)
when that cannot exceed `max_length`.

Where it runs: inside the DataLoader workers (torch backend) or the DALI prefetch thread (Hugging
Face fast tokenizers are Rust and release the GIL), never on the training thread. The time spent is
returned so the loader can report it per batch.
"""

from __future__ import annotations

import copy
import time

import torch


class BatchTokenizer:
    def __init__(self, tokenizer, max_length: int, pad_multiple: int = 8, padding: str = "longest"):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; the loader "
                "needs one to batch-encode without holding the GIL"
            )
        # A private copy: a Rust tokenizer called from two threads at once (the DALI prefetch thread
        # and, say, zero-shot prompts on the training thread) fails with "Already borrowed", because
        # each call sets its truncation/padding state.
        self.tokenizer = copy.deepcopy(tokenizer)
        self.max_length = max_length
        self.padding = padding  # "longest" (per batch) | "max_length" (G2D's code; benchmarks)
        # pad_to_multiple_of is applied after truncation, so it may only be used where the rounded
        # length stays within max_length.
        self.pad_multiple = pad_multiple if pad_multiple > 1 and max_length % pad_multiple == 0 else None

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """texts -> input_ids [B, L] int64, attention_mask [B, L] int64, seconds spent."""
        t0 = time.perf_counter()
        enc = self.tokenizer(
            texts,
            padding=self.padding,
            truncation=True,
            max_length=self.max_length,
            pad_to_multiple_of=self.pad_multiple,
            return_attention_mask=True,
            return_token_type_ids=False,
            return_tensors="pt",
        )
        ids = enc["input_ids"].to(torch.int64)
        mask = enc["attention_mask"].to(torch.int64)
        return ids, mask, time.perf_counter() - t0
