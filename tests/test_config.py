"""Config loading: every mistake is one line naming the source and the key."""
import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from cvtkit.config_loader import ConfigError, add_config_args, load_config, require, save_config, to_dict
from cvtkit.models import ModelConfig, build_model


@dataclass
class OptimSection:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.05

    def __post_init__(self):
        require(self.lr > 0, "lr", "a positive number", self.lr)


@dataclass
class DataSection:
    shards: list[str] = field(default_factory=list)
    batch_size: int = 32
    workers: int | None = None
    shuffle: bool = True


@dataclass
class RunSection:
    model: ModelConfig
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    seed: int = 0


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path, text, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(RunSection, write(tmp_path, text), overrides)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_valid_config_with_overrides(tmp_path):
    path = write(tmp_path, "model:\n  name: cvt_21\noptim:\n  lr: 2e-3\n  betas: [0.9, 0.95]\n"
                           "data:\n  shards: [a.tar, b.tar]\n")
    cfg = load_config(RunSection, path, ["optim.lr=1e-3", "model.name=cvt_13", "data.workers=4",
                                         "optim.name=sgd"])
    assert cfg.model.name == "cvt_13" and cfg.optim.lr == 1e-3 and cfg.optim.name == "sgd"
    assert cfg.optim.betas == (0.9, 0.95) and cfg.data.shards == ["a.tar", "b.tar"]
    assert cfg.data.workers == 4 and cfg.data.batch_size == 32 and cfg.seed == 0


def test_unknown_key_names_file_key_and_allowed(tmp_path):
    msg = error_of(tmp_path, "model:\n  name: cvt_13\noptim:\n  lrr: 0.1\n")
    assert msg.startswith(f"{tmp_path / 'run.yaml'}: optim.lrr: unknown key")
    assert "allowed: name, lr, betas, weight_decay" in msg


def test_wrong_types(tmp_path):
    assert "data.batch_size: expected int, got 'big'" in error_of(
        tmp_path, "model: {name: cvt_13}\ndata: {batch_size: big}\n")
    assert "data.shuffle: expected bool, got 1" in error_of(
        tmp_path, "model: {name: cvt_13}\ndata: {shuffle: 1}\n")
    assert "optim.betas: expected 2 items" in error_of(
        tmp_path, "model: {name: cvt_13}\noptim: {betas: [0.9]}\n")
    assert "data.shards[1]: expected str, got 3" in error_of(
        tmp_path, "model: {name: cvt_13}\ndata: {shards: [a, 3]}\n")
    assert "optim: expected a mapping" in error_of(tmp_path, "model: {name: cvt_13}\noptim: 3\n")
    assert "optim.name: expected one of 'adamw', 'sgd', got 'adam'" in error_of(
        tmp_path, "model: {name: cvt_13}\noptim: {name: adam}\n")


def test_impossible_values_and_missing_keys(tmp_path):
    assert "optim.lr: expected a positive number, got -1.0" in error_of(
        tmp_path, "model: {name: cvt_13}\noptim: {lr: -1}\n")
    msg = error_of(tmp_path, "model: {name: cvt_99}\n")
    assert "model.name: expected one of" in msg and "cvt_w24" in msg and "'cvt_99'" in msg
    assert "model: missing required key" in error_of(tmp_path, "seed: 1\n")
    assert "model.drop_path_rate: expected a value in [0, 1)" in error_of(
        tmp_path, "model: {name: cvt_13, drop_path_rate: 1.5}\n")
    assert "model.img_size: cvt_13 runs at any input size" in error_of(
        tmp_path, "model: {name: cvt_13, img_size: 384}\n")


def test_override_errors_name_set(tmp_path):
    msg = error_of(tmp_path, "model: {name: cvt_13}\n", ["optim.lrr=1"])
    assert msg.startswith("--set: optim.lrr: unknown key")
    assert error_of(tmp_path, "model: {name: cvt_13}\n", ["seed=abc"]).startswith(
        "--set: seed: expected int")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(RunSection, write(tmp_path, "model: {name: cvt_13}\n"), ["optim.lr"])


def test_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(RunSection, tmp_path / "nope.yaml")
    assert "not valid YAML at line 2" in error_of(tmp_path, "model:\n  name: cvt_13: x\n")
    assert "expected a mapping at the top level" in error_of(tmp_path, "- a\n- b\n")


def test_saved_config_reads_back_equal(tmp_path):
    cfg = load_config(RunSection, write(tmp_path, "model: {name: ceit_tiny, img_size: 384}\n"),
                      ["data.shards=[x.tar]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(RunSection, tmp_path / "resolved.yaml")
    assert again == cfg and to_dict(again)["optim"]["betas"] == [0.9, 0.999]


def test_cli_arguments():
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    args = parser.parse_args(["--config", "a.yaml", "--set", "optim.lr=1e-3", "model.name=cvt_13",
                              "--set", "seed=3"])
    assert args.config == "a.yaml"
    assert args.overrides == ["optim.lr=1e-3", "model.name=cvt_13", "seed=3"]


def test_model_section_builds_the_model():
    cfg = ModelConfig(name="cvt_13", num_classes=5, drop_path_rate=0.2, attn_impl="reference",
                      grad_checkpointing=True, options={"dims": [16, 32, 64], "heads": [1, 2, 2],
                                                         "depths": [1, 1, 2]})
    model = build_model(cfg)
    assert model.num_classes == 5 and model.stage2.grad_checkpointing
    assert model.stage2.blocks[0].attn.attn_impl == "reference"
    assert model.stage2.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    ceit = build_model(ModelConfig(name="ceit_tiny", img_size=64, options={"depth": 2, "embed_dim": 32,
                                                                            "num_heads": 2}))
    assert ceit.pos_embed.shape == (1, 17, 32) and ceit.default_res == 64
