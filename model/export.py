"""State dicts for downstream code, in the layouts G2D publishes.

encoder_sd          -> smp.Unet(encoder).encoder.load_state_dict(..., strict=True)
                       (G2D's *_encoder.pth; what MGCA-style frozen-encoder protocols load)
encoder_decoder_sd  -> smp.Unet(encoder, classes=1).load_state_dict(..., strict=True)
                       (G2D's *_encoder_decoder.pth: encoder + U-Net decoder + seg head)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.image import load_encoder_state, read_weights_file


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under any torch.compile (`._orig_mod`) and DDP (`.module`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def export_unet_state_dicts(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """G2DModel (possibly wrapped) -> (encoder_sd, encoder_decoder_sd), detached CPU copies."""
    unet = unwrap(model).image.unet
    encoder_sd = {k: v.detach().cpu().clone() for k, v in unet.encoder.state_dict().items()}
    encoder_decoder_sd = {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}
    return encoder_sd, encoder_decoder_sd


def load_encoder_into_unet(path_or_sd: str | Path | dict[str, torch.Tensor], unet: nn.Module) -> nn.Module:
    """Load pretrained encoder weights into an smp U-Net's encoder, strictly; returns `unet`.

    Accepts a file (model.image.read_weights_file: weights_only) or a dict, in encoder, whole-U-Net,
    torchvision-ResNet or DDP-prefixed layout. A mismatch raises ArchitectureMismatch (a ValueError)
    listing missing/unexpected/wrong-shape keys; an unreadable file UnreadableWeights.
    """
    if isinstance(path_or_sd, (str, Path)):
        source = str(path_or_sd)
        if not Path(source).is_file():
            raise FileNotFoundError(f"encoder weights not found: {source}")
        state = read_weights_file(source)
    else:
        source, state = "state dict", path_or_sd
    load_encoder_state(unet.encoder, dict(state), source)
    return unet
