r"""Image side of G2D: an smp U-Net whose encoder feeds two heads.

    image [B,C,H,W] -> smp encoder -> pyramid (stride 1..32) -> U-Net decoder -> seg logits [B,1,H,W]
                                   \-> C5 [B,2048,H/32,W/32] -> projector -> dense [B,128,H/32,W/32]
                                                                -> attention pool -> global [B,128]
                                                                   + CLS->pixel attn [B,heads,H/32,W/32]

The U-Net is `segmentation_models_pytorch.Unet`, the class G2D and MGCA both build, so the exported
encoder / encoder+decoder state dicts load into their downstream code unchanged (model/export.py).

This module is also where weights meet a module, for training and evaluation alike: `build_unet`
builds the bare U-Net (baselines, exports, downstream tasks), `read_weights_file` reads a state dict
file safely, `load_strict` loads one strictly with a report of every missing, unexpected and
wrong-shape key. Their errors are user errors (common.cli): one line naming the file.
"""

from __future__ import annotations

import math
import pickle
import urllib.error
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from common.cli import UserError
from model.config import ModelConfig


class ArchitectureMismatch(UserError, ValueError):
    """Weights that do not fit the module they are loaded into; the message lists the keys."""


class UnreadableWeights(UserError, ValueError):
    """A weights file that is not a readable torch file of tensors (truncated, text, pickled objects)."""


class WeightsUnavailable(UserError, RuntimeError):
    """ImageNet weights that could not be downloaded (an offline machine) and no local file given."""


def build_unet(cfg: ModelConfig, decoder_channels: tuple[int, ...] | None = None) -> smp.Unet:
    """The bare smp U-Net of `cfg`: its encoder, cfg.channels in, one output class, and the decoder
    widths `decoder_channels` (default cfg.decoder_channels). Random weights: encoder_weights=None,
    so smp never downloads anything (init_encoder loads weights explicitly).
    image [B,C,H,W] -> logits [B,1,H,W]; `.encoder(image)` -> 6 maps at strides 1, 2, 4, 8, 16, 32."""
    return smp.Unet(
        cfg.encoder,
        encoder_weights=None,
        in_channels=cfg.channels,
        classes=1,
        decoder_channels=tuple(decoder_channels or cfg.decoder_channels),
    )


def check_state_fits(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, what: str) -> None:
    """ArchitectureMismatch unless `state` has exactly the keys and shapes of `own` (a module's
    state dict, possibly on the meta device); the message lists every kind of mismatch, 20 keys each."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if not (missing or unexpected or wrong):
        return

    def head(keys):
        return f"{keys[:20]}{f' ... ({len(keys)} in all)' if len(keys) > 20 else ''}"

    raise ArchitectureMismatch(
        f"{source}: weights do not match the {what}: missing {head(missing)}; "
        f"unexpected {head(unexpected)}; wrong shape {head(wrong)}"
    )


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    """module.load_state_dict(state, strict=True), with check_state_fits' key report instead of
    torch's multi-line error."""
    check_state_fits(module.state_dict(), state, source, what)
    module.load_state_dict(state, strict=True)


def read_weights_file(path: str | Path, label: str = "") -> object:
    """torch.load(weights_only=True) on the CPU: tensors and plain containers only, so a file cannot
    run code. Any failure (truncated, not a torch file, pickled Python objects) -> UnreadableWeights,
    one line starting with `label` (e.g. "model.encoder_weights=") and the path."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a Python object, or garbage bytes
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next(
            (
                line
                for line in lines
                if line.startswith(("Unsupported", "WeightsUnpickler error:")) and not line.endswith(":")
            ),
            lines[-1] if lines else "",
        )
        raise UnreadableWeights(
            f"{label}{path}: not a readable torch file (torch.load(weights_only=True) refused it: "
            f"{reason.split('. ')[0][:200]})"
        ) from exc
    except Exception as exc:  # a truncated/corrupt/foreign file: say which one
        reason = " ".join(str(exc).split())[:200]
        raise UnreadableWeights(f"{label}{path}: not a readable torch file ({type(exc).__name__}: {reason})") from exc


class Projector2d(nn.Module):
    """Per-pixel MLP of G2D: 1x1 conv -> BN(affine=False) -> ReLU -> 1x1 conv, no biases."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_dim, dim, 1, bias=False),
            nn.BatchNorm2d(dim, affine=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,in,h,w] -> [B,dim,h,w]
        return self.net(x)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling over the projected tokens.

    The query is one "CLS" token equal to the spatial mean of the tokens (not a learned token),
    plus a learned positional embedding over CLS + grid; keys/values are all HW+1 tokens.
    The per-head softmax weights of CLS over the pixels are the raw material of the pseudo masks.
    """

    def __init__(self, grid: tuple[int, int], dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attn_pool_heads={heads} must divide proj_dim={dim} (nn.MultiheadAttention)")
        self.grid = grid
        self.positional_embedding = nn.Parameter(torch.randn(grid[0] * grid[1] + 1, dim) / math.sqrt(dim))
        self.attn = nn.MultiheadAttention(dim, heads)
        self.c_proj = nn.Linear(dim, dim)

    def _positions(self, h: int, w: int) -> torch.Tensor:  # -> [h*w+1, dim]
        if (h, w) == self.grid:
            return self.positional_embedding
        # Another input size than the one the table was made for: resample the grid part
        # bilinearly (as ViTs do at a new resolution); the CLS entry is kept.
        cls_pos, grid_pos = self.positional_embedding[:1], self.positional_embedding[1:]
        grid_pos = grid_pos.T.reshape(1, -1, *self.grid)
        grid_pos = F.interpolate(grid_pos, size=(h, w), mode="bilinear", align_corners=False)
        return torch.cat([cls_pos, grid_pos.reshape(-1, h * w).T], dim=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape  # [B, dim, h, w]
        tokens = x.flatten(2).permute(2, 0, 1)  # [hw, B, dim] (seq-first)
        tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)  # [hw+1, B, dim]
        tokens = tokens + self._positions(h, w)[:, None, :].to(tokens.dtype)
        pooled, weights = self.attn(tokens[:1], tokens, tokens, need_weights=True, average_attn_weights=False)
        pooled = self.c_proj(pooled[0])  # [B, dim]
        attention = weights[:, :, 0, 1:].reshape(b, -1, h, w)  # [B, heads, h, w], CLS self-entry dropped
        return pooled, attention

    def value_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, dim, h, w] tokens -> [B, dim, h, w]: every position sent through the pool's value, output
        and c_proj maps (with its positional embedding), skipping the query-key attention (MaskCLIP's
        dense CLIP features). These vectors live in the space of the global embedding: with one head
        the pooled output is exactly their attention-weighted mean (plus the CLS token's share), so a
        prompt's cosine with each position says how much that position pushes the global embedding
        towards the prompt. The projector's map `x` itself is compared with text by nothing in
        training. For grounding only (eval); the training step never calls it."""
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2) + self._positions(h, w)[1:].to(x.dtype)  # [B, hw, dim]
        return self.token_values(tokens).transpose(1, 2).reshape(b, c, h, w)

    def token_values(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., dim] tokens (positions already added) -> [..., dim]: value, output and c_proj maps."""
        dim = self.attn.embed_dim
        values = F.linear(tokens, self.attn.in_proj_weight[2 * dim :], self.attn.in_proj_bias[2 * dim :])
        return self.c_proj(self.attn.out_proj(values))


# ----------------------------------------------------------------------------------------------
# Encoder initialisation: none | imagenet (torchvision) | a local state dict.


def _torchvision_resnet_weights(encoder: str):
    import torchvision

    names = {
        "resnet18": "ResNet18",
        "resnet34": "ResNet34",
        "resnet50": "ResNet50",
        "resnet101": "ResNet101",
        "resnet152": "ResNet152",
    }
    if encoder not in names:
        raise WeightsUnavailable(
            f"encoder_weights='imagenet' is supported for {sorted(names)} (torchvision weights); "
            f"got encoder={encoder!r}. Pass a local state dict path instead."
        )
    # V1 = the weights smp's 'imagenet' ResNets (and hence G2D's encoder) start from.
    return torchvision.models.get_weight(f"{names[encoder]}_Weights.IMAGENET1K_V1")


def _imagenet_state_dict(encoder: str) -> dict[str, torch.Tensor]:
    weights = _torchvision_resnet_weights(encoder)
    try:
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:200]  # one line: a URLError's text can span several
        raise WeightsUnavailable(
            f"could not download the ImageNet weights for {encoder} from {weights.url} ({reason}). "
            "This machine looks offline: download that file elsewhere and set "
            "model.encoder_weights=/path/to/file.pth (a torchvision or smp-encoder state dict)."
        ) from exc


def encoder_state_dict(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Normalise a state dict to smp-encoder keys (`conv1.weight`, `layer1.0...`).

    Accepts a torchvision ResNet (its `fc.*` classifier dropped), an smp encoder, a whole smp U-Net
    (`encoder.*` kept, decoder/head dropped), or any of those saved by DDP (`module.` prefix).
    """
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnreadableWeights(f"{source}: expected a flat state dict of tensors, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("encoder.") for k in state):
        return {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def load_encoder_state(encoder: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load `state` (any layout `encoder_state_dict` accepts) into an smp encoder.

    A 3-channel first conv going into a 1-channel encoder is summed over its input channels (the
    rule smp applies to its own pretrained weights). Any other mismatch is an error listing the keys.
    """
    state = encoder_state_dict(state, source)
    own = encoder.state_dict()
    first = "conv1.weight"
    if first in state and first in own and state[first].shape[1] == 3 and own[first].shape[1] == 1:
        state[first] = state[first].sum(dim=1, keepdim=True)
    load_strict(encoder, state, source, type(encoder).__name__)


def init_encoder(encoder: nn.Module, encoder_name: str, weights: str) -> None:
    if weights == "none":
        return
    if weights == "imagenet":
        load_encoder_state(encoder, _imagenet_state_dict(encoder_name), f"imagenet {encoder_name}")
        return
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"model.encoder_weights={weights!r}: not 'none', 'imagenet' or an existing file")
    label = "model.encoder_weights="
    load_encoder_state(encoder, read_weights_file(path, label), f"{label}{path}")


# ----------------------------------------------------------------------------------------------


class ImageEncoderDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.image_size % 32:
            raise ValueError(f"image_size={cfg.image_size} must be a multiple of 32 (U-Net stride)")
        self.unet = build_unet(cfg)
        init_encoder(self.unet.encoder, cfg.encoder, cfg.encoder_weights)
        self.projector = Projector2d(self.unet.encoder.out_channels[-1], cfg.proj_dim)
        grid = cfg.image_size // 32
        self.attn_pool = AttentionPool2d((grid, grid), cfg.proj_dim, cfg.attn_pool_heads)

    def encode(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """image [B,C,H,W] -> (encoder pyramid, dense [B,128,H/32,W/32], global [B,128],
        attention [B,heads,H/32,W/32])."""
        if image.shape[-2] % 32 or image.shape[-1] % 32:
            raise ValueError(f"image size {tuple(image.shape[-2:])} must be a multiple of 32")
        features = self.unet.encoder(image)
        dense = self.projector(features[-1])
        pooled, attention = self.attn_pool(dense)
        return features, dense, pooled, attention

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (seg logits [B,1,H,W], dense, global, attention)."""
        features, dense, pooled, attention = self.encode(image)
        seg_logits = self.unet.segmentation_head(self.unet.decoder(features))
        return seg_logits, dense, pooled, attention
