from dataclasses import dataclass, field

import pytest

from common.config import ConfigError, config_from_dict, load_config, save_config


@dataclass
class Opt:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    fused: bool = True


@dataclass
class Root:
    name: str = "x"
    steps: int = 10
    opt: Opt = field(default_factory=Opt)
    mode: str | None = None


def test_yaml_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: run\nopt:\n  lr: 0.1\n")
    cfg = load_config(Root, cfg_file, ["opt.lr=2e-4", "steps=5", "opt.betas=[0.8, 0.9]", "mode=fast"])
    assert cfg.name == "run" and cfg.steps == 5 and cfg.mode == "fast"
    assert cfg.opt.lr == pytest.approx(2e-4) and cfg.opt.betas == (0.8, 0.9) and cfg.opt.fused


def test_unknown_key_and_wrong_type_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key.*lrr"):
        load_config(Root, None, ["opt.lrr=1"])
    with pytest.raises(ConfigError, match="steps: expected an int"):
        load_config(Root, None, ["steps=abc"])
    with pytest.raises(ConfigError, match="fused: expected a bool"):
        config_from_dict(Root, {"opt": {"fused": "yes"}})
    with pytest.raises(ConfigError, match="not found"):
        load_config(Root, tmp_path / "missing.yaml")


def test_file_round_trip_and_no_inheritance(tmp_path):
    (tmp_path / "child.yaml").write_text("steps: 3\nopt:\n  lr: 0.5\n  fused: false\n")
    cfg = load_config(Root, tmp_path / "child.yaml")
    assert cfg.steps == 3 and cfg.opt.lr == 0.5 and cfg.opt.fused is False
    # No config inheritance: `defaults:` is an unknown key like any other.
    (tmp_path / "inherits.yaml").write_text("defaults: [child.yaml]\n")
    with pytest.raises(ConfigError, match="defaults"):
        load_config(Root, tmp_path / "inherits.yaml")
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(Root, tmp_path / "out.yaml") == cfg


def test_yaml_problems_name_the_file(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8"):
        load_config(Root, tmp_path / "latin1.yaml")
    (tmp_path / "tab.yaml").write_text("name: x\n\tsteps: 2\n")
    with pytest.raises(ConfigError, match=r"tab.yaml: line 2, column 1"):
        load_config(Root, tmp_path / "tab.yaml")
    (tmp_path / "dup.yaml").write_text("opt:\n  lr: 0.1\n  fused: false\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 4, column 3: duplicate key 'lr'"):
        load_config(Root, tmp_path / "dup.yaml")
    with pytest.raises(ConfigError, match=r"override 'opt.betas=\[1': the value is not valid YAML"):
        load_config(Root, None, ["opt.betas=[1"])
    with pytest.raises(ConfigError, match="opt is not a section"):
        load_config(Root, None, ["opt=3", "opt.lr=1"])


def test_declared_checks_cover_literals_and_configs_built_in_code():
    """One declaration per check: a field's `checked` metadata or its `Literal` annotation, read by
    check_fields (loaded configs, G2DModel on a config built in code) and by check_field (pseudo_mask,
    which takes the values as plain arguments)."""
    import torch

    from common.config import check_fields
    from model.config import ModelConfig
    from model.g2d import G2DModel
    from model.pseudo_mask import pseudo_mask
    from train.optim import OptimConfig

    with pytest.raises(ConfigError, match=r"model\.pa_loss='x' must be one of \['paper', 'code'\]"):
        G2DModel(ModelConfig(pa_loss="x"))  # refused before any tower (or BERT) is built
    with pytest.raises(ConfigError, match=r"model\.pseudo_mask_quantile=1\.0 must be in \(0, 1\)"):
        G2DModel(ModelConfig(pseudo_mask_quantile=1.0))
    with pytest.raises(ConfigError, match=r"model\.pseudo_mask_quantile=0\.0 must be in \(0, 1\)"):
        pseudo_mask(torch.rand(1, 4, 2, 2), torch.zeros(1, 3, 64, 64), quantile=0.0)
    with pytest.raises(ConfigError, match=r"optim\.schedule='step' must be one of"):
        check_fields(OptimConfig(schedule="step"), "optim")
    with pytest.raises(ConfigError, match=r"optim\.betas=\(0\.9, 1\.0\) must be two values in \[0, 1\)"):
        check_fields(OptimConfig(betas=(0.9, 1.0)), "optim")
    check_fields(OptimConfig(), "optim")
    check_fields(ModelConfig(), "model")


def test_layered_overrides_let_a_later_layer_replace_a_key():
    from common.config import layered_overrides

    merged = layered_overrides(["train.epochs=5", "train.lr=1e-3"], ["train.epochs=15"], ["seed=43"])
    assert merged == ["train.lr=1e-3", "train.epochs=15", "seed=43"]
    assert layered_overrides([], ["a.b=1"]) == ["a.b=1"]
    with pytest.raises(ConfigError, match="train.epochs is given twice"):
        layered_overrides(["train.epochs=5", "train.epochs=6"])
