"""Every recipe under run_scripts/configs/ loads strictly, holds only differences from the defaults of its folder's
root config, and follows the conventions its name promises (architecture, dataset, test protocol)."""

import dataclasses
import importlib
import pathlib
import re

import pytest
import yaml

from engine.config import load_config
from engine.tasks.finetune import FinetuneConfig
from engine.tasks.pretrain import PretrainConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "run_scripts" / "configs"
# configs/<entry>/ holds the recipes of run_scripts/<entry>.py: their root config is that entry point's task's.
ROOT_CONFIG_OF_FOLDER = {
    folder.name: importlib.import_module(f"run_scripts.{folder.name}").TASK.config_class
    for folder in sorted(CONFIGS.iterdir()) if (ROOT / "run_scripts" / f"{folder.name}.py").is_file()
}
RECIPES = sorted(CONFIGS.rglob("*.yaml"))

# Paper recipes are named <method>_<size>_<dataset>.yaml; others (tiny_cpu) are free-form and skip the name checks.
PAPER_RECIPE = re.compile(r"(?P<method>videomae|maest)_(?P<size>[sblh])_(?P<dataset>k400|ssv2|ucf101|hmdb51|ava)")
ARCH_OF_SIZE = {"s": "vit_small", "b": "vit_base", "l": "vit_large", "h": "vit_huge"}
CLASSES_OF_DATASET = {"k400": 400, "ssv2": 174, "ucf101": 101, "hmdb51": 51}
# Encoder fields that decide the shapes of the weights: a fine-tuning recipe must agree with the pre-training
# recipe of the same name on all of them, or the pre-trained export does not load into its classifier.
WEIGHT_SHAPING_FIELDS = ("arch", "embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "tubelet_size",
                         "in_chans", "qkv_bias", "layer_scale_init", "pos_embed", "cls_token")


def _folder(path):
    return path.relative_to(CONFIGS).parts[0]


def _id(path):
    return str(path.relative_to(CONFIGS))


def _load(path):
    return load_config(ROOT_CONFIG_OF_FOLDER[_folder(path)], str(path))


def _paper_name(path):
    return PAPER_RECIPE.fullmatch(path.stem)


FINETUNE_RECIPES = [p for p in RECIPES if _folder(p) == "finetune"]
PAPER_RECIPES = [p for p in RECIPES if _paper_name(p)]
PAPER_FINETUNE_RECIPES = [p for p in FINETUNE_RECIPES if _paper_name(p)]


@pytest.mark.parametrize("folder", sorted(ROOT_CONFIG_OF_FOLDER))
def test_there_are_recipes(folder):
    assert any(_folder(p) == folder for p in RECIPES), f"no recipes in {folder}/"


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_loads_strictly(path):
    folder = _folder(path)
    assert folder in ROOT_CONFIG_OF_FOLDER, f"no root config registered for recipes in {folder}/"
    assert_only_differences(path, ROOT_CONFIG_OF_FOLDER[folder])


def assert_only_differences(path, root_cls):
    """A recipe holds only differences: none of its values may merely repeat a default.

    Values are compared after loading (a yaml ``5e-4`` is the string '5e-4' until the loader coerces it, a list
    becomes a tuple), against the defaults of the *root* config: a finetune recipe's defaults are
    FinetuneConfig's (e.g. drop_path 0.1, blr 1e-3), not those of the nested dataclasses on their own.
    """
    loaded = load_config(root_cls, str(path))
    _assert_no_redundant_values(yaml.safe_load(path.read_text()) or {}, loaded, root_cls(), path.name)


def _assert_no_redundant_values(data: dict, loaded, defaults, where: str, prefix=""):
    for key, value in data.items():
        default, actual = getattr(defaults, key), getattr(loaded, key)
        if isinstance(value, dict) and default is None:
            continue  # an optional section switched on: its presence is the difference
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            _assert_no_redundant_values(value, actual, default, where, f"{prefix}{key}.")
        else:
            assert actual != default, f"{where}: {prefix}{key} repeats its default {default!r}"


@pytest.mark.parametrize("root_cls, text", [
    (FinetuneConfig, "model:\n  encoder:\n    drop_path: 0.1\n"),  # FinetuneConfig's default, not ViTConfig's
    (FinetuneConfig, "optim:\n  blr: 1e-3\n"),  # a string in yaml, 1e-3 once loaded
    (FinetuneConfig, "data:\n  train_augment:\n    rrc_scale: [0.08, 1.0]\n"),  # a list in yaml, a tuple loaded
    (PretrainConfig, "optim:\n  blr: 1.5e-4\n"),
])
def test_redundancy_check_catches_repeated_defaults(tmp_path, root_cls, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(AssertionError, match="repeats its default"):
        assert_only_differences(path, root_cls)


def test_redundancy_check_accepts_differences(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  encoder:\n    drop_path: 0.0\noptim:\n  blr: 5e-4\n")  # 0.0 is ViTConfig's default
    assert_only_differences(path, FinetuneConfig)


def test_output_dirs_are_distinct():
    """Two recipes writing into one folder would resume or overwrite each other's checkpoints."""
    owners = {}
    for path in RECIPES:
        output_dir = _load(path).run.output_dir
        assert output_dir not in owners, f"{_id(path)} and {owners[output_dir]} share run.output_dir {output_dir}"
        owners[output_dir] = _id(path)


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=_id)
def test_architecture_matches_file_name(path):
    expected = ARCH_OF_SIZE[_paper_name(path)["size"]]
    assert _load(path).model.encoder.arch == expected, f"{path.name}: model.encoder.arch is not {expected}"


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=_id)
def test_method_conventions(path):
    """VideoMAE: fixed sin-cos table, no cls token. MAE-ST: learnable separable position embeddings."""
    encoder = _load(path).model.encoder
    if _paper_name(path)["method"] == "maest":
        assert encoder.pos_embed == "separable"
    else:
        assert (encoder.pos_embed, encoder.cls_token) == ("sincos", False)


@pytest.mark.parametrize("path", [p for p in RECIPES if "ssv2" in p.stem], ids=_id)
def test_ssv2_recipes_do_not_flip(path):
    assert not _load(path).data.train_augment.flip, f"{path.name}: SSv2 labels say left/right, flip must be off"


# Recipes of the entry points that classify videos: fine-tuning and the probes.
CLASSIFIER_RECIPES = [p for p in RECIPES if _folder(p) in ("finetune", "probe", "attentive_probe")]


@pytest.mark.parametrize("path", CLASSIFIER_RECIPES, ids=_id)
def test_num_classes_agree(path):
    cfg = _load(path)
    assert cfg.data.num_classes == cfg.model.num_classes, (
        f"{path.name}: data.num_classes={cfg.data.num_classes} (the label check) must equal "
        f"model.num_classes={cfg.model.num_classes} (the head)")


@pytest.mark.parametrize("path", CLASSIFIER_RECIPES, ids=_id)
def test_test_views(path):
    cfg = _load(path)
    views = cfg.data.test_temporal_views * cfg.data.eval_augment.num_spatial_views
    assert views >= 1
    if cfg.data.eval_augment.num_spatial_views == 3:
        # VideoMAE / MAE-ST 3-crop testing: the short side is resized to the input size, crops slide along the long one
        assert cfg.data.eval_augment.short_side == cfg.model.encoder.img_size, (
            f"{path.name}: 3 crops need eval_augment.short_side = img_size = {cfg.model.encoder.img_size}")


@pytest.mark.parametrize("path", PAPER_FINETUNE_RECIPES, ids=_id)
def test_paper_finetune_protocol(path):
    name, cfg = _paper_name(path), _load(path)
    dataset = name["dataset"]
    assert cfg.model.num_classes == CLASSES_OF_DATASET[dataset], f"{path.name}: {dataset} has " \
                                                                 f"{CLASSES_OF_DATASET[dataset]} classes"
    # every paper reports multi-view tests (K temporal clips x 3 crops)
    assert cfg.eval.final_test and cfg.data.test_temporal_views > 1 and cfg.data.eval_augment.num_spatial_views == 3
    # SSv2 is sampled TSN-style (one frame per segment), the others densely at a fixed stride
    assert cfg.data.sampling == ("segments" if dataset == "ssv2" else "dense")
    # peak lr = blr x videos / 256 in VideoMAE; MAE-ST fine-tuning counts every repeated clip
    assert cfg.optim.lr_scale_with_repeats == (name["method"] == "maest"), (
        f"{path.name}: optim.lr_scale_with_repeats must be {name['method'] == 'maest'} for {name['method']}")
    assert cfg.optim.lr is None, f"{path.name}: set optim.blr (per 256), not an absolute lr"
    assert cfg.data.train_list and cfg.data.val_list


@pytest.mark.parametrize("path", [p for p in FINETUNE_RECIPES if (CONFIGS / "pretrain" / p.name).exists()], ids=_id)
def test_finetune_encoder_matches_its_pretraining(path):
    finetune, pretrain = _load(path).model.encoder, _load(CONFIGS / "pretrain" / path.name).model.encoder
    for name in WEIGHT_SHAPING_FIELDS:
        assert getattr(finetune, name) == getattr(pretrain, name), (
            f"{path.name}: model.encoder.{name} is {getattr(finetune, name)!r} here but "
            f"{getattr(pretrain, name)!r} in pretrain/{path.name}: the pre-trained weights would not load")


# The AVA recipes' paper settings: VideoMAE Table 12 (AVA, no extra Kinetics fine-tuning), MAE-ST Table 6a.
# (optimizer, peak lr at batch 128, epochs, layer decay)
AVA_TABLES = {
    ("videomae", "s"): ("adamw", 1e-3 * 128 / 256, 30, 0.6),
    ("videomae", "b"): ("adamw", 2.5e-4 * 128 / 256, 30, 0.75),
    ("videomae", "l"): ("adamw", 2.5e-4 * 128 / 256, 30, 0.75),
    ("videomae", "h"): ("adamw", 5e-4 * 128 / 256, 20, 0.8),
    ("maest", "l"): ("sgd", 7.2, 30, 0.75),
    ("maest", "h"): ("sgd", 4.8, 30, 0.85),
}
DETECT_PAPER_RECIPES = [p for p in PAPER_RECIPES if _folder(p) == "detect"]


def test_every_ava_table_column_has_a_recipe():
    assert {(_paper_name(p)["method"], _paper_name(p)["size"]) for p in DETECT_PAPER_RECIPES} == set(AVA_TABLES)


@pytest.mark.parametrize("path", DETECT_PAPER_RECIPES, ids=_id)
def test_ava_recipes_follow_their_paper_table(path):
    name, cfg = _paper_name(path), _load(path)
    optimizer, lr, epochs, layer_decay = AVA_TABLES[(name["method"], name["size"])]
    gpus = 32  # as written in the headers: batch 128 = 32 GPUs x micro_batch 4
    batch = cfg.batch.micro_batch * cfg.batch.grad_accum * gpus
    assert batch == 128 and cfg.optim.lr is None
    assert cfg.optim.name == optimizer and cfg.optim.blr * batch / 256 == pytest.approx(lr)
    assert (cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.layer_decay) == (epochs, 5, layer_decay)
    assert cfg.model.encoder.drop_path == 0.2 and cfg.model.dropout == 0.5
    assert cfg.optim.weight_decay == (0.05 if optimizer == "adamw" else 1e-8)
    if optimizer == "adamw":
        assert cfg.optim.betas == (0.9, 0.999)
    data = cfg.data
    assert (data.clip_len, data.sampling_rate, data.fps, data.first_second) == (16, 4, 30, 900)
    assert (data.train_short_side, data.crop, data.test_short_side, data.flip) == (256, 224, 256, True)
    assert data.detection_min_score == 0.8 and cfg.model.num_classes == 80
    assert cfg.eval.times_box_score == (name["method"] == "videomae")  # VideoMAE's detector; SlowFast's does not


@pytest.mark.parametrize("path", DETECT_PAPER_RECIPES, ids=_id)
def test_ava_encoder_matches_its_kinetics_pretraining(path):
    pretrain = CONFIGS / "pretrain" / path.name.replace("_ava", "_k400")
    if not pretrain.exists():
        pytest.skip(f"no pre-training recipe {pretrain.name}")
    detector, pretrained = _load(path).model.encoder, _load(pretrain).model.encoder
    for name in WEIGHT_SHAPING_FIELDS:
        assert getattr(detector, name) == getattr(pretrained, name), f"{path.name}: model.encoder.{name}"


PROBE_PAPER_RECIPES = [p for p in PAPER_RECIPES if _folder(p) in ("probe", "attentive_probe")]


def test_every_dataset_and_size_has_probe_recipes():
    for folder in ("probe", "attentive_probe"):
        names = {(_paper_name(p)["size"], _paper_name(p)["dataset"]) for p in PROBE_PAPER_RECIPES if _folder(p) == folder}
        assert names == {(size, dataset) for size in ARCH_OF_SIZE for dataset in CLASSES_OF_DATASET}, folder


@pytest.mark.parametrize("path", PROBE_PAPER_RECIPES, ids=_id)
def test_probe_recipes_follow_their_protocol(path):
    """Linear probes: VideoMAE Table 11 (SGD, momentum 0.9, wd 0, base lr 0.1 among the grid's, batch 1024 on 4
    GPUs, warmup 10, 100 epochs, multi-scale crops). Attentive probes: V-JEPA (AdamW, lr 0.001 at batch 256 on 8
    GPUs among the grid's, wd 0.01, no warmup, 20 epochs, random resized crops of area 0.3-1). Both: the dataset's
    classes, the fine-tuning recipe's multi-view test, the encoder of the pre-training of the same name."""
    name, cfg = _paper_name(path), _load(path)
    dataset, optim = name["dataset"], cfg.optim
    assert cfg.model.num_classes == CLASSES_OF_DATASET[dataset] and not cfg.model.init
    if _folder(path) == "probe":
        gpus, batch, protocol = 4, 1024, ("sgd", 0.0, 10, 100, 0.1, "multi_scale")
        assert optim.momentum == 0.9 and cfg.knn.enabled
    else:
        gpus, batch, protocol = 8, 256, ("adamw", 0.01, 0, 20, 1e-3, "random_resized")
        assert cfg.data.train_augment.rrc_scale == (0.3, 1.0)
    assert cfg.batch.micro_batch * cfg.batch.grad_accum * gpus == batch and optim.lr is None
    name_, wd, warmup, epochs, lr, augment = protocol
    assert (optim.name, optim.weight_decay, optim.warmup_epochs, optim.epochs) == (name_, wd, warmup, epochs)
    assert lr in cfg.grid.lrs and optim.min_lr == 0 and cfg.data.train_augment.kind == augment
    finetune = _load(CONFIGS / "finetune" / path.name) if (CONFIGS / "finetune" / path.name).exists() else None
    assert cfg.data.eval_augment.num_spatial_views == 3
    assert cfg.data.test_temporal_views == (2 if dataset == "ssv2" else 5)
    assert cfg.data.sampling == ("segments" if dataset == "ssv2" else "dense")
    if finetune is not None:
        assert (cfg.data.train_list, cfg.data.val_list) == (finetune.data.train_list, finetune.data.val_list)
    pretrain = CONFIGS / "pretrain" / path.name
    if pretrain.exists():
        for field in WEIGHT_SHAPING_FIELDS + ("num_frames", "img_size"):
            assert getattr(cfg.model.encoder, field) == getattr(_load(pretrain).model.encoder, field), field


# VIMPAC recipes: vimpac/vimpac_<size>_<T>x<S>[_cont].yaml and finetune/vimpac_<size>_<dataset>.yaml.
VIMPAC_RECIPE = re.compile(r"vimpac_(?P<size>small|large_half)_(?:(?P<frames>\d+)x(?P<pixels>\d+)(?:_cont)?"
                           r"|(?P<dataset>ucf101|ssv2))")
VIMPAC_RECIPES = [p for p in RECIPES if VIMPAC_RECIPE.fullmatch(p.stem)]
# VIMPAC Table 3: (arch, width, depth, heads, head width, MLP width); Table 4: pre-training lr at 1024 videos, warmup
# share, fine-tuning lr at 128 videos; its text: the contrastive head (layers, width) of each size
VIMPAC_SIZES = {"small": ("vimpac_small", 512, 6, 8, 64, 2048, 1e-3, 0.1, 1e-4, (2, 2048)),
                "large_half": ("vimpac_large_half", 1024, 24, 16, 32, 2048, 3e-4, 0.05, 5e-5, (3, 4096))}
BLOCKS_FOR_15_PERCENT = {(5, 16): 5, (5, 32): 6, (10, 16): 6, (10, 32): 7}  # VIMPAC Table 2, in bold


def test_vimpac_has_small_and_large_half_recipes():
    names = {p.stem for p in VIMPAC_RECIPES}
    assert {"vimpac_small_5x128", "vimpac_large_half_5x128", "vimpac_large_half_5x256_cont"} <= names
    assert {"vimpac_small_ucf101", "vimpac_large_half_ucf101", "vimpac_large_half_ssv2"} <= names


@pytest.mark.parametrize("path", VIMPAC_RECIPES, ids=_id)
def test_vimpac_recipes_follow_its_tables(path):
    name, cfg = VIMPAC_RECIPE.fullmatch(path.stem), _load(path)
    arch, width, depth, heads, head_width, mlp, pretrain_lr, warmup, finetune_lr, head = VIMPAC_SIZES[name["size"]]
    encoder = cfg.model.encoder
    assert (encoder.arch, *encoder.dims(), encoder.attn_dim() // heads, int(encoder.mlp_ratio * width)) == (
        arch, width, depth, heads, head_width, mlp)
    # one token per frame and 8x8 pixels of the tokenizer, [CLS], factorized positions, backbone dropout 0.1
    assert (encoder.tubelet_size, encoder.patch_size, encoder.cls_token, encoder.pos_embed) == (1, 8, True,
                                                                                                "factorized")
    assert (encoder.drop, encoder.attn_drop, encoder.drop_path) == (0.1, 0.1, 0.0) and cfg.model.tokenizer
    assert (encoder.layout, encoder.norm_layout) == ("t,h|w", "post")  # VIMPAC's layers (Table 13, underlined)
    optim = cfg.optim
    assert (optim.name, optim.lr_decay, optim.clip_grad, optim.eps, optim.layer_decay) == ("adamw", "linear", 1.0,
                                                                                          1e-8, None)
    if _folder(path) == "vimpac":
        assert (encoder.num_frames, encoder.img_size) == (int(name["frames"]), int(name["pixels"]))
        grid = (encoder.num_frames, encoder.img_size // encoder.patch_size)
        assert (cfg.mask.kind, cfg.mask.block_count) == ("block", BLOCKS_FOR_15_PERCENT[grid])
        assert (optim.betas, optim.weight_decay) == ((0.9, 0.98), 0.05)
        assert optim.blr * 1024 / 256 == pytest.approx(pretrain_lr)
        total_epochs = 100 if name["size"] == "large_half" else optim.epochs
        if not path.stem.endswith("_cont"):
            assert optim.warmup_epochs == round(warmup * total_epochs)
        assert (cfg.contrastive.weight, cfg.contrastive.temperature, cfg.batch.repeats) == (1.0, 0.2, 2)
        assert (cfg.model.contrastive_head.layers, cfg.model.contrastive_head.hidden) == head
        assert cfg.model.contrastive_head.out_dim == 256
        assert (cfg.data.train_augment.kind, cfg.data.train_augment.flip) == ("center", False)
    else:
        assert (cfg.model.global_pool, cfg.model.head_init_scale, cfg.model.head_drop) == ("cls", 0.0, 0.0)
        assert (optim.betas, optim.weight_decay) == ((0.9, 0.999), 0.01)
        assert optim.blr * 128 / 256 == pytest.approx(finetune_lr)
        assert optim.warmup_epochs == round(0.1 * optim.epochs)
        assert cfg.optim.epochs == {"ucf101": 50, "ssv2": 22}[name["dataset"]]
        views = 1 if name["dataset"] == "ssv2" else 3
        assert (cfg.data.test_temporal_views, cfg.data.eval_augment.num_spatial_views) == (10, views)
        assert not cfg.mixup.enabled and cfg.batch.repeats == 1
        pretrain = _load(CONFIGS / "vimpac" / f"vimpac_{name['size']}_5x128.yaml").model.encoder
        for field in WEIGHT_SHAPING_FIELDS + ("head_dim", "norm_layout", "layout"):
            assert getattr(encoder, field) == getattr(pretrain, field), field
