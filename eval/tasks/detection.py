"""Object detection (RSNA pneumonia, Object-CXR foreign objects): MGCA's protocol, one class.

    image [B,C,224,224] -> FROZEN encoder -> C3 [B,c3,28,28], C4 [B,c4,14,14], C5 [B,c5,7,7]
      (ResNet stages 2-4, strides 8/16/32) -> YOLOv3Head -> per scale [B, 3, h, w, 5 + 1] raw
      -> yolo_loss (training) | decode -> objectness >= 0.5 -> NMS 0.5 (evaluation)

Only the head trains (AdamW wd 1e-6; lr and batch per data fraction in the task YAML). Model
selection and early stopping on the VALIDATION mAP (MGCA's rule, patience from the config; the
`select_on` key picks map_mgca, MGCA's, or map_all_images). The frozen encoder's maps of the
training and validation images are computed once and kept (`feature_cache_gib`): with a frozen
encoder and the deterministic `eval` transform every epoch would recompute the same maps. Test
metrics (eval.metrics.map_torchmetrics: torchmetrics' MeanAveragePrecision, COCO 101-point, IoU
0.40:0.05:0.75, scores = objectness): `map_mgca` scores only the images with a predicted box AND a
ground-truth box (MGCA's loop skips the rest; the headline), `map_all_images` scores every test
image (a box on a normal image is a false positive, an image with ground truth and no box
contributes misses).

YOLOv3 parts as MGCA trains them (facts in ../shared/reference/eval-protocols.md; written from those
facts and the YOLOv3 paper, not from any implementation):
- Head: YOLOv3's top-down path. On C5 a set of five convs (1x1 / 3x3 alternating), a 3x3 conv and a
  1x1 output conv; a 1x1 lateral conv upsampled x2 and concatenated with C4, the same again, then C3.
  Widths `head_width`, /2, /4 (512/256/128 in YOLOv3). Conv + BN + LeakyReLU(0.1).
- Anchors: YOLOv3's nine COCO priors for a 416-px input, scaled by (input size / 416) per axis.
- Targets, per scale and independently: a ground-truth box goes to the cell holding its centre and
  to the best of THAT scale's three anchors by shape IoU (centres aligned, sizes in grid cells of
  that scale, each side + 1 cell), so every box has one positive per scale. Anchors of that cell
  with shape IoU > `ignore_iou` leave the no-object mask; nothing else does, so an assigned anchor
  with shape IoU <= `ignore_iou` is a positive AND a no-object cell (objectness target BCE(c, 1) +
  0.5 x BCE(c, 0), as MGCA's; most positives at stride 8). Two boxes claiming one anchor and cell:
  the later one wins.
- Loss per scale, summed over scales: BCE of sigmoid(tx), sigmoid(ty) against the centre's offset in
  its cell; MSE of raw (tw, th) against log(box / anchor); objectness BCE against 1 on positives
  + 0.5 x BCE against 0 on no-object anchors (positives among them included); class BCE on
  positives. Every term is a mean over the WHOLE [B, A, h, w] tensor (masked entries count as
  zeros), weights xy 2.5, wh 2.5, conf 1, cls 1.
- Decoding: centre = (cell + sigmoid(t)) * stride, size = anchor * exp(t), NOT clipped to the image
  (MGCA's boxes may cross the border, and NMS compares them so); confidence = sigmoid(objectness)
  (MGCA thresholds, sorts, runs NMS and ranks by it); NMS IoU with the "+1 pixel" convention.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eval.checkpoint import Pretrained
from eval.metrics import DEFAULT_IOU_THRESHOLDS, keep_image, map_torchmetrics, nms
from eval.plots import image_for_display, panel_row, plot_history, save_figure, short_key
from eval.tasks.base import TaskConfig
from eval.tasks.data import epochs_of, make_loader, sample_ids
from eval.tasks.fit import autocast, fit, freeze, log_info, place
from pipeline.config import is_deterministic

# YOLOv3's priors (w, h) at 416 px, one triple per scale: stride 8, 16, 32.
ANCHORS_416 = (((10, 13), (16, 30), (33, 23)), ((30, 61), (62, 45), (59, 119)), ((116, 90), (156, 198), (373, 326)))


def scaled_anchors(image_size: tuple[int, int]) -> torch.Tensor:
    """[3 scales, 3 anchors, 2 (w, h)] in pixels of an image of (height, width) `image_size`."""
    h, w = image_size
    return torch.tensor(ANCHORS_416, dtype=torch.float32) * torch.tensor([w / 416.0, h / 416.0])


def conv_bn(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1, inplace=True)
    )


def conv_set(cin: int, width: int) -> nn.Sequential:
    """YOLOv3's five-conv block: 1x1 width, 3x3 2*width, 1x1, 3x3, 1x1."""
    return nn.Sequential(
        conv_bn(cin, width, 1),
        conv_bn(width, 2 * width, 3),
        conv_bn(2 * width, width, 1),
        conv_bn(width, 2 * width, 3),
        conv_bn(2 * width, width, 1),
    )


class YOLOv3Head(nn.Module):
    def __init__(self, in_channels: tuple[int, int, int], num_classes: int = 1, width: int = 512, num_anchors: int = 3):
        super().__init__()
        c3, c4, c5 = in_channels
        w5, w4, w3 = width, width // 2, width // 4
        out = num_anchors * (5 + num_classes)
        self.num_anchors, self.num_classes = num_anchors, num_classes
        self.set5, self.out5 = conv_set(c5, w5), nn.Sequential(conv_bn(w5, 2 * w5, 3), nn.Conv2d(2 * w5, out, 1))
        self.lat5 = conv_bn(w5, w4, 1)
        self.set4, self.out4 = conv_set(c4 + w4, w4), nn.Sequential(conv_bn(w4, 2 * w4, 3), nn.Conv2d(2 * w4, out, 1))
        self.lat4 = conv_bn(w4, w3, 1)
        self.set3, self.out3 = conv_set(c3 + w3, w3), nn.Sequential(conv_bn(w3, 2 * w3, 3), nn.Conv2d(2 * w3, out, 1))

    def _shape(self, x: torch.Tensor) -> torch.Tensor:  # [B, A*(5+C), h, w] -> [B, A, h, w, 5+C]
        b, _, h, w = x.shape
        return x.reshape(b, self.num_anchors, 5 + self.num_classes, h, w).permute(0, 1, 3, 4, 2).contiguous()

    def forward(self, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor) -> list[torch.Tensor]:
        """-> [p8, p16, p32], each [B, 3, h, w, 5 + classes] raw (tx, ty, tw, th, obj, cls...)."""
        x5 = self.set5(c5)
        up5 = F.interpolate(self.lat5(x5), size=c4.shape[-2:], mode="nearest")
        x4 = self.set4(torch.cat([up5, c4], dim=1))
        up4 = F.interpolate(self.lat4(x4), size=c3.shape[-2:], mode="nearest")
        x3 = self.set3(torch.cat([up4, c3], dim=1))
        return [self._shape(self.out3(x3)), self._shape(self.out4(x4)), self._shape(self.out5(x5))]


def _shape_iou(wh: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """[N, 2] box sizes vs [K, 2] anchor sizes, both centred at the origin and both in GRID CELLS of
    one scale -> [N, K] IoU with MGCA's "+1" convention: every width and height counts one more, and
    since MGCA compares the shapes in cells, that is one cell (the stride in pixels), not one pixel."""
    wh, anchors = wh + 1, anchors + 1
    inter = torch.minimum(wh[:, None, 0], anchors[None, :, 0]) * torch.minimum(wh[:, None, 1], anchors[None, :, 1])
    union = (wh[:, 0] * wh[:, 1])[:, None] + (anchors[:, 0] * anchors[:, 1])[None, :] - inter
    return inter / union.clamp_min(1e-9)


def _empty_targets(n_img: int, n_anch: int, grid: tuple[int, int], device) -> dict[str, torch.Tensor]:
    gh, gw = grid
    return {
        "obj": torch.zeros(n_img, n_anch, gh, gw, dtype=torch.bool, device=device),
        "noobj": torch.ones(n_img, n_anch, gh, gw, dtype=torch.bool, device=device),
        "txy": torch.zeros(n_img, n_anch, gh, gw, 2, device=device),
        "twh": torch.zeros(n_img, n_anch, gh, gw, 2, device=device),
    }


def build_targets(
    gt_boxes: list[torch.Tensor],
    grids: list[tuple[int, int]],
    anchors: torch.Tensor,
    image_size: tuple[int, int],
    ignore_iou: float = 0.5,
    device: torch.device | str = "cpu",
) -> list[dict[str, torch.Tensor]]:
    """Per scale: {obj [B,A,h,w] bool, noobj [B,A,h,w] bool, txy [B,A,h,w,2], twh [B,A,h,w,2]}.

    gt_boxes: per image [n_i, 4] (x1, y1, x2, y2) pixels of an image of (height, width) `image_size`.
    grids: (h, w) per scale. anchors [S, A, 2] (w, h) pixels. Every box is positive once per scale.
    `noobj` is cleared only where the shape IoU exceeds `ignore_iou`: a positive whose own anchor
    fits worse stays a no-object cell too (MGCA)."""
    n_img, n_anch = len(gt_boxes), anchors.shape[1]
    out = [_empty_targets(n_img, n_anch, grid, device) for grid in grids]
    boxes = [torch.as_tensor(b, dtype=torch.float32, device=device).reshape(-1, 4) for b in gt_boxes]
    image_of = torch.cat([torch.full((len(b),), i, dtype=torch.long, device=device) for i, b in enumerate(boxes)])
    boxes = torch.cat(boxes) if boxes else torch.zeros(0, 4, device=device)
    if boxes.shape[0] == 0:
        return out
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # [N, 2] (x, y) pixels
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1e-3)  # [N, 2] pixels
    height, width = image_size
    for s, (gh, gw) in enumerate(grids):
        t = out[s]
        stride = torch.tensor([width / gw, height / gh], device=device)  # (x, y) pixels per cell
        scale_anchors = anchors[s].to(device)  # [A, 2] pixels
        iou = _shape_iou(wh / stride, scale_anchors / stride)  # [N, A], shapes in cells
        best = iou.argmax(dim=1)  # [N]: this scale's best anchor
        cx, cy = centre[:, 0] / stride[0], centre[:, 1] / stride[1]  # in cells of this scale
        col = cx.floor().long().clamp(0, gw - 1)
        row = cy.floor().long().clamp(0, gh - 1)
        for a in range(n_anch):
            ignore = iou[:, a] > ignore_iou
            t["noobj"][image_of[ignore], a, row[ignore], col[ignore]] = False
        t["obj"][image_of, best, row, col] = True
        t["txy"][image_of, best, row, col] = torch.stack([cx - col, cy - row], dim=1)
        t["twh"][image_of, best, row, col] = torch.log(wh / scale_anchors[best])
    return out


LOSS_WEIGHTS = {"xy": 2.5, "wh": 2.5, "conf": 1.0, "cls": 1.0}


def yolo_loss(
    predictions: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], weights: dict[str, float] = LOSS_WEIGHTS
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """predictions: per scale [B, A, h, w, 5 + C] raw; targets from `build_targets`.
    -> (weighted total [], {xy, wh, conf, cls} unweighted terms summed over scales), in float32.
    Each term is a sum over masked entries divided by ALL entries of the scale's tensor (MGCA's mean
    over the masked-to-zero tensor), so a batch without boxes still trains the no-object term."""
    terms = {"xy": 0.0, "wh": 0.0, "conf": 0.0, "cls": 0.0}
    for p, t in zip(predictions, targets):
        p = p.float()
        obj, noobj = t["obj"].float(), t["noobj"].float()  # [B, A, h, w]
        cells = obj.numel()
        bce_xy = F.binary_cross_entropy_with_logits(p[..., 0:2], t["txy"], reduction="none")  # [B,A,h,w,2]
        se_wh = (p[..., 2:4] - t["twh"]) ** 2
        bce_obj = F.binary_cross_entropy_with_logits(p[..., 4], torch.ones_like(obj), reduction="none")  # [B,A,h,w]
        # target 0 on every no-object cell, positives included (MGCA: BCE(c, 1) + 0.5 x BCE(c, 0) there)
        bce_noobj = F.binary_cross_entropy_with_logits(p[..., 4], torch.zeros_like(obj), reduction="none")
        bce_cls = F.binary_cross_entropy_with_logits(p[..., 5:], torch.ones_like(p[..., 5:]), reduction="none")
        # x and y (w and h) are two terms, each a mean over [B, A, h, w]: their sum is sum / cells.
        terms["xy"] = terms["xy"] + (bce_xy * obj[..., None]).sum() / cells
        terms["wh"] = terms["wh"] + (se_wh * obj[..., None]).sum() / cells
        terms["conf"] = terms["conf"] + (bce_obj * obj).sum() / cells + 0.5 * (bce_noobj * noobj).sum() / cells
        terms["cls"] = terms["cls"] + (bce_cls * obj[..., None]).sum() / bce_cls.numel()
    total = sum(weights[k] * v for k, v in terms.items())
    return total, terms


@torch.no_grad()
def decode(
    predictions: list[torch.Tensor], anchors: torch.Tensor, image_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (boxes [B, K, 4] x1y1x2y2 pixels, NOT clipped to the image (MGCA), objectness [B, K]) over
    all anchors."""
    height, width = image_size
    all_boxes, all_conf = [], []
    for s, p in enumerate(predictions):
        p = p.float()
        b, a, gh, gw, _ = p.shape
        stride_y, stride_x = height / gh, width / gw
        rows = torch.arange(gh, device=p.device, dtype=torch.float32).view(1, 1, gh, 1)
        cols = torch.arange(gw, device=p.device, dtype=torch.float32).view(1, 1, 1, gw)
        cx = (p[..., 0].sigmoid() + cols) * stride_x
        cy = (p[..., 1].sigmoid() + rows) * stride_y
        anc = anchors[s].to(p.device).view(1, a, 1, 1, 2)
        # exp of a large raw value overflows to inf (MGCA's would then be inf/nan boxes); 10 allows
        # boxes e^10 = 22,026 times the anchor, so below that the boxes are MGCA's.
        w = anc[..., 0] * p[..., 2].clamp(max=10).exp()
        h = anc[..., 1] * p[..., 3].clamp(max=10).exp()
        conf = p[..., 4].sigmoid()  # MGCA: objectness alone (not obj x class)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        all_boxes.append(boxes.reshape(b, -1, 4))
        all_conf.append(conf.reshape(b, -1))
    return torch.cat(all_boxes, dim=1), torch.cat(all_conf, dim=1)


def detect(
    predictions: list[torch.Tensor],
    anchors: torch.Tensor,
    image_size: tuple[int, int],
    conf_threshold: float = 0.5,
    nms_iou: float = 0.5,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image (boxes [k, 4], objectness [k]) after objectness >= conf_threshold and NMS at nms_iou
    (+1-pixel IoU), on CPU. Every box passing the threshold enters NMS, as in MGCA (no cap: at 224 px
    that is at most the 3,087 anchors, which torchvision's NMS handles in milliseconds)."""
    boxes, conf = decode(predictions, anchors, image_size)
    out = []
    for bx, cf in zip(boxes.cpu(), conf.cpu()):
        keep = cf >= conf_threshold
        bx, cf = bx[keep], cf[keep]
        kept = nms(bx, cf, nms_iou, plus_one=True) if cf.numel() else torch.zeros(0, dtype=torch.long)
        out.append((bx[kept], cf[kept]))
    return out


# ---------------------------------------------------------------------------------------------
# the task


@dataclass
class DetectionSection:
    head_width: int = 512  # YOLOv3's 512/256/128 for the C5/C4/C3 branches
    conf_threshold: float = 0.5
    nms_iou: float = 0.5
    ignore_iou: float = 0.5
    iou_thresholds: tuple[float, ...] = DEFAULT_IOU_THRESHOLDS
    loss_xy: float = 2.5
    loss_wh: float = 2.5
    loss_conf: float = 1.0
    loss_cls: float = 1.0
    plot_images: int = 6  # test images drawn in boxes.png (with ground truth first)
    # The frozen encoder's maps of the training subset and the validation split are kept (on the
    # device) when together they fit this many GiB, and the encoder runs once instead of every epoch;
    # above it (e.g. ResNet-50 on all of RSNA: ~1.4 MB per image in bf16) or at 0 it runs every epoch.
    feature_cache_gib: float = 4.0
    # The validation mAP that keeps the best epoch and stops early. map_mgca (MGCA's rule) scores only
    # the images where the head kept a box, which for a weak head early in training can be 1-2 images,
    # so the kept epoch is then chance; map_all_images scores every validation image (issue 27).
    select_on: Literal["map_mgca", "map_all_images"] = "map_mgca"


@dataclass
class DetectionConfig(TaskConfig):
    detection: DetectionSection = field(default_factory=DetectionSection)


class FrozenEncoderYOLO(nn.Module):
    """Frozen smp encoder -> (C3, C4, C5) -> YOLOv3Head. Only `head` has trainable parameters."""

    def __init__(self, encoder: nn.Module, width: int):
        super().__init__()
        self.encoder = freeze(encoder)
        c3, c4, c5 = encoder.out_channels[-3:]
        self.head = YOLOv3Head((c3, c4, c5), num_classes=1, width=width)

    @torch.no_grad()
    def features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B,C,H,W] -> C3 [B,c3,H/8,W/8], C4 [B,c4,H/16,W/16], C5 [B,c5,H/32,W/32] (no gradients)."""
        feats = self.encoder(image)  # 6 maps, strides 1..32
        return tuple(feats[-3:])

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.head(*self.features(image))


@dataclass
class FeatureBatch:
    """A batch of `CachedFeatures`: what the head needs of a loader batch, with the frozen encoder's
    maps in place of the image."""

    features: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # C3, C4, C5 as FrozenEncoderYOLO.features
    boxes: list[torch.Tensor]  # B x [n_i, 4] (x1, y1, x2, y2) pixels of the network input
    keys: list[str]
    meta: list[dict]
    image_size: tuple[int, int]  # (H, W) of the network input, for the anchors and the decoding

    def __len__(self) -> int:
        return len(self.keys)


class CachedFeatures:
    """One split's frozen-encoder maps, computed once and served as batches every epoch.

    Exact for detection because nothing upstream of the head changes between epochs: the encoder is
    frozen in eval mode and the transform is deterministic (`eval`: resize, no augmentation). The
    streaming loop decodes and runs the encoder over the training subset once per epoch and over the
    validation split TWICE per epoch (loss, then mAP), 50 epochs in MGCA's schedule; this runs it
    once per split. Training batches are reshuffled per epoch from (seed, epoch)."""

    def __init__(self, split: FeatureBatch, batch_size: int, shuffle: bool, seed: int):
        """split: the whole split as one FeatureBatch (features [N, ...] each)."""
        self.features, self.boxes, self.keys, self.meta = split.features, split.boxes, split.keys, split.meta
        self.image_size = split.image_size
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.features)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:  # batches per epoch (drop_last off, like the loaders)
        return math.ceil(len(self.keys) / self.batch_size)

    def __iter__(self):
        n = len(self.keys)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            picked = idx.tolist()
            feats = tuple(f[idx.to(f.device)] for f in self.features)
            yield FeatureBatch(
                feats,
                [self.boxes[i] for i in picked],
                [self.keys[i] for i in picked],
                [self.meta[i] for i in picked],
                self.image_size,
            )


@torch.no_grad()
def cache_features(model: FrozenEncoderYOLO, loader, cfg, device, max_bytes: int, *, batch_size: int, shuffle: bool):
    """The split of `loader` as `CachedFeatures` (on `device`, in the autocast dtype the head sees), or
    None when its maps would pass `max_bytes` (judged from the first batch, before the pass goes on):
    the caller then streams, as without a cache."""
    levels, boxes, keys, meta, total, size = ([], [], []), [], [], [], 0, None
    for batch in epochs_of(loader, 0):
        with autocast(device, cfg.train.autocast_precision(device)):
            feats = model.features(batch.image)
        nbytes = sum(f.numel() * f.element_size() for f in feats)
        total += nbytes
        # Known after the first batch (len(loader) batches of at most this size): stop before the pass.
        if total > max_bytes or (not keys and nbytes * len(loader) > max_bytes):
            return None
        for level, f in zip(levels, feats):
            level.append(f)
        boxes += [b.cpu() for b in _gt_boxes(batch)]
        keys += batch.keys
        meta += batch.meta
        size = tuple(batch.image.shape[-2:])
    if not keys:
        raise ValueError("a split for the detection head yielded no samples")
    joined = []
    for level in levels:  # one level at a time: the cache and one level's copy, never two caches
        joined.append(torch.cat(level))
        level.clear()
    return CachedFeatures(FeatureBatch(tuple(joined), boxes, keys, meta, size), batch_size, shuffle, cfg.seed)


def cached_splits(cfg: DetectionConfig, model: FrozenEncoderYOLO, train, valid, device, log) -> tuple:
    """(train, valid, info): each split as `CachedFeatures` when its maps fit what is left of
    `detection.feature_cache_gib`, else the loader unchanged; the log says which, and why, and info
    (results.json's `feature_cache`) records per cached split {images, mib, seconds}. The validation
    split goes first: every epoch runs it twice (loss, then mAP), the training subset once."""
    budget = int(cfg.detection.feature_cache_gib * 2**30)
    if budget <= 0:
        return train, valid, {}
    if not is_deterministic(cfg.data.train_transform):
        log(f"  data.train_transform={cfg.data.train_transform} augments: the frozen encoder runs every epoch")
        return train, valid, {}
    out, info = {}, {}
    for name, loader, batch_size, shuffle in (
        ("validation", valid, cfg.data.eval_batch_size, False),
        ("training", train, cfg.data.batch_size, True),
    ):
        t0 = time.perf_counter()
        cached = cache_features(model, loader, cfg, device, budget, batch_size=batch_size, shuffle=shuffle)
        if cached is None:
            log(
                f"  {name} images: encoder maps pass what is left of detection.feature_cache_gib="
                f"{cfg.detection.feature_cache_gib:g}; the frozen encoder runs on them every epoch"
            )
            out[name] = loader
            continue
        budget -= cached.nbytes
        out[name] = cached
        info[name] = {"images": len(cached.keys), "mib": cached.nbytes / 2**20, "seconds": time.perf_counter() - t0}
        log(
            f"  {name} images: frozen encoder run once, maps of {info[name]['images']} images cached "
            f"({info[name]['mib']:.0f} MiB, {info[name]['seconds']:.1f} s)"
        )
    return out["training"], out["validation"], info


def head_inputs(model: FrozenEncoderYOLO, batch) -> tuple[tuple[torch.Tensor, ...], tuple[int, int]]:
    """((C3, C4, C5), (H, W) of the network input) of a loader batch or a `FeatureBatch`."""
    if isinstance(batch, FeatureBatch):
        return batch.features, batch.image_size
    return model.features(batch.image), tuple(batch.image.shape[-2:])


def _gt_boxes(batch) -> list[torch.Tensor]:
    if batch.boxes is None:
        raise ValueError("the loader returned no boxes (load_boxes must be on for detection)")
    return [torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in batch.boxes]


def _image_index(per_image: list[torch.Tensor]) -> np.ndarray:
    """[sum n_i] the image number of every row of the concatenated per-image tensors."""
    return np.concatenate([np.full(len(x), i, dtype=np.int64) for i, x in enumerate(per_image)])


def _anchors_for(image_size: tuple[int, int], device) -> torch.Tensor:
    """[3, 3, 2] priors scaled to the network input of (H, W) `image_size` (224 in MGCA), on `device`."""
    return scaled_anchors(image_size).to(device)


@torch.no_grad()
def predict_split(model: FrozenEncoderYOLO, loader, s: DetectionSection, cfg, device, n_examples: int = 0) -> dict:
    """Every image of `loader`: {boxes, scores (objectness-ranked, after NMS), gt: per-image lists;
    keys, meta; examples: the first n_examples (key, image, gt, boxes, scores) for the plot}."""
    out = {"boxes": [], "scores": [], "gt": [], "keys": [], "meta": [], "examples": []}
    for batch in epochs_of(loader, 0):
        with autocast(device, cfg.train.autocast_precision(device)):
            feats, size = head_inputs(model, batch)
            preds = model.head(*feats)
        found = detect(preds, _anchors_for(size, device), size, s.conf_threshold, s.nms_iou)
        for i, ((boxes, scores), truth) in enumerate(zip(found, _gt_boxes(batch))):
            out["boxes"].append(boxes)
            out["scores"].append(scores)
            out["gt"].append(truth.cpu())
            if len(out["examples"]) < n_examples:
                out["examples"].append((batch.keys[i], image_for_display(batch.image[i]), truth.cpu(), boxes, scores))
        out["keys"].extend(batch.keys)
        out["meta"].extend(batch.meta)
    return out


def scored_images_text(split: str, found: dict, scored: dict, conf_threshold: float) -> str:
    """One log line saying in words which images MGCA's mAP scored, and why it is undefined if none.
    found: `predict_split`'s output; scored: `map_torchmetrics(.., skip="mgca")`'s."""
    n = len(found["gt"])
    with_box = sum(int(b.shape[0] > 0) for b in found["boxes"])
    with_truth = sum(int(g.shape[0] > 0) for g in found["gt"])
    text = (
        f"{split}: {with_box} of {n} images kept a box at objectness >= {conf_threshold}, {with_truth} have "
        f"ground truth; map_mgca scores the {scored['n_images_scored']} with both"
    )
    if scored["n_images_scored"] == 0:
        text += " -> mAP undefined (nan)"
    if scored["n_images_over_max_detections"]:
        text += f"; {scored['n_images_over_max_detections']} had > 100 boxes (COCO keeps each one's 100 best)"
    return text


def _test_metrics(found: dict, s: DetectionSection) -> tuple[dict, str]:
    """(results.json's test metrics, the `scored_images_text` line for the log)."""
    pred_boxes, pred_scores, gt = found["boxes"], found["scores"], found["gt"]
    mgca = map_torchmetrics(pred_boxes, pred_scores, gt, s.iou_thresholds, skip="mgca")
    every = map_torchmetrics(pred_boxes, pred_scores, gt, s.iou_thresholds, skip="none")
    metrics = {
        "map_mgca": mgca["map"],
        "map_mgca_per_threshold": mgca["per_threshold"],
        "map_all_images": every["map"],
        "map_all_images_per_threshold": every["per_threshold"],
        "n_test": len(gt),
        "n_test_with_boxes": sum(int(g.shape[0] > 0) for g in gt),
        "n_test_with_prediction": sum(int(b.shape[0] > 0) for b in pred_boxes),
        "n_scored_mgca": mgca["n_images_scored"],
        "n_test_over_100_predictions": every["n_images_over_max_detections"],
        "n_predicted_boxes": sum(int(b.shape[0]) for b in pred_boxes),
        "conf_threshold": s.conf_threshold,
        "nms_iou": s.nms_iou,
    }
    return metrics, scored_images_text("test", found, mgca, s.conf_threshold)


def _predictions_npz(found: dict, s: DetectionSection) -> dict:
    """The flat arrays of predictions.npz (eval/bootstrap.py rebuilds the per-image lists)."""
    return {
        **sample_ids(found["keys"], found["meta"]),
        "pred_boxes": torch.cat(found["boxes"]).reshape(-1, 4).numpy(),
        "pred_scores": torch.cat(found["scores"]).numpy(),
        "pred_image": _image_index(found["scores"]),
        "gt_boxes": torch.cat(found["gt"]).reshape(-1, 4).numpy(),
        "gt_image": _image_index(found["gt"]),
        "iou_thresholds": np.asarray(s.iou_thresholds, dtype=np.float64),
    }


def _plots(cfg: DetectionConfig, found: dict, history: list, out_dir: Path) -> list[str]:
    s = cfg.detection
    examples = sorted(found["examples"], key=lambda e: e[2].shape[0] == 0)  # images with ground truth first
    title = f"{cfg.task}: ground truth (green) vs predicted (red, objectness >= {s.conf_threshold})"
    return [
        plot_boxes(examples[: s.plot_images], out_dir / "boxes.png", title),
        plot_history(history, out_dir / "loss.png", f"{cfg.task}: YOLOv3 head loss"),
    ]


def _train_head(cfg: DetectionConfig, model: FrozenEncoderYOLO, loaders: tuple, device, log):
    """MGCA's fit: AdamW on the head, model selection and early stopping on the validation map_mgca.
    Returns (fit result, [n images scored per validation pass])."""
    s, (train, valid) = cfg.detection, loaders
    weights_by_term = {"xy": s.loss_xy, "wh": s.loss_wh, "conf": s.loss_conf, "cls": s.loss_cls}
    val_scored: list[int] = []

    def loss_on_batch(batch):
        feats, size = head_inputs(model, batch)
        preds = model.head(*feats)
        grids = [tuple(p.shape[2:4]) for p in preds]
        targets = build_targets(_gt_boxes(batch), grids, _anchors_for(size, device), size, s.ignore_iou, device)
        return yolo_loss(preds, targets, weights_by_term)[0]

    def set_train_mode():
        model.head.train()
        model.encoder.eval()

    def val_map() -> float:  # the head is kept and stopped on this (s.select_on; MGCA: map_mgca)
        found = predict_split(model, valid, s, cfg, device)
        skip = "mgca" if s.select_on == "map_mgca" else "none"
        scored = map_torchmetrics(found["boxes"], found["scores"], found["gt"], s.iou_thresholds, skip=skip)
        val_scored.append(sum(keep_image(b.shape[0], g.shape[0], "mgca") for b, g in zip(found["boxes"], found["gt"])))
        if skip == "mgca" and scored["n_images_scored"] == 0:  # say why the epoch line will read nan
            log("  " + scored_images_text("validation", found, scored, s.conf_threshold))
        return scored["map"]

    fitted = fit(
        model.head,
        loss_on_batch,
        train,
        valid,
        cfg.train,
        set_train_mode,
        device,
        log,
        val_score=val_map,
        score_name=s.select_on,
    )
    return fitted, val_scored


def run(cfg: DetectionConfig, weights: Pretrained, out_dir: Path, device: torch.device, log=log_info) -> dict:
    s, d = cfg.detection, cfg.data
    model = place(FrozenEncoderYOLO(weights.build_encoder(), s.head_width), device, cfg.train)
    train = make_loader(cfg, d.train_split, device, weights, train=True, boxes=True)
    valid = make_loader(cfg, d.valid_split, device, weights, train=False, boxes=True)
    test = make_loader(cfg, d.test_split, device, weights, train=False, boxes=True)
    train, valid, cache_info = cached_splits(cfg, model, train, valid, device, log)
    fitted, val_scored = _train_head(cfg, model, (train, valid), device, log)
    model.eval()
    found = predict_split(model, test, s, cfg, device, 4 * s.plot_images)
    if not found["gt"]:
        raise ValueError("the test split yielded no samples")
    metrics, scored_text = _test_metrics(found, s)
    log(scored_text)
    metrics.update(fitted.summary(), selected_on=s.select_on, val_n_scored_mgca_per_epoch=val_scored)
    metrics[f"best_val_{s.select_on}"] = fitted.best_val_score
    plots = _plots(cfg, found, fitted.history, out_dir) if cfg.plots else []
    return {
        "metrics": metrics,
        "headline": "map_mgca",
        "plots": plots,
        "predictions": _predictions_npz(found, s),
        # How the run went, not what it measured (fill seconds vary): beside train_seconds in results.json.
        "record": {"feature_cache": cache_info},  # {} when the encoder ran every epoch
    }


def plot_boxes(examples: list[tuple], path: Path, title: str) -> str:
    from matplotlib.patches import Rectangle

    fig, axes = panel_row(len(examples))
    for ax, (key, img, truth, boxes, scores) in zip(axes, examples):
        ax.imshow(img, cmap="gray")
        for x1, y1, x2, y2 in truth.tolist():
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", lw=1.2))
        for (x1, y1, x2, y2), sc in zip(boxes.tolist(), scores.tolist()):
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red", lw=0.8))
            ax.text(x1, y1, f"{sc:.2f}", color="red", fontsize=5, va="bottom")
        ax.set_title(short_key(key), fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return save_figure(fig, path)
