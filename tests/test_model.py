"""G2D model: config loading, every registered config trains a step on CPU (with a tiny local
BERT in place of the unreachable hub model), the layer-by-layer text path equals BertModel, the
frozen prefix runs without autograd, encoder init from local files, and exported state dicts
load strictly into plain smp U-Nets."""

import urllib.error

import pytest
import segmentation_models_pytorch as smp
import torch
import torchvision
from torch import nn

from common.config import ConfigError, config_from_dict
from model.config import ModelConfig
from model.export import export_unet_state_dicts, load_encoder_into_unet
from model.g2d import G2DModel, G2DOutput
from model.image import AttentionPool2d, ImageEncoderDecoder
from model.registry import MODEL_CONFIGS, build_model, model_config
from model.text import MaskedBatchNorm1d, TextEncoder, build_tiny_text_model, load_bert

REPORTS = [
    "No acute cardiopulmonary process.",
    "Small left pleural effusion with adjacent atelectasis. Heart size is normal.",
    "Lungs are clear. No pneumothorax. Stable cardiomediastinal silhouette.",
    "Mild pulmonary edema and bilateral effusions, right greater than left.",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return str(build_tiny_text_model(tmp_path_factory.mktemp("tiny_bert"), REPORTS * 5, hidden=32, layers=2, heads=2))


@pytest.fixture(scope="module")
def batch(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    enc = tok(REPORTS[:2], padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def tiny_cfg(tiny_bert: str, **overrides) -> ModelConfig:
    return model_config("g2d_tiny", text_model=tiny_bert, **overrides)


def test_config_loads_strictly_from_dict():
    cfg = config_from_dict(
        ModelConfig,
        {"encoder": "resnet18", "decoder_channels": [32, 16, 8, 8, 4], "pseudo_mask_mode": "code", "temperature": 1},
    )
    assert cfg.decoder_channels == (32, 16, 8, 8, 4) and cfg.temperature == 1.0
    assert cfg.text_freeze_layers == 9 and cfg.attn_pool_heads == 4 and cfg.proj_dim == 128
    with pytest.raises(ConfigError, match="pseudo_mask_mode"):
        config_from_dict(ModelConfig, {"pseudo_mask_mode": "median"})
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict(ModelConfig, {"heads": 3})
    assert model_config("g2d_tiny", pa_weight=0.5).pa_weight == 0.5
    with pytest.raises(TypeError, match="unknown ModelConfig field"):
        model_config("g2d_tiny", nope=1)


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_every_registered_config_runs_forward_and_backward(name, tiny_bert, batch):
    torch.manual_seed(0)
    cfg = model_config(name, text_model=tiny_bert, text_freeze_layers=1)  # the hub is unreachable here
    model = build_model(cfg).train()
    size = 64 if cfg.image_size > 128 else 128
    image = torch.randn(2, cfg.channels, size, size).contiguous(memory_format=torch.channels_last)
    ids, mask = batch
    out = model(image, ids, mask, step=cfg.pa_warmup_steps)
    assert isinstance(out, G2DOutput)
    h = size // 32
    assert out.image_emb.shape == out.text_emb.shape == (2, 128)
    assert out.attention.shape == (2, cfg.attn_pool_heads, h, h)
    assert out.pseudo_mask.shape == out.seg_logits.shape == (2, 1, size, size)
    assert torch.isfinite(out.loss) and out.loss.dim() == 0
    assert torch.allclose(out.loss, out.vla_loss + cfg.pa_weight * out.pa_loss)
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"trainable parameters without gradient (DDP would fail): {no_grad}"
    assert all(p.grad is None for p in model.text.bert.encoder.layer[0].parameters())  # frozen layer
    assert model.image.unet.segmentation_head[0].weight.grad.abs().sum() > 0


def test_pa_loss_enters_only_after_warmup(tiny_bert, batch):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(tiny_bert, pa_warmup_steps=5, pa_weight=2.0)).eval()  # eval: deterministic BN
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(image, *batch, step=4)
        after = model(image, *batch, step=5)
    assert torch.equal(before.loss, before.vla_loss)
    assert before.pa_loss > 0  # still computed for logging
    assert torch.allclose(after.loss, after.vla_loss + 2.0 * after.pa_loss)


def test_encode_image_and_text(tiny_bert, batch):
    model = build_model(tiny_cfg(tiny_bert)).eval()
    with torch.no_grad():
        glob, dense, attention = model.encode_image(torch.randn(2, 3, 128, 96))  # non-square, non-training size
        text = model.encode_text(*batch)
    assert glob.shape == (2, 128) and dense.shape == (2, 128, 4, 3) and attention.shape == (2, 4, 4, 3)
    assert torch.allclose(glob.norm(dim=-1), torch.ones(2)) and torch.allclose(text.norm(dim=-1), torch.ones(2))
    # Softmax over CLS + pixels, CLS entry dropped: pixel weights sum to just under 1 per head.
    total = attention.sum(dim=(2, 3))
    assert (total < 1).all() and (total > 0.5).all()


def test_value_map_is_what_the_attention_pool_averages():
    """With one head the pooled embedding is exactly the attention-weighted mean of value_map's
    per-position vectors plus the CLS token's share: the map grounding compares with the prompt
    is in the global embedding's space."""
    torch.manual_seed(0)
    pool = AttentionPool2d((4, 3), 16, 1).eval()
    x = torch.randn(2, 16, 4, 3)
    with torch.no_grad():
        pooled, attention = pool(x)  # [2,16], [2,1,4,3]
        values = pool.value_map(x)  # [2,16,4,3]
        # the CLS token: the spatial mean plus its own positional entry
        cls_value = pool.token_values(x.mean(dim=(2, 3)) + pool.positional_embedding[0])  # [2,16]
    weights = attention[:, 0]  # [2,4,3]
    expected = (values * weights[:, None]).sum(dim=(2, 3)) + (1 - weights.sum(dim=(1, 2)))[:, None] * cls_value
    assert torch.allclose(pooled, expected, atol=1e-5)
    assert values.shape == x.shape and not torch.allclose(values, x)


def test_attention_pool_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="must divide"):
        AttentionPool2d((8, 8), 128, 3)  # the paper's 3 heads are impossible at 128-d


def test_layerwise_text_path_equals_bert_forward(tiny_bert, batch):
    from transformers import AutoModel

    ids, mask = batch
    assert (mask == 0).any()  # padding present, so the mask matters
    encoder = TextEncoder(ModelConfig(text_model=tiny_bert, text_freeze_layers=1)).eval()
    eager = AutoModel.from_pretrained(tiny_bert, add_pooling_layer=False, attn_implementation="eager").eval()
    with torch.no_grad():
        mine = encoder.hidden_states(ids, mask)
        ref_sdpa = encoder.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        ref_eager = eager(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(mine[real], ref_sdpa[real], atol=1e-5)
    assert torch.allclose(mine[real], ref_eager[real], atol=1e-5)


def test_frozen_prefix_runs_without_autograd(tiny_bert, batch):
    ids, mask = batch

    def layer_outputs_require_grad(cfg):
        encoder = TextEncoder(cfg).train()
        seen = []
        hooks = [
            layer.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
            for layer in encoder.bert.encoder.layer
        ]
        encoder(ids, mask).sum().backward()
        for hook in hooks:
            hook.remove()
        return encoder, seen

    fast, seen = layer_outputs_require_grad(
        ModelConfig(text_model=tiny_bert, text_freeze_layers=1, text_freeze_embeddings=True)
    )
    assert seen == [False, True]  # layer 0 (and embeddings) ran under no_grad
    assert all(p.grad is None for p in fast.bert.embeddings.parameters())
    assert fast.bert.encoder.layer[1].attention.self.query.weight.grad is not None
    code, seen = layer_outputs_require_grad(ModelConfig(text_model=tiny_bert, text_freeze_layers=1))
    assert seen == [True, True]  # trainable embeddings need the graph through layer 0
    assert code.bert.embeddings.word_embeddings.weight.grad is not None
    assert all(p.grad is None for p in code.bert.encoder.layer[0].parameters())


def test_masked_batchnorm_uses_real_tokens_only():
    torch.manual_seed(0)
    x = torch.randn(3, 8, 10)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 7:] = 0
    x[mask[:, None, :].expand_as(x) == 0] = 100.0  # padding values that must not leak in
    bn = MaskedBatchNorm1d(8).train()
    out = bn(x, mask)
    real = x.permute(0, 2, 1)[mask.bool()]  # [N_real, 8]
    expected = (real - real.mean(0)) / torch.sqrt(real.var(0, unbiased=False) + 1e-5)
    assert torch.allclose(out.permute(0, 2, 1)[mask.bool()], expected, atol=1e-5)
    assert torch.allclose(bn.running_mean, 0.1 * real.mean(0), atol=1e-5)
    # mask=None is exactly nn.BatchNorm1d(affine=False), and the state dicts are interchangeable.
    ref = nn.BatchNorm1d(8, affine=False).train()
    plain = MaskedBatchNorm1d(8).train()
    assert torch.allclose(plain(x), ref(x), atol=1e-6)
    ref.load_state_dict(plain.state_dict())


def test_hub_name_fails_with_a_clear_message(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    with pytest.raises(RuntimeError, match="local directory"):
        load_bert("emilyalsentzer/Bio_ClinicalBERT")


def test_tiny_bert_directory_loads_with_auto_classes(tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    ids = tok("Small LEFT effusion.")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.decode(ids[1:-1]) == "small left effusion."
    bert = AutoModel.from_pretrained(tiny_bert, add_pooling_layer=False)
    assert bert.config.hidden_size == 32 and len(bert.encoder.layer) == 2


def _bert_checkpoint(path, cls_name: str = "BertModel", **config):
    """A tiny BERT-family checkpoint written by save_pretrained (class `cls_name`) -> its directory."""
    import transformers

    sizes = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    cfg = transformers.BertConfig(**{**sizes, "intermediate_size": 64, **config})
    torch.manual_seed(0)
    getattr(transformers, cls_name)(cfg).save_pretrained(path)
    return path


def _edit_config(path, **changes):
    import json

    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


def test_load_bert_is_quiet_about_unused_heads_and_strict_about_missing_weights(tmp_path, caplog, capfd):
    from model.text import TextModelError

    # A BertForPreTraining checkpoint (Bio_ClinicalBERT's kind): pooler and pretraining heads are not
    # loaded on purpose, so transformers' LOAD REPORT table and progress bar are held back.
    bert = load_bert(str(_bert_checkpoint(tmp_path / "pretraining", "BertForPreTraining")))
    assert len(bert.encoder.layer) == 2
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "Loading weights" not in out + err
    assert not [r for r in caplog.records if r.levelno >= 30]
    # Fewer layers in the checkpoint than in its config: the model's weights would start random.
    short = _bert_checkpoint(tmp_path / "short")
    _edit_config(short, num_hidden_layers=3)
    with pytest.raises(TextModelError, match=r"lacks \d+ of the model's weights \(encoder\.layer\.2\."):
        load_bert(str(short))
    # More: the extra weights are ignored with one warning line naming them.
    long = _bert_checkpoint(tmp_path / "long", num_hidden_layers=3)
    _edit_config(long, num_hidden_layers=2)
    caplog.clear()
    assert len(load_bert(str(long)).encoder.layer) == 2
    warned = [r.getMessage() for r in caplog.records if r.levelno >= 30]
    assert len(warned) == 1 and "checkpoint weights have no place" in warned[0] and "encoder.layer.2." in warned[0]
    # A shape mismatch is a one-line user error, not a traceback.
    wide = _bert_checkpoint(tmp_path / "wide")
    _edit_config(wide, intermediate_size=48)
    with pytest.raises(TextModelError, match="could not load the text model") as failed:
        load_bert(str(wide))
    message = str(failed.value)
    assert "intermediate" in message and "\x1b" not in message and "Offline" not in message
    assert "\n" not in message
    # transformers' own switches are as they were.
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()


def _image_cfg(**overrides) -> ModelConfig:
    return ModelConfig(encoder="resnet18", decoder_channels=(32, 16, 8, 8, 4), image_size=64, **overrides)


def test_encoder_init_from_local_state_dicts(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()  # torchvision layout (with fc)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    img = ImageEncoderDecoder(_image_cfg(encoder_weights=str(tmp_path / "tv.pth")))
    assert torch.equal(img.unet.encoder.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)

    torch.save(img.unet.encoder.state_dict(), tmp_path / "smp.pth")  # smp-encoder layout
    again = ImageEncoderDecoder(_image_cfg(encoder_weights=str(tmp_path / "smp.pth")))
    assert torch.equal(again.unet.encoder.conv1.weight, tv.conv1.weight)

    grey = ImageEncoderDecoder(_image_cfg(encoder_weights=str(tmp_path / "tv.pth"), channels=1))
    assert torch.allclose(grey.unet.encoder.conv1.weight, tv.conv1.weight.sum(dim=1, keepdim=True))

    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ValueError, match=r"unexpected \['layer1.2"):
        ImageEncoderDecoder(_image_cfg(encoder_weights=str(tmp_path / "r34.pth")))
    with pytest.raises(FileNotFoundError, match="encoder_weights"):
        ImageEncoderDecoder(_image_cfg(encoder_weights=str(tmp_path / "missing.pth")))


def test_imagenet_weights_offline_error_suggests_a_local_path(monkeypatch):
    from torchvision.models._api import WeightsEnum

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="offline.*encoder_weights=/path"):
        ImageEncoderDecoder(_image_cfg(encoder_weights="imagenet"))


def test_exported_state_dicts_load_strictly_into_plain_smp_unets(tiny_bert):
    model = G2DModel(model_config("g2d_resnet50", text_model=tiny_bert, text_freeze_layers=1))
    encoder_sd, encoder_decoder_sd = export_unet_state_dicts(model)
    encoder_only = smp.Unet("resnet50", encoder_weights=None)
    encoder_only.encoder.load_state_dict(encoder_sd, strict=True)
    full = smp.Unet("resnet50", encoder_weights=None, classes=1)
    full.load_state_dict(encoder_decoder_sd, strict=True)
    ref = model.image.unet.decoder.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in full.decoder.state_dict().items())

    fresh = smp.Unet("resnet50", encoder_weights=None, classes=1)
    load_encoder_into_unet(encoder_decoder_sd, fresh)  # whole-U-Net layout accepted
    assert torch.equal(fresh.encoder.layer4[2].conv3.weight, model.image.unet.encoder.layer4[2].conv3.weight)
    with pytest.raises(ValueError, match="missing"):
        load_encoder_into_unet(encoder_sd, smp.Unet("resnet18", encoder_weights=None))


def test_code_mode_config_pads_to_256_so_text_embeddings_equal_the_official_ones(tiny_bert):
    """G2D's code pads every report to 256 tokens and its projector BN normalises over all positions;
    configs/pretrain/g2d_code.yaml must feed exactly that, or the BN statistics follow the batch."""
    from transformers import AutoTokenizer

    from pipeline.text import BatchTokenizer
    from train.config import load_pretrain_config

    cfg = load_pretrain_config(
        "configs/pretrain/g2d_code.yaml",
        [f"model.text_model={tiny_bert}", "model.encoder_weights=none", "model.text_freeze_layers=1"],
    )
    assert cfg.model.text_bn_real_tokens is False
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    ids, mask, _ = BatchTokenizer(tok, cfg.data.max_text_length, cfg.data.text_pad_multiple, cfg.data.text_padding)(
        REPORTS
    )
    assert ids.shape == (4, 256)
    torch.manual_seed(0)
    encoder = TextEncoder(cfg.resolved_model).train()
    encoder.bert.eval()  # dropout off; the projector BN stays in training mode
    # The official computation: BertModel over 256-padded tokens, then Conv1d -> BatchNorm1d over all positions.
    ref = tok(REPORTS, padding="max_length", truncation=True, max_length=256, return_tensors="pt")
    bn = nn.BatchNorm1d(cfg.model.proj_dim, affine=False).train()
    with torch.no_grad():
        hidden = encoder.bert(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state
        official = encoder.proj_out(torch.relu(bn(encoder.proj_in(hidden.transpose(1, 2)))))[:, :, 0]
        ours = encoder(ids, mask)
        short = BatchTokenizer(tok, 256, 8, "longest")(REPORTS)  # what the config used to feed
        per_batch = encoder(short[0], short[1])
    assert torch.allclose(ours, official, atol=1e-4)
    assert not torch.allclose(per_batch, official, atol=1e-2)  # the pad length does change the embedding


def test_resume_check_treats_missing_fields_as_defaults_and_ignores_runtime_only_ones():
    # A checkpoint written before a field existed (or with another attention kernel) still matches;
    # a field that changes what the model computes does not.
    from common.config import config_to_dict
    from model.config import ModelConfig, changed_fields

    current = ModelConfig()
    saved = config_to_dict(current)
    saved.pop("text_attn_implementation")
    saved.pop("pa_weight")
    assert changed_fields(saved, current) == []
    assert changed_fields({**saved, "text_attn_implementation": "eager"}, current) == []
    assert changed_fields({**saved, "pa_weight": 0.0, "proj_dim": 64}, current) == ["pa_weight", "proj_dim"]
