"""Parameter groups (weight decay, layer decay), the optimizers over them (AdamW, SGD, LARS), the per-step lr /
wd schedules, and SGD / LARS under real DeepSpeed engines (one rank, in this process)."""

import math
import re

import pytest
import torch
from timm.optim import Lars
from torch import nn

from engine import checkpoint
from engine.config import BatchConfig, ConfigError, derive, load_config
from engine.ds import DeepSpeedConfig, build_ds_config, cpu_adam_like
from engine.optim import (
    OptimConfig,
    Schedules,
    apply_schedules,
    build_optimizer,
    cosine_schedule,
    describe_groups,
    param_groups,
)
from models.videomae import PretrainModelConfig, VideoMAE
from models.vit import ClassifierConfig, build_classifier

from helpers import debug_vit


def tiny_classifier(**vit_overrides):
    """Depth-2 ViT with learnable separable positions and a cls token: every no-decay kind occurs."""
    vit = debug_vit(pos_embed="separable", cls_token=True, **vit_overrides)
    return build_classifier(ClassifierConfig(vit, num_classes=5, global_pool="cls"))


def names_by_group(model, groups) -> dict[str, list[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [name_of[id(p)] for p in g["params"]] for g in groups}


def no_decay_names(model, groups) -> set[str]:
    by_group = names_by_group(model, groups)
    return {n for g in groups if g["weight_decay"] == 0 for n in by_group[g["name"]]}


def expected_no_decay(model) -> set[str]:
    """Written out by kind, independently of the shape rule the implementation uses."""
    kinds = (".bias", "norm1.weight", "norm2.weight", "attn.q_bias", "attn.v_bias", "gamma_1", "gamma_2")
    names = {n for n, _ in model.named_parameters() if n.endswith(kinds)}
    return names | {"norm.weight", "cls_token", "pos_embed.spatial", "pos_embed.temporal", "pos_embed.cls"}


# ---- parameter groups ------------------------------------------------------------------------------------------


def test_no_decay_set_of_classifier_is_biases_norms_qv_biases_and_embeddings():
    model = tiny_classifier()
    groups = param_groups(model, weight_decay=0.05)
    assert [g["name"] for g in groups] == ["no_decay", "decay"]  # cls_token comes first
    assert no_decay_names(model, groups) == expected_no_decay(model)
    decay = names_by_group(model, groups)["decay"]
    assert set(decay) == {"patch_embed.proj.weight", "head.weight"} | {
        f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    assert {g["name"]: g["weight_decay"] for g in groups} == {"no_decay": 0.0, "decay": 0.05}
    assert all(g["lr_scale"] == 1.0 for g in groups)


def test_layer_scale_gammas_get_no_decay():
    model = tiny_classifier(layer_scale_init=0.1)
    assert {"blocks.0.gamma_1", "blocks.1.gamma_2"} <= no_decay_names(model, param_groups(model, 0.05))


@pytest.mark.parametrize("layer_decay", [None, 0.75])
def test_every_trainable_parameter_is_in_exactly_one_group(layer_decay):
    model = tiny_classifier()
    grouped = [id(p) for g in param_groups(model, 0.05, layer_decay) for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}


def test_frozen_parameters_are_left_out():
    model = tiny_classifier()
    for p in model.patch_embed.parameters():
        p.requires_grad_(False)
    grouped = {id(p) for g in param_groups(model, 0.05, 0.75) for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model.patch_embed.proj.weight) not in grouped


def test_layer_decay_follows_videomae_layer_ids_and_scales():
    model = tiny_classifier()
    groups = param_groups(model, 0.05, layer_decay=0.75)
    by_group = names_by_group(model, groups)
    scale_of = {n: g["lr_scale"] for g in groups for n in by_group[g["name"]]}
    # depth 2 -> 4 layer ids, each with a decay and a no-decay group
    assert {g["name"] for g in groups} == {f"layer_{i}_{k}" for i in range(4) for k in ("decay", "no_decay")}
    assert scale_of["patch_embed.proj.weight"] == pytest.approx(0.75**3)
    assert scale_of["pos_embed.spatial"] == pytest.approx(0.75**3)
    assert scale_of["cls_token"] == pytest.approx(0.75**3)
    assert scale_of["blocks.0.attn.qkv.weight"] == pytest.approx(0.75**2)
    assert scale_of["blocks.0.norm1.bias"] == pytest.approx(0.75**2)
    assert scale_of["blocks.1.mlp.fc2.weight"] == pytest.approx(0.75)
    assert scale_of["norm.weight"] == 1.0
    assert scale_of["head.weight"] == 1.0
    # layer decay does not change which parameters decay
    assert no_decay_names(model, groups) == expected_no_decay(model)
    for g in groups:
        assert g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else 0.05)


def test_layer_decay_needs_layer_ids():
    model = VideoMAE(PretrainModelConfig(debug_vit()))
    with pytest.raises(ValueError, match="layer_id"):
        param_groups(model, 0.05, layer_decay=0.75)
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups(tiny_classifier(), 0.05, layer_decay=0.0)


def test_videomae_pretraining_groups():
    model = VideoMAE(PretrainModelConfig(debug_vit()))
    groups = param_groups(model, 0.05)
    no_decay = no_decay_names(model, groups)
    assert "mask_token" in no_decay
    assert {"decoder.blocks.0.mlp.fc1.bias", "decoder.head.bias", "decoder.norm.weight",
            "decoder.blocks.3.attn.q_bias", "encoder.blocks.1.attn.v_bias"} <= no_decay
    decay = set(names_by_group(model, groups)["decay"])
    assert {"encoder_to_decoder.weight", "decoder.head.weight", "encoder.patch_embed.proj.weight"} <= decay
    assert no_decay | decay == {n for n, _ in model.named_parameters()}
    assert all(g["lr_scale"] == 1.0 for g in groups)


def test_no_weight_decay_names_must_match_the_model():
    class Wrapper(nn.Module):  # like torch.compile / DDP: names gain a prefix the hook does not know
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def no_weight_decay(self):
            return self.inner.no_weight_decay()

    with pytest.raises(ValueError, match="bare model"):
        param_groups(Wrapper(tiny_classifier()), 0.05)


def test_describe_groups_lists_each_group():
    model = tiny_classifier()
    groups = param_groups(model, 0.05, layer_decay=0.75)
    text = describe_groups(groups)
    assert "layer_0_no_decay" in text and "layer_3_decay" in text
    total = sum(p.numel() for p in model.parameters())
    assert text.splitlines()[-1].split()[-1] == f"{total:,}"
    assert "param_names" not in groups[0]


# ---- schedules -------------------------------------------------------------------------------------------------


def test_cosine_schedule_values():
    kw = dict(total_steps=110, warmup_steps=10, base=1.0, final=0.1, warmup_start=0.0)
    assert cosine_schedule(0, **kw) == 0.0
    assert cosine_schedule(5, **kw) == pytest.approx(0.5)
    assert cosine_schedule(10, **kw) == pytest.approx(1.0)  # end of warmup = peak
    assert cosine_schedule(60, **kw) == pytest.approx(0.55)  # cosine midpoint
    assert cosine_schedule(85, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.75)))
    assert cosine_schedule(110, **kw) == pytest.approx(0.1)
    assert cosine_schedule(500, **kw) == pytest.approx(0.1)  # clamped, no wrap-around


def test_cosine_schedule_without_warmup_and_all_warmup():
    assert cosine_schedule(0, 100, 0, base=2.0, final=0.0, warmup_start=123.0) == pytest.approx(2.0)
    assert cosine_schedule(50, 100, 0, base=2.0, final=0.0, warmup_start=123.0) == pytest.approx(1.0)
    # warmup_epochs == epochs: a ramp, then the final value once training is over
    assert cosine_schedule(5, 10, 10, base=1.0, final=0.0, warmup_start=0.0) == pytest.approx(0.5)
    assert cosine_schedule(10, 10, 10, base=1.0, final=0.0, warmup_start=0.0) == 0.0


@pytest.mark.parametrize("args", [(-1, 10, 2), (0, 0, 0), (0, 10, 11), (0, 10, -1)])
def test_cosine_schedule_rejects_bad_lengths(args):
    step, total, warmup = args
    with pytest.raises(ValueError):
        cosine_schedule(step, total, warmup, 1.0, 0.0, 0.0)


def test_schedules_from_config_and_derived():
    optim = OptimConfig(blr=1e-3, min_lr=1e-6, warmup_lr=1e-7, epochs=10, warmup_epochs=2,
                        weight_decay=0.04, weight_decay_end=0.4)
    derived = derive(BatchConfig(micro_batch=4), optim, world_size=2, num_train_samples=80)
    sched = Schedules.from_config(optim, derived)
    assert (sched.total_steps, sched.warmup_steps) == (100, 20)
    assert sched.lr_at(0) == pytest.approx(1e-7)
    assert sched.lr_at(20) == pytest.approx(derived.lr) and derived.lr == pytest.approx(1e-3 * 8 / 256)
    assert sched.lr_at(100) == pytest.approx(1e-6)
    # cosine wd: no warmup, start -> end over the whole run
    assert sched.wd_at(0) == pytest.approx(0.04)
    assert sched.wd_at(50) == pytest.approx(0.22)
    assert sched.wd_at(100) == pytest.approx(0.4)
    assert sched.wd_at(1) > 0.04
    constant = Schedules.from_config(OptimConfig(weight_decay=0.05, epochs=10, warmup_epochs=2), derived)
    assert constant.wd_at(0) == constant.wd_at(70) == 0.05


def test_schedules_need_step_counts():
    optim = OptimConfig()
    with pytest.raises(ValueError, match="num_train_samples"):
        Schedules.from_config(optim, derive(BatchConfig(), optim, world_size=1))


# ---- applying the schedules ------------------------------------------------------------------------------------


SCHED = Schedules(total_steps=100, warmup_steps=10, lr=1e-2, min_lr=1e-4, warmup_lr=1e-3,
                  weight_decay=0.05, weight_decay_end=0.0)


def test_apply_schedules_writes_scaled_lr_and_wd_only_into_decay_groups():
    model = tiny_classifier()
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.05), layer_decay=0.5)
    lr, wd = apply_schedules(optimizer, 40, SCHED)
    assert lr == pytest.approx(SCHED.lr_at(40)) and wd == pytest.approx(SCHED.wd_at(40))
    for g in optimizer.param_groups:
        assert g["lr"] == pytest.approx(lr * g["lr_scale"])
        assert g["weight_decay"] == (pytest.approx(wd) if g["use_weight_decay"] else 0.0)
    assert {g["lr_scale"] for g in optimizer.param_groups} == {0.125, 0.25, 0.5, 1.0}
    # wd reaches 0 at the end; decay groups must still take the schedule afterwards (e.g. a reset)
    apply_schedules(optimizer, 100, SCHED)
    apply_schedules(optimizer, 0, SCHED)
    assert {g["weight_decay"] for g in optimizer.param_groups if g["use_weight_decay"]} == {0.05}


def test_apply_schedules_on_plain_group_lists_and_wrappers():
    groups = [{"params": [], "weight_decay": 0.3}, {"params": [], "weight_decay": 0.0, "lr_scale": 0.5}]

    class Wrapped:  # DeepSpeed's engine.optimizer exposes the same param_groups list
        param_groups = groups

    apply_schedules(Wrapped(), 10, SCHED)
    assert groups[0]["lr"] == pytest.approx(1e-2) and groups[0]["weight_decay"] == pytest.approx(SCHED.wd_at(10))
    assert groups[1]["lr"] == pytest.approx(5e-3) and groups[1]["weight_decay"] == 0.0
    apply_schedules(groups, 0, SCHED)
    assert groups[0]["lr"] == pytest.approx(1e-3)


def test_build_optimizer_takes_betas_eps_and_groups_from_config():
    model = tiny_classifier()
    cfg = OptimConfig(betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, warmup_lr=1e-5)
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    for g in optimizer.param_groups:
        assert g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 and g["lr"] == 1e-5
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == {"no_decay": 0.0, "decay": 0.1}


def test_step_decays_only_decay_parameters_by_scheduled_lr_times_wd():
    # With zero gradients Adam's update is 0, so a step is exactly AdamW's decoupled decay:
    # p <- p * (1 - lr * lr_scale * wd) for decay parameters, and no change for the others.
    model = tiny_classifier()
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.05), layer_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    lr, wd = apply_schedules(optimizer, 30, SCHED)
    optimizer.step()
    by_group = names_by_group(model, optimizer.param_groups)
    params = dict(model.named_parameters())
    for g in optimizer.param_groups:
        factor = 1 - lr * g["lr_scale"] * wd if g["use_weight_decay"] else 1.0
        for name in by_group[g["name"]]:
            torch.testing.assert_close(params[name].detach(), before[name] * factor, rtol=1e-6, atol=0)
    assert not torch.equal(params["head.weight"], before["head.weight"])  # decayed
    assert torch.equal(params["pos_embed.spatial"], before["pos_embed.spatial"])  # no decay, zero grad


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_group_settings_survive_an_optimizer_checkpoint(name):
    model = tiny_classifier()
    optimizer = build_optimizer(model, OptimConfig(name=name), layer_decay=0.75)
    state = optimizer.state_dict()
    fresh = build_optimizer(model, OptimConfig(name=name), layer_decay=0.75)
    for g in fresh.param_groups:
        g["lr_scale"], g["use_weight_decay"], g["always_adapt"] = -1.0, None, None
    fresh.load_state_dict(state)

    def settings(groups):
        return [{k: v for k, v in g.items() if k != "params"} for g in groups]

    assert settings(fresh.param_groups) == settings(optimizer.param_groups)


# ---- choosing the optimizer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD), ("lars", Lars)])
def test_every_optimizer_runs_over_the_same_groups(name, cls):
    model = tiny_classifier()
    for p in model.patch_embed.parameters():
        p.requires_grad_(False)
    expected = param_groups(model, 0.05, layer_decay=0.75)
    optimizer = build_optimizer(model, OptimConfig(name=name, warmup_lr=1e-5), layer_decay=0.75)
    assert type(optimizer) is cls

    def summary(groups):
        return [(g["name"], g["lr_scale"], g["use_weight_decay"], g["weight_decay"], [id(p) for p in g["params"]])
                for g in groups]

    assert summary(optimizer.param_groups) == summary(expected)
    # 4 layer ids x (decay, no decay), less layer 0's decay group: its only tensor, the patch projection, is frozen
    assert len(expected) == 7 and "layer_0_decay" not in {g["name"] for g in expected}
    assert all(g["lr"] == pytest.approx(1e-5 * g["lr_scale"]) for g in optimizer.param_groups)
    if name == "lars":  # trust-ratio adaptation exactly where weight decay applies (MAE: not for biases / norms)
        assert all(g["always_adapt"] == g["use_weight_decay"] and not g["trust_clip"] for g in optimizer.param_groups)


def _random_grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _group_of(model, optimizer) -> dict[str, dict]:
    return {n: g for g in optimizer.param_groups for n in names_by_group(model, [g])[g["name"]]}


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_steps_match_the_update_written_out(nesterov):
    model = tiny_classifier()
    optimizer = build_optimizer(model, OptimConfig(name="sgd", momentum=0.9, nesterov=nesterov), layer_decay=0.5)
    group_of, params = _group_of(model, optimizer), dict(model.named_parameters())
    expected = {n: p.detach().clone() for n, p in params.items()}
    buffers = {}
    for step in (3, 40):  # warmup, then cosine: lr and wd differ between the two steps
        _random_grads(model, step)
        lr, wd = apply_schedules(optimizer, step, SCHED)
        for n, p in params.items():
            group = group_of[n]
            d = p.grad + wd * expected[n] if group["use_weight_decay"] else p.grad  # L2 term in the gradient
            buffers[n] = d.clone() if n not in buffers else 0.9 * buffers[n] + d
            d = d + 0.9 * buffers[n] if nesterov else buffers[n]
            expected[n] = expected[n] - lr * group["lr_scale"] * d
        optimizer.step()
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_lars_steps_match_the_trust_ratio_written_out(weight_decay):
    """MAE's linear probe runs LARS at wd 0: weight matrices must still be adapted, biases and norms never."""
    trust = 0.002
    model = tiny_classifier()
    sched = Schedules(total_steps=100, warmup_steps=10, lr=0.5, min_lr=1e-3, warmup_lr=0.1, weight_decay=weight_decay)
    optimizer = build_optimizer(model, OptimConfig(name="lars", weight_decay=weight_decay, momentum=0.9,
                                                   trust_coefficient=trust), layer_decay=0.5)
    group_of, params = _group_of(model, optimizer), dict(model.named_parameters())
    expected = {n: p.detach().clone() for n, p in params.items()}
    buffers, ratios = {}, {}
    for step in (3, 40):
        _random_grads(model, step)
        lr, wd = apply_schedules(optimizer, step, sched)
        for n, p in params.items():
            group, w, g = group_of[n], expected[n], p.grad
            if group["use_weight_decay"]:
                # one tensor's trust ratio (LARS paper, timm): trust * |w| / (|g| + wd * |w|)
                ratios[n] = trust * w.norm() / (g.norm() + wd * w.norm())
                d = (g + wd * w) * ratios[n]
            else:
                d = g  # no adaptation and no decay: momentum SGD
            buffers[n] = d.clone() if n not in buffers else 0.9 * buffers[n] + d
            expected[n] = w - lr * group["lr_scale"] * buffers[n]
        optimizer.step()
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-6, atol=1e-7)
    assert "head.weight" in ratios and "head.bias" not in ratios and "blocks.0.norm1.weight" not in ratios
    assert max(float(r) for r in ratios.values()) < 0.01  # the adaptation changes the step by orders of magnitude


@pytest.mark.parametrize("fields, message", [
    (dict(name="lamb"), "name must be one of adamw, sgd, lars, got 'lamb'"),
    (dict(name="sgd", momentum=1.0), "momentum must lie in [0, 1), got 1.0"),
    (dict(name="lars", momentum=-0.1), "momentum must lie in [0, 1), got -0.1"),
    (dict(nesterov=True), "nesterov applies to sgd and lars only; set optim.nesterov=false for adamw"),
    (dict(name="sgd", momentum=0.0, nesterov=True), "nesterov needs momentum > 0, got momentum=0.0"),
    (dict(name="lars", trust_coefficient=0.0), "trust_coefficient must be > 0, got 0.0"),
])
def test_optimizer_settings_are_validated(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        OptimConfig(**fields)


def test_optimizer_is_chosen_by_name_in_recipes_and_overrides():
    cfg = load_config(OptimConfig, {"name": "lars", "weight_decay": 0.0}, ["momentum=0.8", "trust_coefficient=0.01"])
    assert (cfg.name, cfg.momentum, cfg.trust_coefficient, cfg.weight_decay) == ("lars", 0.8, 0.01, 0.0)
    assert OptimConfig().name == "adamw"
    with pytest.raises(ConfigError, match="'lamb'.*adamw.*sgd.*lars"):  # the choices, from the Literal
        load_config(OptimConfig, None, ["name=lamb"])


@pytest.mark.parametrize("name, cls", [("sgd", "SGD"), ("lars", "Lars")])
def test_offload_templates_refuse_optimizers_other_than_adamw(name, cls):
    optimizer = build_optimizer(tiny_classifier(), OptimConfig(name=name))
    with pytest.raises(ValueError, match=f"only stand in for AdamW, not {cls}; .*pick a template without offload"):
        cpu_adam_like(optimizer)


# ---- SGD and LARS under DeepSpeed ------------------------------------------------------------------------------

DS_SCHED = Schedules(total_steps=6, warmup_steps=2, lr=0.1, min_lr=1e-3, warmup_lr=0.02, weight_decay=0.05,
                     weight_decay_end=0.01)
DS_OPTIM = dict(weight_decay=0.05, momentum=0.9, trust_coefficient=0.01)
_deprecations = pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning")


def _ds_model():
    torch.manual_seed(0)  # the same initial weights for every run
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))


def _ds_batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)


def _plain_torch(name: str) -> dict[str, torch.Tensor]:
    model = _ds_model()
    optimizer = build_optimizer(model, OptimConfig(name=name, **DS_OPTIM))
    for step in range(DS_SCHED.total_steps):
        apply_schedules(optimizer, step, DS_SCHED)
        x, y = _ds_batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _ds_engine(ds, name: str, template: str):
    batch = BatchConfig(micro_batch=4, grad_accum=1, repeats=1, num_workers=0)
    ds_config = build_ds_config(DeepSpeedConfig(template=template), batch, derive(batch, OptimConfig(), 1), None)
    model = _ds_model()
    engine = ds.initialize(model, build_optimizer(model, OptimConfig(name=name, **DS_OPTIM)), ds_config)
    assert "zero_allow_untested_optimizer" not in ds_config  # set on a copy only
    return engine


def _ds_train(ds, engine, steps) -> list[float]:
    losses = []
    for step in steps:
        apply_schedules(engine.optimizer, step, DS_SCHED)  # as the training loop does
        x, y = _ds_batch(step)
        loss = nn.functional.mse_loss(engine(x), y)
        ds.engine_step(engine, loss)
        losses.append(loss.item())
    return losses


def _momentum(engine) -> list[torch.Tensor]:
    """The momentum buffers, in group order (under ZeRO-2 one flat partition per group)."""
    optimizer = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    return [optimizer.state[p]["momentum_buffer"].clone() for g in optimizer.param_groups for p in g["params"]]


@_deprecations
@pytest.mark.parametrize("name, template", [("sgd", "zero0_fp32"), ("sgd", "zero2_fp32"), ("lars", "zero0_fp32")])
def test_deepspeed_trains_like_torch_and_resumes_exactly(ds_group, tmp_path, name, template):
    steps, half = DS_SCHED.total_steps, DS_SCHED.total_steps // 2
    whole = _ds_engine(ds_group, name, template)
    losses = _ds_train(ds_group, whole, range(steps))
    assert losses[-1] < losses[0]
    expected = ds_group.full_parameters(whole)
    reference = _plain_torch(name)
    assert all(torch.equal(expected[n], reference[n]) for n in reference)  # bit for bit, as plain torch

    first = _ds_engine(ds_group, name, template)
    assert _ds_train(ds_group, first, range(half)) == losses[:half]
    checkpoint.save_checkpoint(first, tmp_path, half, client_state={})
    saved = _momentum(first)
    resumed = _ds_engine(ds_group, name, template)
    assert checkpoint.load_latest(resumed, tmp_path) is not None
    restored = _momentum(resumed)
    assert len(restored) == len(saved) and all(torch.equal(a, b) for a, b in zip(restored, saved))
    assert _ds_train(ds_group, resumed, range(half, steps)) == losses[half:]
    params = ds_group.full_parameters(resumed)
    assert all(torch.equal(params[n], expected[n]) for n in expected)
    assert {g["name"] for g in resumed.optimizer.param_groups} == {"decay", "no_decay"}


@_deprecations
def test_lars_is_refused_under_zero_partitions(ds_group):
    with pytest.raises(ValueError, match="optim.name=lars needs ZeRO stage 0, but the DeepSpeed config uses stage 2"):
        _ds_engine(ds_group, "lars", "zero2_fp32")
