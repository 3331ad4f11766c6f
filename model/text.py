"""Text side of G2D: a BERT (Bio_ClinicalBERT in the paper) with its first N layers frozen, and a
per-token projector whose [CLS] output is the report embedding.

Speed: the frozen prefix of the network (the embeddings, when frozen, and the frozen layers that
follow) runs under torch.no_grad(), so no activations are kept for it and backward stops at its
output. That needs the embeddings frozen too (text_freeze_embeddings=True): G2D's code trains the
embeddings, which forces autograd through every frozen layer to reach them (the frozen layers'
weights still get no gradient, but their activations are stored and backpropagated).
The stack is driven layer by layer (embeddings, then each `encoder.layer[i]`) with the usual
additive attention mask, which tests/test_model.py checks against BertModel's own forward.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.cli import UserError
from common.log import get_logger
from model.config import ModelConfig

LOG = get_logger("model")

_OFFLINE_HINT = (
    "Offline, pass a local directory written by save_pretrained (`make tiny-bert` -> "
    "model.text_model=runs/tiny_bert, or a downloaded Bio_ClinicalBERT directory), or set "
    "HF_HUB_OFFLINE=1 to use the Hugging Face cache."
)
_TINY_HINT = (
    "`make tiny-bert` builds the tiny stand-in at runs/tiny_bert; otherwise point "
    "model.text_model at a directory written by save_pretrained"
)
# What a hub repo id can look like: `name` or `owner/name`.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class TextModelError(UserError, RuntimeError):
    """model.text_model cannot be loaded (missing directory, unreachable hub, not a BERT).
    Also a RuntimeError, what load_bert raised before, so existing handlers still catch it."""


@functools.cache
def _hub_unreachable(url: str) -> str | None:
    """None when one HEAD request to `url` gets any HTTP answer, else why not (asked once per process)."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(url, timeout=10.0)
    except Exception as exc:  # the transport's error types differ between huggingface_hub versions
        return f"{type(exc).__name__}: {exc}"
    return None


def _from_pretrained_args(name_or_dir: str) -> tuple[str, dict]:
    """(what to pass to from_pretrained, extra kwargs), decided before transformers tries, so a missing
    model fails at once:
    huggingface_hub retries an unreachable hub 5 times with back-off, about 45 s per file here.

    An existing directory loads as is. A name that cannot be a hub id (absolute, ./, ~, two slashes)
    or whose first folder exists here (runs/tiny_bert with runs/ present) is a missing directory.
    A hub id gets one HEAD request: if the hub is unreachable, the Hugging Face cache is used when it
    holds the model (local_files_only) and otherwise the error says how to run offline.
    """
    from huggingface_hub import constants, hf_hub_url, try_to_load_from_cache

    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return str(path), {}
    first = Path(name_or_dir).parts[0] if "/" in name_or_dir else ""
    if not _HUB_ID.match(name_or_dir) or (first and Path(first).is_dir()):
        raise TextModelError(f"text model directory {name_or_dir!r} does not exist; {_TINY_HINT}")
    if constants.HF_HUB_OFFLINE:
        return name_or_dir, {"local_files_only": True}
    why = _hub_unreachable(hf_hub_url(name_or_dir, "config.json"))
    if why is None:
        return name_or_dir, {}
    if isinstance(try_to_load_from_cache(name_or_dir, "config.json"), str):
        return name_or_dir, {"local_files_only": True}
    raise TextModelError(
        f"text model {name_or_dir!r} is not a local directory and the Hugging Face hub is "
        f"unreachable ({why}). {_OFFLINE_HINT}"
    )


def load_tokenizer(name_or_dir: str):
    """AutoTokenizer for a hub name or local directory, with a clear error when it cannot be found."""
    from transformers import AutoTokenizer

    source, kwargs = _from_pretrained_args(name_or_dir)
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise TextModelError(
            f"could not load the tokenizer {name_or_dir!r}: {' '.join(str(exc).split())} {_OFFLINE_HINT}"
        ) from exc


# Checkpoint keys G2D does not load on purpose: the pooler (never used) and the pretraining heads of a
# BertForPreTraining checkpoint such as Bio_ClinicalBERT (masked-LM / next-sentence, `cls.*`).
_UNUSED_KEYS = re.compile(r"^(bert\.)?(pooler|cls)\.")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def _held_load_messages():
    """transformers' own output of one from_pretrained, held back: its "Loading weights" bar and its
    LOAD REPORT table, which it prints as a warning for every checkpoint with a pooler or pretraining
    head (all of them). Yields the held messages; `load_bert` says in one line what matters instead."""
    from transformers.utils import logging as hf_logging

    held: list[str] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record.getMessage())

    logger = hf_logging.get_logger("transformers.modeling_utils")
    handler, propagate, bar = Hold(), logger.propagate, hf_logging.is_progress_bar_enabled()
    logger.addHandler(handler)
    logger.propagate = False
    hf_logging.disable_progress_bar()
    try:
        yield held
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        if bar:
            hf_logging.enable_progress_bar()


def _first_keys(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _check_loaded(name_or_dir: str, info: dict, held: list[str]) -> None:
    """A text model whose checkpoint lacks some of its weights would train them from random values
    unnoticed: that is an error naming them. Checkpoint keys the model has no place for, beyond the
    pooler and pretraining heads, get one warning line; the other held messages are passed on."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise TextModelError(
            f"text model {name_or_dir!r}: the checkpoint lacks {len(missing)} of the model's weights "
            f"({_first_keys(missing)}), which would start random; "
            "is it a BERT checkpoint of this architecture?"
        )
    unused = sorted(k for k in info.get("unexpected_keys") or () if not _UNUSED_KEYS.match(k))
    if unused:
        LOG.warning(
            f"text model {name_or_dir!r}: {len(unused)} checkpoint weights have no place in the model and "
            f"are ignored ({_first_keys(unused)})"
        )
    for message in held:
        if "LOAD REPORT" not in message:
            LOG.warning(message)


def load_bert(name_or_dir: str, attn_implementation: str = "sdpa") -> nn.Module:
    from transformers import AutoModel

    # transformers 5's BERT also offers flash_attention_2 / flex_attention, but those take a 2-D
    # padding mask, not the additive [B,1,1,L] mask TextEncoder passes layer by layer.
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"model.text_attn_implementation={attn_implementation!r}; choose 'sdpa' or 'eager'")

    source, kwargs = _from_pretrained_args(name_or_dir)
    with _held_load_messages() as held:
        try:
            # No pooler: G2D never uses it, and DDP rejects parameters that get no gradient.
            # sdpa (F.scaled_dot_product_attention: fused kernels) or eager (matmul + softmax): the
            # additive float mask built below is the format both accept; results agree to rounding.
            bert, info = AutoModel.from_pretrained(
                source,
                add_pooling_layer=False,
                attn_implementation=attn_implementation,
                output_loading_info=True,
                **kwargs,
            )
        except (OSError, ValueError, RuntimeError) as exc:
            # A size mismatch raises after the held report, which then holds the detail (its table
            # has terminal colour codes); the offline hint is for a model that could not be found.
            report = " ".join(" ".join(_ANSI.sub("", m).split()) for m in held if "LOAD REPORT" in m)
            hint = _OFFLINE_HINT if isinstance(exc, OSError) else ""
            raise TextModelError(
                f"could not load the text model {name_or_dir!r}: {' '.join(str(exc).split())}"
                f"{' (' + report + ')' if report else ''} {hint}".rstrip()
            ) from exc
    _check_loaded(name_or_dir, info, held)
    if not (hasattr(bert, "embeddings") and hasattr(getattr(bert, "encoder", None), "layer")):
        raise TextModelError(
            f"text model {name_or_dir!r} ({type(bert).__name__}) is not BERT-like "
            "(needs .embeddings and .encoder.layer)"
        )
    return bert


class MaskedBatchNorm1d(nn.Module):
    """BatchNorm1d(affine=False) over [B, C, L] whose batch statistics can skip padding positions.

    With mask=None it is exactly nn.BatchNorm1d (G2D's code: statistics over all 256 positions,
    so a batch of short reports is normalised mostly by PAD tokens). With a [B, L] mask only real
    tokens count. Masked mean/variance are plain reductions: no boolean indexing, so no host sync.
    Buffers have nn.BatchNorm1d's names, so state dicts are interchangeable.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # [B,C,L]
        if mask is None or not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, training=self.training, momentum=self.momentum, eps=self.eps
            )
        xf = x.float()
        m = mask[:, None, :].to(xf.dtype)  # [B,1,L]
        count = m.sum().clamp_min(2.0)
        mean = (xf * m).sum(dim=(0, 2)) / count  # [C]
        var = ((xf - mean[None, :, None]) ** 2 * m).sum(dim=(0, 2)) / count
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1), self.momentum)  # unbiased, as BN
        out = (xf - mean[None, :, None]) * torch.rsqrt(var[None, :, None] + self.eps)
        return out.to(x.dtype)


class TextEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, bert: nn.Module | None = None):
        super().__init__()
        self.bert = bert if bert is not None else load_bert(cfg.text_model, cfg.text_attn_implementation)
        layers = self.bert.encoder.layer
        if not 0 <= cfg.text_freeze_layers <= len(layers):
            raise ValueError(f"text_freeze_layers={cfg.text_freeze_layers} not in [0, {len(layers)}]")
        max_positions = getattr(self.bert.config, "max_position_embeddings", cfg.max_text_length)
        if cfg.max_text_length > max_positions:
            raise ValueError(
                f"max_text_length={cfg.max_text_length} exceeds {cfg.text_model!r}'s "
                f"max_position_embeddings={max_positions}"
            )
        self.bert.embeddings.requires_grad_(not cfg.text_freeze_embeddings)
        for layer in layers[: cfg.text_freeze_layers]:
            layer.requires_grad_(False)
        # Stages 0 (embeddings) .. n (last layer); the first `no_grad_stages` need no autograd.
        self.no_grad_stages = (1 + cfg.text_freeze_layers) if cfg.text_freeze_embeddings else 0
        hidden = self.bert.config.hidden_size
        self.proj_in = nn.Conv1d(hidden, cfg.proj_dim, 1, bias=False)
        self.proj_bn = MaskedBatchNorm1d(cfg.proj_dim)
        self.proj_out = nn.Conv1d(cfg.proj_dim, cfg.proj_dim, 1, bias=False)
        self.bn_real_tokens = cfg.text_bn_real_tokens
        self.pooling = cfg.text_pooling
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"text_pooling={self.pooling!r}; choose 'cls' or 'mean'")

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B,L] ids + [B,L] mask -> last hidden states [B,L,hidden]."""
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and self.no_grad_stages == 0):
            hidden = self.bert.embeddings(input_ids=input_ids)
        # Additive mask [B,1,1,L]: 0 where attended, dtype-min at padding (BERT's extended mask).
        keep = attention_mask[:, None, None, :].to(hidden.dtype)
        additive = (1.0 - keep) * torch.finfo(hidden.dtype).min
        for i, layer in enumerate(self.bert.encoder.layer):
            with torch.set_grad_enabled(grad and i + 1 >= self.no_grad_stages):
                hidden = layer(hidden, additive)
        return hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """-> projected report embedding [B,128] (not normalised): the [CLS] position (G2D), or the
        mean over real tokens (`text_pooling=mean`, for randomly initialised BERTs whose [CLS] output
        carries almost no information about the report yet)."""
        hidden = self.hidden_states(input_ids, attention_mask)  # [B,L,hidden]
        x = self.proj_in(hidden.transpose(1, 2))  # [B,128,L]
        x = self.proj_bn(x, attention_mask if self.bn_real_tokens else None)
        x = self.proj_out(F.relu(x))  # [B,128,L]
        if self.pooling == "mean":
            keep = attention_mask[:, None, :].to(x.dtype)  # [B,1,L]
            return (x * keep).sum(dim=2) / keep.sum(dim=2).clamp_min(1.0)
        return x[:, :, 0]  # [CLS]


def build_tiny_text_model(
    out_dir: str | Path,
    texts: list[str],
    hidden: int = 64,
    layers: int = 2,
    heads: int = 2,
    vocab_size: int = 2000,
    max_length: int = 512,
    seed: int = 0,
) -> Path:
    """Write a small randomly initialised BERT + a WordPiece tokenizer trained on `texts` to out_dir.

    For tests, demos and the synthetic corpus, where Bio_ClinicalBERT cannot be downloaded. Both
    halves are written with save_pretrained, so AutoTokenizer/AutoModel.from_pretrained(out_dir)
    (and model.text_model=out_dir) load them like any hub checkpoint.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    if not texts:
        raise ValueError("build_tiny_text_model needs at least one text to train the tokenizer on")
    out_dir = Path(out_dir)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    # transformers 5 ignores a vocab_file argument here; the trained object carries the vocab.
    fast = BertTokenizerFast(
        tokenizer_object=tok,
        do_lower_case=True,
        model_max_length=max_length,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max_length,
        pad_token_id=tok.token_to_id("[PAD]"),
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(out_dir)
    return out_dir
