"""What the evaluation starts from: pretrained weights and the architecture they belong to.

    resolve_weights(spec, baseline) -> Pretrained

`spec` (the CLI's --ckpt, `make eval CKPT=...`) is one of
    None / ""          the newest pretraining checkpoint under runs/pretrain*/checkpoints/ or
                       runs/*/pretrain*/checkpoints/ (the demo writes runs/demo/pretrain)
    <file>.pt          a pretraining checkpoint (keys model, config, step, ...; train/checkpoint.py)
    <run dir>          its newest checkpoints/step_*.pt, else its exported g2d_encoder_decoder.pth
    <file>.pth         an exported smp encoder (g2d_encoder.pth) or whole U-Net (g2d_encoder_decoder.pth),
                       or another model's plain ResNet state dict in torchvision layout (its `fc.*`
                       classifier dropped); the architecture comes from config.yaml beside it, else
                       from `baseline` (model.baseline: g2d_resnet50 = ResNet-50)
    <file> + prefix    any checkpoint holding the image encoder under a key prefix (MGCA / Lightning:
                       {"state_dict": {"img_encoder_q.model.conv1.weight": ...}}, `ckpt.prefix=
                       img_encoder_q.model.`): the keys under the prefix, stripped, are the encoder
                       (or U-Net, with decoder.* keys); everything else is dropped and counted
    random             the paper's "Random Init" row: `baseline`'s architecture, random weights
    imagenet           the paper's "ImageNet Init" row: torchvision ImageNet encoder weights
                       (downloaded, or `imagenet_weights=<local state dict>`)

The architecture is always rebuilt from the checkpoint's own saved `model` config (never from the
eval config), image_size and max_text_length re-derived from its saved `data` section where a
pretraining config stores them (saved_model_fields; an older config's own model.* copy is kept),
with `encoder_weights` forced to "none" so nothing is downloaded: the weights come from the file.
This module only finds and reads the weights; model/ builds the architectures
(model.registry.build_model, model.image.build_unet) and loads weights into them strictly
(model.image.load_strict: `ArchitectureMismatch` listing the missing, unexpected and wrong-shape keys).
Files are read with torch.load(weights_only=True).

Integrity: a pretraining checkpoint carries a digest of its content (train/checkpoint.py), an export
a `<file>.sha256` sidecar written beside it; a file that no longer matches is a BadCheckpoint. In a
run directory (or the default run) a damaged newest checkpoint is skipped, with a warning, for the
one before it. Files without a checksum (older runs, other programs' weights) load unchecked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from common.cli import UserError
from common.config import ConfigError, config_from_dict, config_to_dict
from common.io import DigestMismatch, pop_and_verify_digest, sha256_file, verify_sha256_sidecar
from common.log import get_logger
from common.run_layout import CHECKPOINT_DIR, CKPT_RE, list_checkpoints, newest_checkpoint
from model.config import DATA_DERIVED_FIELDS, ModelConfig, data_derived_fields
from model.image import (
    ArchitectureMismatch,  # re-exported: what callers of this module catch
    ImageEncoderDecoder,
    UnreadableWeights,
    WeightsUnavailable,  # re-exported
    build_unet,
    check_state_fits,
    encoder_state_dict,
    init_encoder,
    load_strict,
    read_weights_file,
)
from model.registry import MODEL_CONFIGS, build_model, model_config
from pipeline.config import DataConfig

DEFAULT_RUNS_GLOBS = ("runs/pretrain*", "runs/*/pretrain*")
EXPORT_FULL = "g2d_encoder_decoder.pth"  # what a run directory without checkpoints falls back to
BASELINES = ("random", "imagenet")
REBUILT = " rebuilt from its saved config"  # the end of every key report's "what"


logger = get_logger("eval")


class CheckpointNotFound(FileNotFoundError):
    pass


class BadCheckpoint(UserError, ValueError):
    """A file given as CKPT that is not a readable checkpoint / state dict, or one damaged since it
    was written (its checksum does not match)."""


class NotApplicable(ValueError):
    """The task cannot run from these weights (zero-shot from image-only weights, the encoder-decoder
    variant without a pretrained decoder)."""


def saved_model_fields(saved: dict, source: str) -> dict:
    """A run's saved config (a checkpoint's `config` or a config.yaml) -> its `model` fields as a dict,
    with the fields the data section decides (model.config.DATA_DERIVED_FIELDS: image_size,
    max_text_length) re-derived from its saved `data` section, where a pretraining config stores them.

    Older configs also stored them in `model`; such a key is kept as saved (the value the model was built
    with; every run since the derivation stored the very value re-derived here), and a config without a
    `data` section keeps the registry's."""
    model = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(model, dict):
        raise BadCheckpoint(f"{source}: the saved config has no `model` mapping")
    data, missing = saved.get("data"), [k for k in DATA_DERIVED_FIELDS if k not in model]
    if not missing or not isinstance(data, dict):
        return dict(model)
    known = {f.name for f in dataclasses.fields(DataConfig)}
    try:
        data_cfg = config_from_dict(DataConfig, {k: v for k, v in data.items() if k in known})
    except ConfigError as exc:
        raise BadCheckpoint(f"{source}: its saved data section does not load ({exc})") from None
    derived = data_derived_fields(data_cfg)
    return {**model, **{k: derived[k] for k in missing}}


def model_config_from_saved(saved: dict, source: str) -> ModelConfig:
    """A run's saved config (possibly from an older run with fewer keys) -> the ModelConfig it was built
    with, starting from the registered config it names. encoder_weights is forced to 'none': weights
    come from the file."""
    model = saved_model_fields(saved, source)
    name = model.get("name", ModelConfig.name)
    base = config_to_dict(model_config(name)) if name in MODEL_CONFIGS else {}
    return config_from_dict(ModelConfig, {**base, **model, "encoder_weights": "none"})


@dataclass
class Pretrained:
    """Weights + architecture. `state` is the whole G2DModel state dict (pretraining checkpoints only);
    `unet_state` an smp U-Net state dict (encoder + decoder); `encoder_state` an smp-encoder one.
    Baselines have none of them (random) or only the ImageNet encoder."""

    kind: str  # checkpoint | export_unet | export_encoder | random | imagenet
    source: str  # path, or the baseline's name
    sha256: str | None
    model_cfg: ModelConfig
    state: dict[str, torch.Tensor] | None = None
    unet_state: dict[str, torch.Tensor] | None = None
    encoder_state: dict[str, torch.Tensor] | None = None
    step: int | None = None
    data_cfg: dict | None = None  # the pretraining run's saved `data` section (its eval view)
    random_text: bool = False  # random init of a pretraining run's architecture, text tower included
    keys: dict | None = None  # foreign files: {prefix, kept, dropped, dropped_examples}

    @property
    def has_decoder(self) -> bool:
        return self.unet_state is not None

    @property
    def has_text(self) -> bool:
        # Random init of a known architecture is the whole G2D model before pretraining (its text
        # tower as the pretraining run started it), so zero-shot tasks have a random-init baseline.
        return self.state is not None or (self.kind == "random" and self.random_text)

    def random_like(self) -> Pretrained:
        """The same architecture at random init, text tower included where this one has it: the
        baseline every trained checkpoint is compared with."""
        return dataclasses.replace(
            self,
            kind="random",
            source="random",
            sha256=None,
            state=None,
            unet_state=None,
            encoder_state=None,
            step=None,
            keys=None,
            random_text=self.has_text,
        )

    def describe(self) -> dict:
        out = {
            "kind": self.kind,
            "path": self.source,
            "sha256": self.sha256,
            "step": self.step,
            "encoder": self.model_cfg.encoder,
            "model_name": self.model_cfg.name,
        }
        if self.keys is not None:
            out["keys"] = self.keys
        return out

    def build_unet(self, pretrained_decoder: bool, decoder_channels: tuple[int, ...] | None = None) -> nn.Module:
        """An smp U-Net (encoder, one class) with the pretrained encoder; with `pretrained_decoder` the
        pretrained decoder + head too (then the pretraining decoder widths are used), else a fresh
        decoder with `decoder_channels` (default: the pretraining widths)."""
        cfg = self.model_cfg
        if pretrained_decoder and not self.has_decoder:
            raise NotApplicable(
                f"{self.source} ({self.kind}) has no pretrained U-Net decoder; the "
                "encoder_decoder variant needs a pretraining checkpoint, a run directory "
                f"or an exported {EXPORT_FULL}"
            )
        widths = tuple(cfg.decoder_channels) if pretrained_decoder or not decoder_channels else tuple(decoder_channels)
        unet = build_unet(cfg, widths)
        if pretrained_decoder:
            load_strict(unet, self.unet_state, self.source, f"smp U-Net ({cfg.encoder}, decoder {widths}){REBUILT}")
        else:
            self.load_encoder(unet.encoder)
        return unet

    def load_encoder(self, encoder: nn.Module) -> None:
        """Load the pretrained (or ImageNet) encoder weights into an smp encoder; random: leave it."""
        if self.kind == "random":
            return
        state = self.encoder_state
        if state is None:
            state = encoder_state_dict(self.unet_state, self.source)
        load_strict(encoder, state, self.source, f"smp {self.model_cfg.encoder} encoder{REBUILT}")

    def build_encoder(self) -> nn.Module:
        """The smp encoder alone: forward(image [B,C,H,W]) -> 6 maps at strides 1, 2, 4, 8, 16, 32."""
        return self.build_unet(pretrained_decoder=False).encoder

    def build_g2d(self, text_model: str = ""):
        """The whole G2DModel (zero-shot and grounding need text + projector + attention pool).
        `text_model` replaces the saved text-model path (a tiny BERT directory that moved)."""
        if not self.has_text:
            raise NotApplicable(
                f"{self.source} ({self.kind}) holds no text encoder, projector or attention "
                "pool; zero-shot tasks need a pretraining checkpoint (a step_*.pt file or its run "
                "directory)"
            )
        cfg = dataclasses.replace(self.model_cfg, text_model=text_model) if text_model else self.model_cfg
        model = build_model(cfg)
        if self.kind == "random":
            return model
        load_strict(model, self.state, self.source, f"G2DModel({cfg.name}, {cfg.encoder}){REBUILT}")
        return model


# ---------------------------------------------------------------------------------------------
# Finding and reading the weights


def default_checkpoint(runs_globs: tuple[str, ...] = DEFAULT_RUNS_GLOBS, base: str | Path = ".") -> Path:
    """The newest pretraining run's latest checkpoint: among the run directories matching `runs_globs`
    (relative to `base`), the one whose latest checkpoint was written last."""
    runs = {run for pattern in runs_globs for run in Path(base).glob(pattern) if run.is_dir()}
    candidates = [c for run in sorted(runs) if (c := newest_checkpoint(run))]
    if not candidates:
        raise CheckpointNotFound(
            f"no pretraining checkpoint found under {' or '.join(f'{g}/checkpoints/' for g in runs_globs)} "
            "(run `make pretrain` or "
            "`make demo` first, or pass CKPT=<checkpoint .pt | run dir | exported .pth | random | imagenet>)"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)


def _read_tensor_file(path: Path) -> object:
    """model.image.read_weights_file (tensors and plain containers only, so a file cannot run code);
    an unreadable file is a BadCheckpoint, one line naming it."""
    try:
        return read_weights_file(path)
    except UnreadableWeights as exc:
        raise BadCheckpoint(str(exc)) from exc


def _top_prefixes(keys, n: int = 8) -> list[str]:
    """The distinct 'first.second.' key prefixes, to suggest a ckpt.prefix."""
    return sorted({".".join(k.split(".")[:2]) + "." for k in keys})[:n]


def _refuse_unprefixed_lightning(path: Path, payload: object) -> None:
    """A Lightning-style file ({"state_dict": ...}) given without ckpt.prefix: say which prefix to give."""
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        raise BadCheckpoint(
            f"{path}: a Lightning-style checkpoint ('state_dict'); name the image encoder's key "
            f"prefix with ckpt.prefix=..., e.g. one of {_top_prefixes(payload['state_dict'])}"
        )


def _from_checkpoint(path: Path) -> Pretrained:
    payload = _read_tensor_file(path)
    _refuse_unprefixed_lightning(path, payload)
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise BadCheckpoint(
            f"{path}: not a pretraining checkpoint (needs 'model' and 'config' keys; "
            f"has {sorted(payload)[:20] if isinstance(payload, dict) else type(payload).__name__})"
        )
    try:
        checked = pop_and_verify_digest(payload)
    except DigestMismatch as exc:
        raise BadCheckpoint(
            f"{path} is damaged: its content no longer matches the checksum written when it was saved ({exc})"
        ) from exc
    if not checked:
        logger.warning("%s carries no checksum (written by an older version): loaded unchecked", path)
    cfg = model_config_from_saved(payload["config"], str(path))
    state = {k.removeprefix("module."): v for k, v in payload["model"].items()}
    unet = {k.removeprefix("image.unet."): v for k, v in state.items() if k.startswith("image.unet.")}
    if not unet:
        raise ArchitectureMismatch(
            f"{path}: the model state has no image.unet.* keys; first keys: {sorted(state)[:10]}"
        )
    step = payload.get("step")
    return Pretrained(
        "checkpoint",
        str(path),
        sha256_file(path),
        cfg,
        state=state,
        unet_state=unet,
        step=int(step) if step is not None else None,
        data_cfg=payload["config"].get("data"),
    )


def _from_export(path: Path, baseline: ModelConfig) -> Pretrained:
    state = _read_tensor_file(path)
    _refuse_unprefixed_lightning(path, state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadCheckpoint(
            f"{path}: expected a flat state dict of tensors (an exported encoder or U-Net, or a "
            "torchvision-layout ResNet); for a checkpoint holding the encoder under a key prefix "
            "give ckpt.prefix=..."
        )
    digest = sha256_file(path)
    try:
        verify_sha256_sidecar(path, digest)
    except DigestMismatch as exc:
        raise BadCheckpoint(f"{path} is damaged: {exc} when it was exported") from exc
    config_yaml = path.parent / "config.yaml"
    saved = {}
    if config_yaml.is_file():
        saved = _read_saved_config(config_yaml)
        cfg = model_config_from_saved(saved, str(config_yaml))
    else:
        cfg = dataclasses.replace(baseline, encoder_weights="none")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("decoder.") for k in state):
        return Pretrained("export_unet", str(path), digest, cfg, unet_state=state, data_cfg=saved.get("data"))
    return Pretrained(
        "export_encoder",
        str(path),
        digest,
        cfg,
        encoder_state=encoder_state_dict(state, str(path)),
        data_cfg=saved.get("data"),
    )


def _read_saved_config(config_yaml: Path) -> dict:
    """The run's config.yaml beside an export: yaml.safe_load (a `!!python` tag stays refused), any
    failure a BadCheckpoint naming the file (and the line, for a YAML error)."""
    try:
        saved = yaml.safe_load(config_yaml.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise BadCheckpoint(f"{config_yaml}{where}: not a readable run config ({problem})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise BadCheckpoint(f"{config_yaml}: not a readable run config ({exc})") from exc
    if not isinstance(saved, dict):
        raise BadCheckpoint(f"{config_yaml}: not a run config (its top level is a {type(saved).__name__})")
    return saved


def _from_prefixed(path: Path, prefix: str, baseline: ModelConfig) -> Pretrained:
    """Another model's checkpoint: the tensors under `prefix` (in payload["state_dict"] when there is
    one, Lightning's layout; else in payload["model"]; else the payload itself), prefix stripped."""
    payload = _read_tensor_file(path)
    if not isinstance(payload, dict):
        raise BadCheckpoint(f"{path}: expected a dict of tensors, got {type(payload).__name__}")
    for key in ("state_dict", "model"):
        if isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    tensors = {k: v for k, v in payload.items() if isinstance(v, torch.Tensor)}
    kept = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    if not kept:
        raise BadCheckpoint(
            f"{path}: no tensor key starts with ckpt.prefix={prefix!r}; its keys start with {_top_prefixes(tensors)}"
        )
    dropped = sorted(k for k in payload if not k.startswith(prefix))
    keys = {"prefix": prefix, "kept": len(kept), "dropped": len(dropped), "dropped_examples": dropped[:5]}
    cfg = dataclasses.replace(baseline, encoder_weights="none")
    if any(k.startswith("decoder.") for k in kept):
        return Pretrained("foreign_unet", str(path), sha256_file(path), cfg, unet_state=kept, keys=keys)
    return Pretrained(
        "foreign_encoder",
        str(path),
        sha256_file(path),
        cfg,
        encoder_state=encoder_state_dict(kept, f"{path} (ckpt.prefix={prefix!r})"),
        keys=keys,
    )


def _imagenet(cfg: ModelConfig, weights: str) -> Pretrained:
    """ImageNet encoder weights, loaded once here so that an offline machine fails before any data is read."""
    if weights != "imagenet" and not Path(weights).is_file():
        raise FileNotFoundError(
            f"model.imagenet_weights={weights!r}: no such file (give 'imagenet' to download "
            "torchvision's weights, or a local torchvision/smp state dict)"
        )
    encoder = build_unet(cfg).encoder
    try:
        init_encoder(encoder, cfg.encoder, weights)
    except WeightsUnavailable as exc:  # model.image names the URL and the local-file alternative
        raise WeightsUnavailable(
            f'CKPT=imagenet: {exc} For eval, pass that file as ARGS="model.imagenet_weights=/path/to/file.pth".'
        ) from exc
    source = "imagenet" if weights == "imagenet" else weights
    return Pretrained(
        "imagenet",
        source,
        sha256_file(weights) if weights != "imagenet" else None,
        cfg,
        encoder_state=encoder.state_dict(),
    )


def resolve_weights(
    spec: str | None,
    baseline: ModelConfig,
    imagenet_weights: str = "imagenet",
    runs_base: str | Path = ".",
    prefix: str = "",
) -> Pretrained:
    """See the module docstring. `baseline` is the architecture of random/imagenet and of exports
    without a config.yaml beside them; `prefix` (ckpt.prefix) selects a foreign checkpoint's encoder."""
    if spec == "random":
        return Pretrained("random", "random", None, dataclasses.replace(baseline, encoder_weights="none"))
    if spec == "imagenet":
        return _imagenet(dataclasses.replace(baseline, encoder_weights="none"), imagenet_weights)
    # No CKPT: the newest run, read as a run directory (so a damaged newest checkpoint falls back too).
    path = Path(spec) if spec else default_checkpoint(base=runs_base).parent.parent
    if path.is_dir():
        return _from_run_dir(path, baseline)
    if not path.is_file():
        raise CheckpointNotFound(
            f"checkpoint {spec!r} not found (expected a .pt checkpoint, a run "
            f"directory, an exported .pth, or one of {list(BASELINES)})"
        )
    if prefix:
        return _from_prefixed(path, prefix, baseline)
    if path.suffix == ".pt" or CKPT_RE.match(path.name):
        return _from_checkpoint(path)
    return _from_export(path, baseline)


def _from_run_dir(run: Path, baseline: ModelConfig) -> Pretrained:
    """A run directory's newest checkpoint that reads and matches its checksum (a damaged or truncated
    newer one is skipped with a warning, as `train.resume=auto` does), else its exported U-Net."""
    checkpoints = list_checkpoints(run / CHECKPOINT_DIR)
    for ckpt in reversed(checkpoints):
        try:
            return _from_checkpoint(ckpt)
        except BadCheckpoint as exc:
            logger.warning("skipping %s", exc)
    if (run / EXPORT_FULL).is_file():
        return _from_export(run / EXPORT_FULL, baseline)
    if checkpoints:
        raise BadCheckpoint(f"{run}: none of its {len(checkpoints)} checkpoint(s) is readable (see the warnings above)")
    raise CheckpointNotFound(f"{run}: a directory without checkpoints/step_*.pt or {EXPORT_FULL}")


def check_image_architecture(pre: Pretrained) -> None:
    """Fail early, before any data is read, when the image weights do not fit the saved architecture.
    The reference modules are built on the meta device: shapes only, no memory, no initialisation."""
    cfg = pre.model_cfg
    with torch.device("meta"):
        if pre.state is not None:
            own = ImageEncoderDecoder(cfg).state_dict()
            state = {k.removeprefix("image."): v for k, v in pre.state.items() if k.startswith("image.")}
            what = f"image encoder-decoder ({cfg.encoder}, decoder {tuple(cfg.decoder_channels)}){REBUILT}"
        elif pre.unet_state is not None or pre.encoder_state is not None:
            unet = build_unet(cfg)
            full = pre.unet_state is not None
            own = unet.state_dict() if full else unet.encoder.state_dict()
            state = pre.unet_state if full else pre.encoder_state
            what = (f"smp U-Net ({cfg.encoder})" if full else f"smp {cfg.encoder} encoder") + REBUILT
        else:
            return
    check_state_fits(own, state, pre.source, what)
