"""Tests for engine.config and the entry points' command line (engine.launch): loading, typing, error messages,
saving, derive(), flags and --help."""

# Postponed annotations on purpose: the loader must resolve them via get_type_hints.
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from engine.config import BatchConfig, ConfigError, Derived, derive, load_config, save_config, to_dict
from engine.loop import RunConfig
from engine.optim import OptimConfig

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
    recipe = write_yaml(tmp_path, "optim:\n  epochs: 100\n  blr: 1.0e-3\nbatch:\n  micro_batch: 4\n")
    cfg = load_config(ToyRoot, recipe, ["optim.epochs=50", "model.depth=24"])
    assert cfg.optim.epochs == 50  # CLI beats yaml
    assert cfg.optim.blr == 1e-3  # yaml beats default
    assert cfg.batch.micro_batch == 4  # yaml beats default
    assert cfg.model.depth == 24  # CLI beats default
    assert cfg.optim.warmup_epochs == OptimConfig().warmup_epochs  # untouched default
    assert cfg.run == RunConfig()


def test_later_override_of_the_same_key_wins_and_a_mapping_updates_a_section():
    assert load_config(ToyRoot, None, ["optim.epochs=100", "optim.epochs=200"]).optim.epochs == 200
    cfg = load_config(ToyRoot, None, ["optim.epochs=7", "optim={warmup_epochs: 1, blr: 2e-4}"])
    assert (cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.blr) == (7, 1, 2e-4)


def test_a_section_keeps_the_root_configs_own_default():
    """A root config may default a section differently from the section's class (fine-tuning's training augment is
    a 'finetune' pipeline); a recipe that sets one key of it keeps the rest of that default."""
    from engine.tasks.finetune import FinetuneConfig

    cfg = load_config(FinetuneConfig, {"data": {"train_augment": {"erase_prob": 0.1}}})
    assert cfg.data.train_augment.kind == "finetune" and cfg.data.train_augment.erase_prob == 0.1
    assert cfg.data.train_augment.rand_augment == FinetuneConfig().data.train_augment.rand_augment


# --------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------


def test_scientific_notation_is_a_float_from_yaml_and_cli(tmp_path):
    assert yaml.safe_load("x: 1e-3")["x"] == "1e-3"  # PyYAML's YAML 1.1 reading, which the loader must not share
    from_yaml = load_config(ToyRoot, write_yaml(tmp_path, "optim:\n  blr: 1e-3\n"))
    from_cli = load_config(ToyRoot, None, ["optim.min_lr=1e-7", "optim.lr=2e-4"])
    assert from_yaml.optim.blr == 1e-3 and type(from_yaml.optim.blr) is float
    assert from_cli.optim.min_lr == 1e-7 and type(from_cli.optim.min_lr) is float
    assert from_cli.optim.lr == 2e-4 and type(from_cli.optim.lr) is float  # Optional[float]


def test_wrong_types_name_the_key_the_value_and_the_origin(tmp_path):
    cfg = load_config(ToyRoot, None, ["optim.weight_decay=0"])
    assert cfg.optim.weight_decay == 0.0 and type(cfg.optim.weight_decay) is float
    message = load_error(tmp_path, overrides=["optim.weight_decay=lots"])
    assert "optim.weight_decay" in message and "'lots'" in message and "Float" in message
    assert "command-line override 'optim.weight_decay=lots'" in message
    message = load_error(tmp_path, "batch:\n  micro_batch: 1.5\n")
    assert "batch.micro_batch" in message and "1.5" in message and "recipe.yaml" in message
    message = load_error(tmp_path, overrides=["model.use_cls=maybe"])
    assert "model.use_cls" in message and "maybe" in message


def test_literal_field_lists_allowed_values(tmp_path):
    assert load_config(ToyRoot, None, ["model.pool=cls"]).model.pool == "cls"
    message = load_error(tmp_path, overrides=["model.pool=max"])
    assert "model.pool" in message and "'mean'" in message and "'cls'" in message and "'max'" in message


def test_tuple_and_list_fields(tmp_path):
    cfg = load_config(ToyRoot, None, ["optim.betas=[0.9, 0.999]", "model.mlp_ratios=[4, 2.5]"])
    assert cfg.optim.betas == (0.9, 0.999) and isinstance(cfg.optim.betas, tuple)
    assert cfg.model.mlp_ratios == [4.0, 2.5] and all(type(r) is float for r in cfg.model.mlp_ratios)
    assert load_config(ToyRoot, write_yaml(tmp_path, "model:\n  img_size: [160, 192]\n")).model.img_size == (160, 192)
    assert "length 3" in load_error(tmp_path, overrides=["optim.betas=[0.9, 0.95, 0.99]"])
    message = load_error(tmp_path, overrides=["model.img_size=[224, wide]"])
    assert "'model.img_size=[224, wide]'" in message and "an item could not be converted to Integer" in message


def test_optional_fields_and_none_where_it_is_not_allowed(tmp_path):
    cfg = load_config(ToyRoot, None, ["model.head_dim=64", "model.dropout=1e-1", "optim.clip_grad=null"])
    assert (cfg.model.head_dim, cfg.model.dropout, cfg.optim.clip_grad) == (64, 0.1, None)
    assert load_config(ToyRoot, None, ["optim.clip_grad=3"]).optim.clip_grad == 3.0
    message = load_error(tmp_path, overrides=["optim.epochs=null"])
    assert "optim.epochs" in message and "None" in message


def test_str_field_given_number_on_cli_becomes_text():
    assert load_config(ToyRoot, None, ["run.name=123"]).run.name == "123"


# --------------------------------------------------------------------------
# Structural errors
# --------------------------------------------------------------------------


def test_unknown_nested_key_lists_valid_keys_and_suggests(tmp_path):
    message = load_error(tmp_path, "optim:\n  lrr: 1.0e-3\n")
    assert "unknown config key 'optim.lrr'" in message
    assert "recipe.yaml" in message
    assert "did you mean 'optim.lr'" in message
    assert "valid keys under 'optim': name, blr, lr, min_lr" in message


def test_unknown_top_level_key_without_close_match(tmp_path):
    message = load_error(tmp_path, "zzz: 1\n")
    assert "unknown config key 'zzz'" in message
    assert "did you mean" not in message
    assert "valid keys at top level: run, batch, optim, model" in message


def test_a_misspelled_section_in_an_override_is_blamed_on_that_override(tmp_path):
    message = load_error(tmp_path, "optim:\n  epochs: 5\n  warmup_epochs: 1\n", ["run.seed=1", "optm.lr=1"])
    assert message.startswith("unknown config key 'optm' in command-line override 'optm.lr=1'")
    assert "did you mean 'optim'" in message
    message = load_error(tmp_path, overrides=["batch.micro_bach=4"])
    assert "'batch.micro_bach' in command-line override 'batch.micro_bach=4'" in message
    assert "did you mean 'batch.micro_batch'" in message


def test_section_set_to_scalar_and_scalar_set_to_mapping(tmp_path):
    assert "optim" in load_error(tmp_path, overrides=["optim=3"])
    message = load_error(tmp_path, "optim:\n  lr:\n    peak: 1\n")
    assert "optim.lr" in message and "recipe.yaml" in message


def test_post_init_error_names_the_innermost_section_and_where_its_values_came_from(tmp_path):
    message = load_error(tmp_path, "model:\n  depth: 0\n")
    assert message.startswith("invalid config 'model' from ") and "recipe.yaml" in message
    assert "depth must be >= 1, got 0" in message
    message = load_error(tmp_path, "optim:\n  epochs: 10\n", ["optim.warmup_epochs=20"])
    assert message.startswith("invalid config 'optim'") and "warmup_epochs" in message
    assert "command-line override 'optim.warmup_epochs=20'" in message
    from models.vit import ClassifierConfig

    with pytest.raises(ConfigError, match=r"'encoder'.*num_frames 15 must be a multiple of tubelet_size 2"):
        load_config(ClassifierConfig, None, ["encoder.num_frames=15"])


def test_recipe_and_override_mistakes(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml does not exist"):
        load_config(ToyRoot, str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="top level of .*recipe.yaml must be a mapping"):
        load_config(ToyRoot, write_yaml(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not valid yaml"):
        load_config(ToyRoot, write_yaml(tmp_path, "optim: [1,\n"))
    with pytest.raises(ConfigError, match="must look like key.subkey=value"):
        load_config(ToyRoot, None, ["optim.lr"])


# --------------------------------------------------------------------------
# to_dict / save_config
# --------------------------------------------------------------------------


def custom_config() -> ToyRoot:
    return load_config(ToyRoot, None, ["run.name=123", "optim.betas=[0.8, 0.99]", "optim.lr=1e-3", "optim.eps=1e-12",
                                       "model.img_size=[160, 192]", "model.pool=cls", "model.mlp_ratios=[2, 3.5]"])


def test_to_dict_yaml_load_round_trip():
    cfg = custom_config()
    plain = to_dict(cfg)
    assert_plain(plain)
    assert plain["optim"]["betas"] == [0.8, 0.99]  # tuples become lists
    reloaded = load_config(ToyRoot, yaml.safe_load(yaml.safe_dump(plain)))
    assert reloaded == cfg
    assert isinstance(reloaded.model.img_size, tuple)


def test_save_config_writes_both_files_and_they_reload(tmp_path):
    cfg = custom_config()
    derived = derive(cfg.batch, cfg.optim, world_size=2, num_train_samples=1000)
    out_dir = tmp_path / "run"
    save_config(cfg, str(out_dir), derived)
    assert sorted(os.listdir(out_dir)) == ["config.yaml", "derived.yaml"]  # no temp files left
    assert load_config(ToyRoot, str(out_dir / "config.yaml")) == cfg
    assert yaml.safe_load((out_dir / "derived.yaml").read_text()) == derived.as_dict()
    save_config(ToyRoot(), str(out_dir))  # overwrites
    assert load_config(ToyRoot, str(out_dir / "config.yaml")) == ToyRoot()


# --------------------------------------------------------------------------
# Entry points' command line (engine.launch)
# --------------------------------------------------------------------------


class ToyTask:
    config_class = ToyRoot


def toy_flags(parser):
    parser.add_argument("--eval-only", action="store_true", help="test instead of training")
    parser.add_argument("--weights", help="weights to test")


def parse(argv):
    from engine.launch import entry_parser, parse_command_line

    return parse_command_line(entry_parser(ToyTask, "A toy entry point.", toy_flags, prog="toy.py"), ToyRoot, argv)


def test_declared_flags_overrides_and_the_deepspeed_launchers_local_rank(tmp_path):
    recipe = write_yaml(tmp_path, "optim:\n  epochs: 90\n")
    flags, cfg = parse(["--config", recipe, "optim.blr=1e-3", "--eval-only", "--local_rank=3", "--weights", "w.pt"])
    assert flags.eval_only and flags.weights == "w.pt" and flags.local_rank == 3
    assert (cfg.optim.epochs, cfg.optim.blr) == (90, 1e-3)


@pytest.mark.parametrize("argv, expected", [
    (["--eval_onyl"], "toy.py: unknown flag --eval_onyl (did you mean --eval-only?); valid flags: --config, "
                      "--show-config, --eval-only, --weights, -h/--help"),
    (["--eval"], "unknown flag --eval (did you mean --eval-only?)"),  # no silent abbreviation
    (["recipe.yaml"], "unexpected argument 'recipe.yaml': overrides look like key.sub=value"),
])
def test_a_wrong_flag_exits_2_naming_the_valid_ones(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.e2e
def test_entry_points_exit_2_with_one_line_on_wrong_input(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    recipe = root / "run_scripts" / "configs" / "finetune" / "tiny_cpu.yaml"
    bad_list = tmp_path / "train.txt"
    bad_list.write_text("a.mp4 1\nb.mp4\n")
    cases = {("model.encodr.depth=4",): "unknown config key 'model.encodr' in command-line override "
                                        "'model.encodr.depth=4' (did you mean 'model.encoder'?); valid keys under "
                                        "'model': encoder, num_classes",
             ("--eval_onyl",): "unknown flag --eval_onyl (did you mean --eval-only?)",
             ("--weights=w.pt",): "error: --weights is for --eval-only; to start training from weights, set "
                                  "model.init=PATH",
             ("data.synthetic=null", f"data.train_list={bad_list}"): f"error: {bad_list}:2: expected '<path> "
                                                                      "<label>' with an integer label, got 'b.mp4'",
             ("--config=nope.yaml",): "error: config file nope.yaml does not exist",
             ("data.synthetic=null", "data.train_list=nope.csv"): "error: annotation list nope.csv does not exist"}
    for args, expected in cases.items():
        result = subprocess.run([sys.executable, str(root / "run_scripts" / "finetune.py"), "--config", str(recipe),
                                 *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        # One line says what is wrong (the last; a list is read after logging started), no traceback.
        assert expected in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "runs").exists()  # nothing started


def test_help_lists_flags_sections_and_how_to_see_a_sections_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: toy.py" in out and "A toy entry point." in out and "[key.sub=value ...]" in out
    assert "--eval-only" in out and "test instead of training" in out and "--show-config" in out
    assert "config sections (ToyRoot):" in out and "optim" in out and "--show-config optim" in out


def test_show_config_prints_a_sections_keys_values_and_comments():
    from engine.launch import show_config

    text = show_config(custom_config(), "optim")
    assert "betas: [0.8, 0.99]  # AdamW (beta1, beta2)" in text
    assert "lr: 0.001  # absolute peak lr" in text
    assert show_config(ToyRoot(), "model").splitlines()[0] == "depth: 12  # transformer depth"
    with pytest.raises(ConfigError, match="no config section 'optm'; valid there: run, batch, optim, model"):
        show_config(ToyRoot(), "optm")


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


def test_repeated_sampling_counts_effective_epochs():
    d = derive(BatchConfig(micro_batch=2, repeats=4), OptimConfig(epochs=100, warmup_epochs=5), 8,
               num_train_samples=1600)
    assert d.effective_epochs == 400
    assert d.steps_per_epoch == 100  # one step per 16 videos: repeats add clips, not steps
    assert d.global_clips == 64
