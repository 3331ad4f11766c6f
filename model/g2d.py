"""The G2D model: image U-Net + attention pool, BERT text encoder, and both losses in one module.

One forward computes everything a training step needs, so DDP wraps a single module and sees every
parameter used on every step:

    image [B,C,H,W] --ImageEncoderDecoder--> seg logits [B,1,H,W], global [B,128], attention [B,4,H/32,W/32]
    ids/mask [B,L]  --TextEncoder----------> text [B,128]
    VLA = InfoNCE(global, text);  mask = pseudo_mask(attention, image)  (no gradient)
    PA  = decoder loss towards model.decoder_target;  loss = VLA + w * PA, w = 0 before pa_warmup_steps

The decoder target (paper Tab. 5a / Tab. 8 arms; every arm runs the same forward, so compute per step is equal):
    pseudo_mask           PA = pseudo_seg_loss(seg logits, mask)                    (G2D, the default)
    reconstruction        PA = reconstruction_loss(seg logits, grey of the image)  (pixel MSE)
    shuffled_pseudo_mask  PA = pseudo_seg_loss(seg logits, derange(mask))          (another image's mask)
    none                  PA as pseudo_mask, but w = 0 throughout: VLA only, exactly model.pa_weight=0
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.config import check_fields
from model.config import ModelConfig
from model.image import ImageEncoderDecoder
from model.losses import ContrastiveLoss, pseudo_seg_loss, reconstruction_loss
from model.pseudo_mask import derange, pseudo_mask
from model.text import TextEncoder

# The arms model.decoder_target may name, as its Literal annotation declares them.
DECODER_TARGETS: tuple[str, ...] = typing.get_args(typing.get_type_hints(ModelConfig)["decoder_target"])


def reconstruction_target(image: torch.Tensor) -> torch.Tensor:
    """Normalised image [B,C,H,W] -> [B,1,H,W] float32: what decoder_target=reconstruction rebuilds.

    The decoder head is the smp U-Net's 1-channel segmentation head (classes=1), kept so that the
    exported encoder+decoder loads into the downstream smp.Unet(classes=1) like every other arm's and
    the arms differ in the target alone. The image is one grey image: with channels=1 the target is
    the input itself; with channels=3 the channels are the grey replicated and normalised with
    per-channel mean/std, i.e. three affine copies of it, whose mean (the target) is one more.
    """
    return image.detach().float().mean(dim=1, keepdim=True)


@dataclass
class G2DOutput:
    loss: torch.Tensor  # [] total: vla + pa_weight * pa (pa weight 0 during warm-up and with decoder_target=none)
    vla_loss: torch.Tensor  # []
    pa_loss: torch.Tensor  # [] the decoder's loss towards decoder_target; computed (and loggable) at weight 0 too
    image_emb: torch.Tensor  # [B,128] L2-normalised
    text_emb: torch.Tensor  # [B,128] L2-normalised
    attention: torch.Tensor  # [B,heads,H/32,W/32] CLS->pixel softmax weights
    pseudo_mask: torch.Tensor  # [B,1,H,W] {0,1} the images' own pseudo masks (every decoder target), no gradient
    seg_logits: torch.Tensor  # [B,1,H,W] decoder output
    decoder_target: torch.Tensor  # [B,1,H,W] what the decoder was scored against (own/other mask, grey image)


class G2DModel(nn.Module):
    def __init__(self, cfg: ModelConfig, text_backbone: nn.Module | None = None):
        super().__init__()
        # A config built in code (not loaded from YAML) meets its fields' declared ranges here.
        check_fields(cfg, "model")
        self.cfg = cfg
        self.image = ImageEncoderDecoder(cfg)
        self.text = TextEncoder(cfg, bert=text_backbone)
        self.vla = ContrastiveLoss(cfg.temperature, cfg.learnable_temperature, cfg.gather_negatives, cfg.vla_reduction)
        # Replaced by their compiled versions in compile_parts().
        self.pa_loss_fn = pseudo_seg_loss
        self.reconstruction_loss_fn = reconstruction_loss

    def compile_parts(self, mode: str | None = None, backend: str = "inductor") -> None:
        """torch.compile, in place, the parts that carry the step's work: the image tower (U-Net +
        projector + attention pool: fused BN+ReLU, fewer kernels), every BERT layer (frozen ones run
        under no_grad: their own graph) and the PA loss (sigmoid/Dice/BCE over full-resolution maps:
        memory-bound, what fusion pays for). The contrastive loss stays eager: a [B,B] matmul whose
        all-gather with gradient is a collective inside an autograd Function. In place
        (`Module.compile`), so state dict keys stay unprefixed and DDP wraps the module as before.
        mode="reduce-overhead" adds CUDA-graph capture on a GPU. Costs: compile time at the first
        step of each new shape (bucket text lengths to keep that to a few), none afterwards."""
        kw = {"mode": mode, "backend": backend}
        self.image.compile(**kw)
        for layer in self.text.bert.encoder.layer:
            layer.compile(**kw)
        self.pa_loss_fn = torch.compile(pseudo_seg_loss, **kw)
        self.reconstruction_loss_fn = torch.compile(reconstruction_loss, **kw)

    def make_pseudo_mask(self, attention: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        return pseudo_mask(
            attention,
            image,
            mode=c.pseudo_mask_mode,
            quantile=c.pseudo_mask_quantile,
            body_mask=c.body_mask,
            smoothing=c.smoothing,
            sigma_space=c.bilateral_sigma_space,
            sigma_range=c.bilateral_sigma_range,
        )

    def forward(
        self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, step: int
    ) -> G2DOutput:
        seg_logits, _dense, pooled, attention = self.image(image)
        text = self.text(input_ids, attention_mask)
        vla = self.vla(pooled, text)
        # Every arm builds the images' own masks: the health log measures their collapse in each arm.
        mask = self.make_pseudo_mask(attention, image)
        target = mask
        if self.cfg.decoder_target == "reconstruction":
            target = reconstruction_target(image)
            pa = self.reconstruction_loss_fn(seg_logits, target)
        else:
            if self.cfg.decoder_target == "shuffled_pseudo_mask":
                target, _source = derange(mask)
            pa = self.pa_loss_fn(seg_logits, target, self.cfg.pa_loss)
        # A weight of 0 rather than leaving PA out keeps the decoder in the graph during warm-up (and in
        # a VLA-only run), so DDP (find_unused_parameters=False) sees a gradient for every parameter on
        # every step. Those zero gradients must not reach the optimiser (AdamW would count warm-up steps
        # of state and decay the weights): train.step.TrainStep drops the grads of `pa_parameters()`
        # on every step where `decoder_trains(step)` is False.
        return G2DOutput(
            loss=vla + self.pa_weight_at(step) * pa,
            vla_loss=vla,
            pa_loss=pa,
            image_emb=F.normalize(pooled.float(), dim=-1),
            text_emb=F.normalize(text.float(), dim=-1),
            attention=attention,
            pseudo_mask=mask,
            seg_logits=seg_logits,
            decoder_target=target,
        )

    def pa_weight_at(self, step: int) -> float:
        """The decoder loss's weight in the total loss at `step`: model.pa_weight from pa_warmup_steps
        on, 0 before; 0 throughout with decoder_target=none. So `none` and `pa_weight=0` are one run
        (same forward, losses and updates; tested): `none` names the VLA-only arm, `pa_weight` scales PA."""
        if self.cfg.decoder_target == "none" or step < self.cfg.pa_warmup_steps:
            return 0.0
        return self.cfg.pa_weight

    def decoder_trains(self, step: int) -> bool:
        """Whether the decoder and its head get an update at `step` (a host-side rule: no sync)."""
        return self.pa_weight_at(step) != 0.0

    def pa_parameters(self) -> list[nn.Parameter]:
        """The parameters only the PA loss trains (U-Net decoder + segmentation head). During the PA
        warm-up G2D's code gives them no gradient at all, so AdamW leaves them (and their state) alone."""
        unet = self.image.unet
        params = (*unet.decoder.parameters(), *unet.segmentation_head.parameters())
        return [p for p in params if p.requires_grad]

    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (global [B,128] L2-normalised, dense projected map [B,128,H/32,W/32] (not normalised;
        the map grounding compares with text by cosine), attention [B,heads,H/32,W/32]). No decoder."""
        _features, dense, pooled, attention = self.image.encode(image)
        return F.normalize(pooled.float(), dim=-1), dense, attention

    def value_map(self, dense: torch.Tensor) -> torch.Tensor:
        """encode_image's dense map [B,128,h,w] -> [B,128,h,w] in the global embedding's space
        (AttentionPool2d.value_map): grounding's `dense_map: attn_value` option."""
        return self.image.attn_pool.value_map(dense)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B,L] ids + mask -> [B,128] L2-normalised report/prompt embedding."""
        return F.normalize(self.text(input_ids, attention_mask).float(), dim=-1)
