"""Tests for engine.config: loading, coercion, error messages, saving, derive()."""

# Postponed annotations on purpose: the loader must resolve them via get_type_hints.
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from engine.optim import OptimConfig
from engine.config import (
    BatchConfig,
    ConfigError,
    Derived,
    RunConfig,
    apply_overrides,
    derive,
    from_dict,
    load_config,
    parse_cli,
    save_config,
    to_dict,
)


# --------------------------------------------------------------------------
# Test-local configs
# --------------------------------------------------------------------------


@dataclass
class ToyModel:
    # transformer depth
    depth: int = 12
    # stochastic depth rate
    drop_path: float = 0.1
    # prepend a class token
    use_cls: bool = False
    # how tokens are pooled for the head
    pool: Literal["mean", "cls"] = "mean"
    # (height, width)
    img_size: tuple[int, int] = (224, 224)
    # per-stage mlp ratios
    mlp_ratios: list[float] = field(default_factory=lambda: [4.0])
    # None = embed_dim // num_heads
    head_dim: Optional[int] = None
    # newer union syntax must work too
    dropout: float | None = None

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")


@dataclass
class ToyRoot:
    run: RunConfig = field(default_factory=RunConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    model: ToyModel = field(default_factory=ToyModel)


@dataclass
class NeedsPath:
    # no default: must be given
    path: str
    extra: int = 0


def write_yaml(tmp_path, text: str, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load_error(tmp_path, yaml_text: str = "", overrides=()) -> str:
    recipe = write_yaml(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(ToyRoot, recipe, list(overrides))
    return str(info.value)


def assert_plain(value) -> None:
    """Only types yaml.safe_dump writes without python tags."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str)
            assert_plain(v)
    elif isinstance(value, list):
        for v in value:
            assert_plain(v)
    else:
        assert value is None or type(value) in (str, int, float, bool), repr(value)


# --------------------------------------------------------------------------
# Loading and precedence
# --------------------------------------------------------------------------


def test_defaults_load_without_yaml():
    assert load_config(ToyRoot, None) == ToyRoot()


def test_empty_yaml_file_means_defaults(tmp_path):
    assert load_config(ToyRoot, write_yaml(tmp_path, "")) == ToyRoot()


def test_yaml_diff_then_cli_override_precedence(tmp_path):
    recipe = write_yaml(
        tmp_path,
        "optim:\n  epochs: 100\n  blr: 1.0e-3\nbatch:\n  micro_batch: 4\n",
    )
    cfg = load_config(ToyRoot, recipe, ["optim.epochs=50", "model.depth=24"])
    assert cfg.optim.epochs == 50  # CLI beats yaml
    assert cfg.optim.blr == 1e-3  # yaml beats default
    assert cfg.batch.micro_batch == 4  # yaml beats default
    assert cfg.model.depth == 24  # CLI beats default
    assert cfg.optim.warmup_epochs == OptimConfig().warmup_epochs  # untouched default
    assert cfg.run == RunConfig()


def test_later_cli_override_of_same_key_wins():
    cfg = load_config(ToyRoot, None, ["optim.epochs=100", "optim.epochs=200"])
    assert cfg.optim.epochs == 200


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    recipe = write_yaml(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level of .*recipe.yaml must be a mapping"):
        load_config(ToyRoot, recipe)


# --------------------------------------------------------------------------
# Coercion
# --------------------------------------------------------------------------


def test_scientific_notation_string_becomes_float_from_yaml_and_cli(tmp_path):
    assert yaml.safe_load("x: 1e-3")["x"] == "1e-3"  # the PyYAML quirk we work around
    from_yaml = load_config(ToyRoot, write_yaml(tmp_path, "optim:\n  blr: 1e-3\n"))
    from_cli = load_config(ToyRoot, None, ["optim.min_lr=1e-7", "optim.lr=2e-4"])
    assert from_yaml.optim.blr == 1e-3 and type(from_yaml.optim.blr) is float
    assert from_cli.optim.min_lr == 1e-7 and type(from_cli.optim.min_lr) is float
    assert from_cli.optim.lr == 2e-4 and type(from_cli.optim.lr) is float  # Optional[float]


def test_float_field_accepts_int_and_rejects_text():
    cfg = load_config(ToyRoot, None, ["optim.weight_decay=0"])
    assert cfg.optim.weight_decay == 0.0 and type(cfg.optim.weight_decay) is float
    with pytest.raises(ConfigError) as info:
        load_config(ToyRoot, None, ["optim.weight_decay=lots"])
    message = str(info.value)
    assert "optim.weight_decay" in message and "float" in message and "'lots'" in message


def test_int_field_accepts_numeric_string_and_rejects_fraction(tmp_path):
    cfg = load_config(ToyRoot, write_yaml(tmp_path, "batch:\n  micro_batch: '8'\n"))
    assert cfg.batch.micro_batch == 8 and type(cfg.batch.micro_batch) is int
    message = load_error(tmp_path, "batch:\n  micro_batch: 1.5\n")
    assert "batch.micro_batch" in message and "expected int" in message and "1.5" in message
    assert "recipe.yaml" in message


def test_int_field_rejects_bool():
    with pytest.raises(ConfigError, match="batch.grad_accum.*expected int.*True"):
        load_config(ToyRoot, None, ["batch.grad_accum=true"])


def test_bool_field_accepts_yaml_booleans_only():
    assert load_config(ToyRoot, None, ["model.use_cls=true"]).model.use_cls is True
    assert load_config(ToyRoot, None, ["optim.lr_scale_with_repeats=false"]).optim.lr_scale_with_repeats is False
    for bad in ("maybe", "2"):
        with pytest.raises(ConfigError) as info:
            load_config(ToyRoot, None, [f"model.use_cls={bad}"])
        message = str(info.value)
        assert "model.use_cls" in message and "expected bool" in message and bad in message


def test_literal_field_lists_allowed_values():
    assert load_config(ToyRoot, None, ["model.pool=cls"]).model.pool == "cls"
    with pytest.raises(ConfigError) as info:
        load_config(ToyRoot, None, ["model.pool=max"])
    message = str(info.value)
    assert "model.pool" in message and "'mean'" in message and "'cls'" in message and "'max'" in message


def test_tuple_and_list_fields(tmp_path):
    cfg = load_config(ToyRoot, None, ["optim.betas=[0.9, 0.999]", "model.mlp_ratios=[4, 2.5]"])
    assert cfg.optim.betas == (0.9, 0.999) and isinstance(cfg.optim.betas, tuple)
    assert cfg.model.mlp_ratios == [4.0, 2.5] and all(type(r) is float for r in cfg.model.mlp_ratios)
    cfg = load_config(ToyRoot, write_yaml(tmp_path, "model:\n  img_size: [160, '192']\n"))
    assert cfg.model.img_size == (160, 192)


def test_tuple_errors_name_key_length_and_item():
    with pytest.raises(ConfigError, match=r"optim\.betas.*exactly 2 items, got 3"):
        load_config(ToyRoot, None, ["optim.betas=[0.9, 0.95, 0.99]"])
    with pytest.raises(ConfigError, match=r"model\.img_size\[1\].*expected int.*'wide'"):
        load_config(ToyRoot, None, ["model.img_size=[224, wide]"])
    with pytest.raises(ConfigError, match=r"optim\.betas.*yaml list"):
        load_config(ToyRoot, None, ["optim.betas=0.9,0.95"])


def test_optional_fields():
    cfg = load_config(ToyRoot, None, ["model.head_dim=64", "model.dropout=1e-1", "optim.clip_grad=null"])
    assert cfg.model.head_dim == 64
    assert cfg.model.dropout == 0.1
    assert cfg.optim.clip_grad is None
    assert load_config(ToyRoot, None, ["optim.clip_grad=3"]).optim.clip_grad == 3.0
    with pytest.raises(ConfigError) as info:
        load_config(ToyRoot, None, ["model.head_dim=abc"])
    assert "model.head_dim" in str(info.value) and "'abc'" in str(info.value)


def test_none_for_non_optional_field_is_rejected():
    with pytest.raises(ConfigError, match=r"optim\.epochs.*expected int.*None"):
        load_config(ToyRoot, None, ["optim.epochs=null"])


def test_str_field_given_number_on_cli_becomes_text():
    cfg = load_config(ToyRoot, None, ["run.name=123"])
    assert cfg.run.name == "123"


# --------------------------------------------------------------------------
# Structural errors
# --------------------------------------------------------------------------


def test_unknown_nested_key_lists_valid_keys_and_suggests(tmp_path):
    message = load_error(tmp_path, "optim:\n  lrr: 1.0e-3\n")
    assert "unknown config key 'optim.lrr'" in message
    assert "recipe.yaml" in message
    assert "did you mean 'optim.lr'" in message
    assert "valid keys under 'optim': blr, lr, min_lr" in message


def test_unknown_top_level_key_without_close_match(tmp_path):
    message = load_error(tmp_path, "zzz: 1\n")
    assert "unknown config key 'zzz'" in message
    assert "did you mean" not in message
    assert "valid keys at top level: run, batch, optim, model" in message


def test_unknown_key_from_cli_names_the_override(tmp_path):
    message = load_error(tmp_path, "optim:\n  epochs: 5\n  warmup_epochs: 1\n", ["batch.micro_bach=4"])
    assert "'batch.micro_bach'" in message
    assert "command-line override 'batch.micro_bach=4'" in message
    assert "did you mean 'batch.micro_batch'" in message


def test_section_set_to_scalar_is_an_error():
    with pytest.raises(ConfigError, match=r"'optim'.*must be a mapping of OptimConfig fields.*3"):
        load_config(ToyRoot, None, ["optim=3"])


def test_scalar_set_to_mapping_is_an_error(tmp_path):
    message = load_error(tmp_path, "optim:\n  lr:\n    peak: 1\n")
    assert "optim.lr" in message and "mapping" in message


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match="missing required config key 'data.path'"):
        from_dict(NeedsPath, {"extra": 1}, path="data")
    assert from_dict(NeedsPath, {"path": "/videos"}) == NeedsPath(path="/videos")


def test_post_init_error_is_prefixed_with_section_path(tmp_path):
    message = load_error(tmp_path, "model:\n  depth: 0\n")
    assert message.startswith("invalid config 'model'")
    assert "depth must be >= 1, got 0" in message
    message = load_error(tmp_path, "optim:\n  epochs: 10\n  warmup_epochs: 20\n")
    assert message.startswith("invalid config 'optim'") and "warmup_epochs" in message


def test_from_dict_is_recursive_and_uses_source_in_messages():
    cfg = from_dict(ToyRoot, {"model": {"pool": "cls"}, "batch": {"repeats": 2}})
    assert cfg.model.pool == "cls" and cfg.batch.repeats == 2
    with pytest.raises(ConfigError, match=r"'root\.optim\.lrr' in exp\.yaml"):
        from_dict(ToyRoot, {"optim": {"lrr": 1}}, path="root", source="exp.yaml")


# --------------------------------------------------------------------------
# apply_overrides
# --------------------------------------------------------------------------


def test_apply_overrides_sets_nested_keys_without_mutating_input():
    data = {"optim": {"epochs": 5}}
    result = apply_overrides(data, ["optim.blr=2.0e-4", "model.depth=6", "optim={warmup_epochs: 1}"])
    assert result == {"optim": {"epochs": 5, "blr": 2e-4, "warmup_epochs": 1}, "model": {"depth": 6}}
    assert data == {"optim": {"epochs": 5}}


def test_apply_overrides_requires_equals_sign():
    with pytest.raises(ConfigError, match=r"missing '='"):
        apply_overrides({}, ["optim.lr"])


def test_apply_overrides_rejects_descending_into_a_scalar():
    with pytest.raises(ConfigError, match=r"'optim' is the scalar 3"):
        apply_overrides({"optim": 3}, ["optim.lr=1"])


# --------------------------------------------------------------------------
# to_dict / save_config
# --------------------------------------------------------------------------


def custom_config() -> ToyRoot:
    return load_config(
        ToyRoot,
        None,
        [
            "run.name=123",
            "optim.betas=[0.8, 0.99]",
            "optim.lr=1e-3",
            "optim.eps=1e-12",
            "model.img_size=[160, 192]",
            "model.pool=cls",
            "model.mlp_ratios=[2, 3.5]",
        ],
    )


def test_to_dict_yaml_from_dict_round_trip():
    cfg = custom_config()
    plain = to_dict(cfg)
    assert_plain(plain)
    assert plain["optim"]["betas"] == [0.8, 0.99]  # tuples become lists
    reloaded = from_dict(ToyRoot, yaml.safe_load(yaml.safe_dump(plain)))
    assert reloaded == cfg
    assert isinstance(reloaded.model.img_size, tuple)


def test_save_config_writes_both_files_and_they_reload(tmp_path):
    cfg = custom_config()
    derived = derive(cfg.batch, cfg.optim, world_size=2, num_train_samples=1000)
    out_dir = tmp_path / "run"
    save_config(cfg, str(out_dir), derived.as_dict())
    assert sorted(os.listdir(out_dir)) == ["config.yaml", "derived.yaml"]  # no temp files left
    assert load_config(ToyRoot, str(out_dir / "config.yaml")) == cfg
    assert yaml.safe_load((out_dir / "derived.yaml").read_text()) == derived.as_dict()


def test_save_config_without_derived_and_overwrite(tmp_path):
    save_config(ToyRoot(), str(tmp_path))
    save_config(custom_config(), str(tmp_path))
    assert os.listdir(tmp_path) == ["config.yaml"]
    assert load_config(ToyRoot, str(tmp_path / "config.yaml")) == custom_config()


# --------------------------------------------------------------------------
# parse_cli
# --------------------------------------------------------------------------


def test_parse_cli_splits_config_overrides_and_flags():
    path, overrides, flags = parse_cli(
        ["--config", "recipes/pt.yaml", "optim.lr=1e-3", "--eval-only", "batch.repeats=2", "--resume=ckpt.pt"]
    )
    assert path == "recipes/pt.yaml"
    assert overrides == ["optim.lr=1e-3", "batch.repeats=2"]
    assert flags == {"eval_only": True, "resume": "ckpt.pt"}


def test_parse_cli_config_equals_form_and_no_config():
    assert parse_cli(["--config=a.yaml"]) == ("a.yaml", [], {})
    assert parse_cli(["x.y=1"]) == (None, ["x.y=1"], {})
    assert parse_cli([]) == (None, [], {})


def test_parse_cli_errors():
    with pytest.raises(ConfigError, match="usage:"):
        parse_cli(["recipe.yaml"])  # positional without '='
    with pytest.raises(ConfigError, match="--config needs a path"):
        parse_cli(["--config"])
    with pytest.raises(ConfigError, match="more than once"):
        parse_cli(["--config", "a.yaml", "--config", "b.yaml"])


# --------------------------------------------------------------------------
# derive()
# --------------------------------------------------------------------------


def test_derive_global_batch_and_scaled_lr():
    d = derive(BatchConfig(micro_batch=8, grad_accum=2), OptimConfig(blr=1.5e-4), world_size=4)
    assert d.global_batch == 64
    assert d.lr == pytest.approx(3.75e-5)
    assert d.lr_scaled is True
    assert d.min_lr == 1e-6 and d.warmup_lr == 1e-6  # absolute, not scaled
    assert d.steps_per_epoch is None and d.total_steps is None and d.token_grid is None


def test_derive_explicit_lr_wins():
    d = derive(BatchConfig(micro_batch=8, grad_accum=2), OptimConfig(lr=1e-3), world_size=4)
    assert d.lr == 1e-3 and d.lr_scaled is False


def test_derive_repeats_conventions():
    batch = BatchConfig(micro_batch=4, grad_accum=1, repeats=2)
    pretrain = derive(batch, OptimConfig(blr=1.6e-3), world_size=8)
    assert pretrain.global_batch == 32
    assert pretrain.clips_per_micro_step == 8
    assert pretrain.global_clips == 64
    assert pretrain.lr_scale_batch == 32  # videos only (MAE-ST pre-training)
    assert pretrain.lr == pytest.approx(1.6e-3 * 32 / 256)
    finetune = derive(batch, OptimConfig(blr=1.6e-3, lr_scale_with_repeats=True), world_size=8)
    assert finetune.lr_scale_batch == 64  # every clip (MAE-ST fine-tuning)
    assert finetune.lr == pytest.approx(2 * pretrain.lr)


def test_derive_schedule_lengths():
    batch = BatchConfig(micro_batch=8, grad_accum=3)
    optim = OptimConfig(epochs=10, warmup_epochs=2)
    d = derive(batch, optim, world_size=4, num_train_samples=1000)
    micro_steps = math.ceil(1000 / 32)  # 32 micro-steps per rank
    assert d.steps_per_epoch == micro_steps // 3 == 10
    assert d.total_steps == 100
    assert d.warmup_steps == 20


def test_derive_rejects_dataset_smaller_than_one_step():
    with pytest.raises(ValueError, match="no optimizer step"):
        derive(BatchConfig(micro_batch=8, grad_accum=4), OptimConfig(), world_size=2, num_train_samples=16)


def test_derive_passes_the_token_grid_through():
    d = derive(BatchConfig(), OptimConfig(), world_size=1, token_grid=(8, 14, 14))
    assert d.token_grid == (8, 14, 14)
    assert d.tokens_per_clip == 8 * 14 * 14

def test_geometry_errors_come_from_the_model_config_with_its_path():
    from models.vit import ClassifierConfig

    with pytest.raises(ConfigError, match=r"encoder.*num_frames 15 must be a multiple of tubelet_size 2"):
        load_config(ClassifierConfig, None, ["encoder.num_frames=15"])


def test_derive_rejects_bad_world_size():
    with pytest.raises(ValueError, match="world_size"):
        derive(BatchConfig(), OptimConfig(), 0)


def test_derived_is_frozen_and_as_dict_is_plain():
    d = derive(BatchConfig(), OptimConfig(), 2, num_train_samples=100, token_grid=(8, 14, 14))
    with pytest.raises(AttributeError):
        d.lr = 1.0  # type: ignore[misc]
    plain = d.as_dict()
    assert_plain(plain)
    assert plain["token_grid"] == [8, 14, 14]
    assert isinstance(d, Derived)


def test_config_from_cli_exits_with_the_message_not_a_traceback(capsys):
    from engine.config import config_from_cli

    cfg, flags = config_from_cli(OptimConfig, ["blr=1e-3", "--dry-run"])
    assert cfg.blr == 1e-3 and flags == {"dry_run": True}
    with pytest.raises(SystemExit) as exit_info:
        config_from_cli(OptimConfig, ["blrr=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown config key 'blrr'" in err and "did you mean 'blr'" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        config_from_cli(OptimConfig, ["--help"])
    assert exit_info.value.code == 0
    assert "blr, lr, min_lr" in capsys.readouterr().out


def test_repeated_sampling_counts_effective_epochs():
    d = derive(BatchConfig(micro_batch=2, repeats=4), OptimConfig(epochs=100, warmup_epochs=5), 8,
               num_train_samples=1600)
    assert d.effective_epochs == 400
    assert d.steps_per_epoch == 100  # one step per 16 videos: repeats add clips, not steps
    assert d.global_clips == 64
