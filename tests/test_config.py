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


def test_defaults_inheritance_and_round_trip(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 3\nopt:\n  lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("defaults: [base.yaml]\nopt:\n  fused: false\n")
    cfg = load_config(Root, tmp_path / "child.yaml")
    assert cfg.steps == 3 and cfg.opt.lr == 0.5 and cfg.opt.fused is False
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(Root, tmp_path / "out.yaml") == cfg
