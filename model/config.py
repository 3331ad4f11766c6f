"""The model's config. Defaults are the real G2D model; where the paper and the released code
disagree the default follows the paper where that is feasible and the code's behaviour is one
switch away. docs/method.md tabulates every such choice with its key.

Loaded strictly with `common.config.config_from_dict(ModelConfig, dict)`; registered named variants
live in model/registry.py. Each range is declared on its field (`checked` / `at_least`) and checked by
`common.config.check_fields` when a pretraining config loads and again when G2DModel is built (a
config made in code); the `Literal` annotations are the declared choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.config import at_least, checked, config_to_dict

# Fields that change how the model runs, not what it computes or which weights it has: a run may resume
# (or a checkpoint be evaluated) with another value.
RUNTIME_ONLY_FIELDS = frozenset({"text_attn_implementation"})


@dataclass
class ModelConfig:
    name: str = "g2d_resnet50"  # registry entry this config started from (model/registry.py)

    # Image side: smp.Unet(encoder, classes=1) + projector + attention pool.
    encoder: str = "resnet50"  # any smp encoder; "imagenet" init supports torchvision ResNets
    encoder_weights: str = "none"  # none | imagenet (torchvision V1 ResNet weights) | path to a state dict
    # Training resolution; sizes the positional embedding (H/32 x W/32).
    image_size: int = checked(256, "a positive multiple of 32", lambda v: v >= 32 and v % 32 == 0)
    channels: int = checked(3, "1 or 3", lambda v: v in (1, 3))  # 3: grey replicated (G2D); 1: first conv summed
    # smp default, as G2D; smp's U-Net decoder has one block per encoder stage, and the depth is fixed at 5.
    decoder_channels: tuple[int, ...] = checked(
        (256, 128, 64, 32, 16), "5 widths >= 1 (one per stage)", lambda v: len(v) == 5 and all(c >= 1 for c in v)
    )
    proj_dim: int = at_least(1, 128)  # projector width = embedding size (paper Tab. 5c: 128 best)
    attn_pool_heads: int = at_least(1, 4)  # code: 4; paper claims 3, which cannot divide 128

    # Text side: a BERT from the hub or a local directory.
    text_model: str = "emilyalsentzer/Bio_ClinicalBERT"
    text_freeze_layers: int = at_least(0, 9)  # encoder layers 0..N-1 frozen (12 = all)
    text_freeze_embeddings: bool = False  # code trains the embeddings; True lets the frozen prefix run without autograd
    max_text_length: int = at_least(2, 256, " ([CLS] and [SEP])")
    text_attn_implementation: Literal["sdpa", "eager"] = "sdpa"  # BERT attention: fused SDPA kernels | matmul+softmax
    text_pooling: Literal["cls", "mean"] = "cls"  # report embedding: [CLS] (G2D) | mean of real tokens
    text_bn_real_tokens: bool = (
        True  # BN statistics of the text projector over real tokens only; False = all positions (code)
    )

    # Vision-language alignment loss.
    temperature: float = checked(0.07, "> 0", lambda v: v > 0)
    learnable_temperature: bool = False
    gather_negatives: bool = True  # all-gather embeddings (with gradient) so negatives span all ranks; code: False
    vla_reduction: Literal["mean", "sum"] = "mean"  # mean of the two directions | sum (code)

    # Pseudo masks from the attention pool.
    pseudo_mask_mode: Literal["paper", "code"] = "paper"
    pseudo_mask_quantile: float = checked(0.85, "in (0, 1)", lambda v: 0 < v < 1)
    body_mask: bool = True  # paper mode only: zero attention outside the Otsu body mask
    smoothing: bool = True  # paper mode only: bilateral smoothing of the binary mask
    # Spatial sigma as a fraction of one attention cell (32 px at stride 32).
    bilateral_sigma_space: float = checked(0.25, "> 0", lambda v: v > 0)
    bilateral_sigma_range: float = checked(1.0, "> 0", lambda v: v > 0)  # range sigma on the {0,1} mask values

    # Pseudo-segmentation ("PA") loss on the U-Net decoder output.
    pa_loss: Literal["paper", "code"] = "paper"  # 0.5*(soft Dice + BCE) | (1 - Dice on logits) + 0.2*BCE
    pa_weight: float = at_least(0, 1.0)
    # PA enters the total loss from this step on (code); 0 = from the start (paper).
    pa_warmup_steps: int = at_least(0, 200)
    # What the U-Net decoder is trained towards (paper Tab. 5a / Tab. 8 arms; model/g2d.py): the pseudo mask (G2D) |
    # the input image (pixel MSE) | another image's pseudo mask | nothing (VLA only: the same as pa_weight=0)
    decoder_target: Literal["pseudo_mask", "reconstruction", "shuffled_pseudo_mask", "none"] = "pseudo_mask"


def data_derived_fields(data) -> dict:
    """The fields a run's data section decides, from `data` (its pipeline.config.DataConfig, which model/
    does not import): image_size = the side the training transform yields (it sizes the attention pool's
    positional table, so another value would resample it on every forward) and max_text_length = the
    token cap (checked against BERT's positions). A pretraining config stores them once, in `data`."""
    return {"image_size": data.train_side, "max_text_length": data.max_text_length}


DATA_DERIVED_FIELDS = ("image_size", "max_text_length")  # the keys of data_derived_fields


def changed_fields(saved: dict, current: ModelConfig) -> list[str]:
    """Names of the fields in which `current` differs from a checkpoint's saved model config.

    A field absent from `saved` was added after the checkpoint was written: it counts as its default
    (new fields default to the behaviour that existed before them). Runtime-only fields are ignored.
    """
    now, defaults = config_to_dict(current), config_to_dict(ModelConfig())
    return sorted(k for k, v in now.items() if k not in RUNTIME_ONLY_FIELDS and saved.get(k, defaults[k]) != v)
