"""Optimizer parameter groups, the optimizer itself (AdamW, SGD or LARS) and the per-step lr /
weight-decay schedules (VideoMAE / MAE-ST / MAE recipes).

Three pieces, used in this order by a training loop:

1. ``build_optimizer`` (or ``param_groups``) splits the trainable parameters into groups:
   weight decay or not, and, for fine-tuning with layer-wise lr decay, one pair per layer id.
   The groups do not depend on the optimizer: ``optim.name`` only picks the update rule
   (AdamW for pre-training and fine-tuning, SGD for MAE-ST's AVA / SSv2 fine-tuning and
   VideoMAE's linear probe, LARS for MAE's linear probe) that runs over them.
   Each group carries two extra scalar keys next to torch's own: ``lr_scale`` (multiplies the
   scheduled lr) and ``use_weight_decay`` (whether the wd schedule applies), plus a ``name`` for
   logs. DeepSpeed keeps extra keys of a client optimizer's groups (it uses ``name`` itself) and
   only swaps ``params`` for its flat partitions, so the same groups work under ZeRO.
2. ``Schedules`` holds the lr and wd curves, indexed by *global optimizer step*, not epoch, so a
   run resumed mid-epoch or with another dataset size lands on the right value.
3. ``apply_schedules`` writes the values for one step into any ``param_groups`` list before
   ``optimizer.step()``; it overwrites ``lr`` every time, so the lr set at construction is only
   a placeholder.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import nn

from engine.config import Derived, require

OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd", "lars")


@dataclass
class OptimConfig:
    """The optimizer (AdamW, SGD or LARS) + linear warmup, then a cosine (VideoMAE / MAE-ST) or linear (VIMPAC, BERT)
    decay of the lr.

    ``betas`` and ``eps`` are AdamW's only; ``momentum`` and ``nesterov`` apply to SGD and LARS, and
    ``trust_coefficient`` to LARS. Weight decay is AdamW's decoupled decay, but SGD's and LARS's L2 term
    added to the gradient, so a value tuned for one does not carry over to the others.
    """

    # update rule over the same parameter groups: adamw, sgd (MAE-ST AVA / SSv2 fine-tuning) or lars (MAE linear probe)
    name: Literal["adamw", "sgd", "lars"] = "adamw"
    # base lr; peak lr = blr * lr_scale_batch / 256 unless `lr` is set
    blr: float = 1.5e-4
    # absolute peak lr; when set, used as is and `blr` is ignored
    lr: Optional[float] = None
    # absolute lr at the end of the decay (not batch-scaled, as in VideoMAE)
    min_lr: float = 1e-6
    # shape of the lr decay after warmup: half cosine (VideoMAE, MAE-ST) or straight line (VIMPAC, BERT)
    lr_decay: Literal["cosine", "linear"] = "cosine"
    # absolute lr at the first warmup step (not batch-scaled)
    warmup_lr: float = 1e-6
    # weight decay: AdamW's decoupled decay, SGD's / LARS's L2 term (start value when a cosine wd schedule is used)
    weight_decay: float = 0.05
    # final weight decay of a cosine wd schedule; None keeps wd constant
    weight_decay_end: Optional[float] = None
    # AdamW (beta1, beta2); 0.95 for beta2 is the MAE pre-training choice; ignored by sgd / lars
    betas: tuple[float, float] = (0.9, 0.95)
    # AdamW epsilon; ignored by sgd / lars
    eps: float = 1e-8
    # SGD / LARS momentum factor (0.9 in MAE-ST's SGD and MAE's LARS); 0 = plain SGD; ignored by adamw
    momentum: float = 0.9
    # SGD / LARS Nesterov momentum (needs momentum > 0); not valid with adamw
    nesterov: bool = False
    # LARS trust coefficient tc: a weight matrix's g + wd w is scaled by tc |w| / (|g| + wd |w|) (MAE: 0.001)
    trust_coefficient: float = 0.001
    # max global grad norm; None disables clipping
    clip_grad: Optional[float] = None
    # training length in epochs
    epochs: int = 800
    # epochs of linear warmup from warmup_lr to the peak lr
    warmup_epochs: int = 40
    # scale lr by clips (videos x repeats) instead of videos; see derive()
    lr_scale_with_repeats: bool = False
    # layer-wise lr decay (fine-tuning, VideoMAE semantics): layer i of depth+2 gets decay**(depth+1-i); None = off
    layer_decay: Optional[float] = None

    def __post_init__(self) -> None:
        require(self.blr > 0, f"blr must be > 0, got {self.blr}")
        require(self.lr is None or self.lr > 0, f"lr must be > 0 or null, got {self.lr}")
        require(self.min_lr >= 0, f"min_lr must be >= 0, got {self.min_lr}")
        require(self.warmup_lr >= 0, f"warmup_lr must be >= 0, got {self.warmup_lr}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(
            self.weight_decay_end is None or self.weight_decay_end >= 0,
            f"weight_decay_end must be >= 0 or null, got {self.weight_decay_end}",
        )
        require(all(0 <= b < 1 for b in self.betas), f"betas must lie in [0, 1), got {self.betas}")
        require(self.eps > 0, f"eps must be > 0, got {self.eps}")
        require(self.lr_decay in DECAY_SHAPES, f"lr_decay must be one of {', '.join(DECAY_SHAPES)}, got "
                f"{self.lr_decay!r}")
        require(self.name in OPTIMIZERS, f"name must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}")
        require(0 <= self.momentum < 1, f"momentum must lie in [0, 1), got {self.momentum}")
        require(
            not self.nesterov or self.name != "adamw",
            "nesterov applies to sgd and lars only; set optim.nesterov=false for adamw",
        )
        require(
            not self.nesterov or self.momentum > 0,
            f"nesterov needs momentum > 0, got momentum={self.momentum}",
        )
        require(self.trust_coefficient > 0, f"trust_coefficient must be > 0, got {self.trust_coefficient}")
        require(
            self.clip_grad is None or self.clip_grad > 0,
            f"clip_grad must be > 0 or null, got {self.clip_grad}",
        )
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(
            self.layer_decay is None or 0 < self.layer_decay <= 1,
            f"layer_decay must be in (0, 1] or null, got {self.layer_decay}",
        )
        require(
            0 <= self.warmup_epochs <= self.epochs,
            f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}",
        )


# --------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None) -> list[dict]:
    """AdamW groups of ``model``'s trainable parameters, in the order they first appear.

    No weight decay for 1-D parameters (biases, norm weights, LayerScale gammas, q/v biases) and
    for the names in ``model.no_weight_decay()`` (position tables, cls / mask tokens). Frozen
    parameters are left out, so the optimizer neither stores state for them nor decays them.

    ``layer_decay`` (fine-tuning, VideoMAE semantics): ``model.layer_id(name)`` assigns ids
    0 .. depth + 1, and layer i's lr is scaled by ``layer_decay ** (depth + 1 - i)``, so the head
    trains at the full lr and the patch embedding at the smallest. ``None`` gives every group
    ``lr_scale`` 1.0 and needs no ``layer_id``.

    Pass the bare model, not a DDP / DeepSpeed / ``torch.compile`` wrapper: their parameter names
    carry a prefix that ``no_weight_decay()`` and ``layer_id()`` do not know.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    skip = _no_weight_decay_names(model)
    scales = _layer_scales(model, layer_decay)
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = _uses_decay(name, param, skip)
        layer = _layer_of(model, name, len(scales)) if scales is not None else None
        key = _group_name(layer, decay)
        if key not in groups:
            groups[key] = {
                "name": key,
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "use_weight_decay": decay,
                "lr_scale": scales[layer] if layer is not None else 1.0,
            }
        groups[key]["params"].append(param)
    # Only non-empty groups exist by construction: ZeRO cannot flatten an empty group.
    return list(groups.values())


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    """The model's own no-decay names, checked against its parameters.

    A name that matches no parameter means the names are out of step with the model (typically a
    wrapped model whose names gained a prefix); ignoring it would silently decay position tables.
    """
    hook = getattr(model, "no_weight_decay", None)
    names = set(hook()) if callable(hook) else set()
    unknown = names - {name for name, _ in model.named_parameters()}
    if unknown:
        raise ValueError(
            f"no_weight_decay() of {type(model).__name__} names {sorted(unknown)}, which are not among its "
            "parameters; build the optimizer groups from the bare model, before DDP / DeepSpeed / torch.compile"
        )
    return names


def _uses_decay(name: str, param: torch.Tensor, skip: set[str]) -> bool:
    # Decaying a bias, norm scale or gain pulls it towards 0 instead of regularising a weight matrix.
    return param.ndim > 1 and name not in skip


def _layer_scales(model: nn.Module, layer_decay: Optional[float]) -> Optional[list[float]]:
    """lr scale of each layer id, or None without layer decay."""
    if layer_decay is None:
        return None
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if not callable(getattr(model, "layer_id", None)) or not isinstance(getattr(model, "depth", None), int):
        raise ValueError(
            f"layer_decay={layer_decay} needs a model with layer_id(name) and depth (a VisionTransformer); "
            f"{type(model).__name__} has none. Layer decay is a fine-tuning setting: leave it unset for "
            "pre-training"
        )
    # Embeddings, each block, then norm + head: depth + 2 ids, the last one at the full lr.
    num_layers = model.depth + 2
    return [layer_decay ** (num_layers - 1 - i) for i in range(num_layers)]


def _layer_of(model: nn.Module, name: str, num_layers: int) -> int:
    layer = model.layer_id(name)
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer_id({name!r}) = {layer} is outside 0..{num_layers - 1} (depth + 2 layer ids)")
    return layer


def _group_name(layer: Optional[int], decay: bool) -> str:
    suffix = "decay" if decay else "no_decay"
    return suffix if layer is None else f"layer_{layer}_{suffix}"


def describe_groups(groups: Iterable[dict]) -> str:
    """One line per group (name, tensors, elements, lr_scale, weight_decay) for the run log."""
    lines = [f"{'group':<22} {'tensors':>7} {'elements':>12} {'lr_scale':>9} {'wd':>8}"]
    total_tensors = total_elements = 0
    for i, group in enumerate(groups):
        params = group["params"]
        elements = sum(p.numel() for p in params)
        total_tensors += len(params)
        total_elements += elements
        lines.append(
            f"{group.get('name', f'group_{i}'):<22} {len(params):>7} {elements:>12,} "
            f"{group.get('lr_scale', 1.0):>9.4g} {group.get('weight_decay', 0.0):>8.4g}"
        )
    lines.append(f"{'total':<22} {total_tensors:>7} {total_elements:>12,}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------


DECAY_SHAPES = ("cosine", "linear")


def cosine_schedule(
    step: int, total_steps: int, warmup_steps: int, base: float, final: float, warmup_start: float,
    shape: str = "cosine",
) -> float:
    """Value at optimizer step ``step``: linear warmup, then half-cycle cosine (or, with ``shape="linear"``, a
    straight line), then constant.

    ``warmup_start`` at step 0, rising linearly to ``base`` at ``warmup_steps``; from there a
    half cosine down to ``final`` at ``total_steps``, and ``final`` after it (a resumed or
    over-long run must not wrap around the cosine).
    """
    _check_lengths(total_steps, warmup_steps)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    # warmup_steps == total_steps (warmup_epochs == epochs) leaves no cosine phase: final at the end.
    cosine_steps = total_steps - warmup_steps
    progress = min(1.0, (step - warmup_steps) / cosine_steps) if cosine_steps > 0 else 1.0
    if shape == "linear":
        return base + (final - base) * progress
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def _check_lengths(total_steps: int, warmup_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")


@dataclass(frozen=True)
class Schedules:
    """The lr and weight-decay curves of one run, as functions of the global optimizer step."""

    total_steps: int
    warmup_steps: int
    # peak lr (Derived.lr), reached at the end of warmup
    lr: float
    # lr at total_steps
    min_lr: float
    # lr at step 0
    warmup_lr: float
    # wd at step 0 (and throughout when weight_decay_end is None)
    weight_decay: float
    # wd at total_steps of a cosine wd schedule (VideoMAE); None keeps wd constant
    weight_decay_end: Optional[float] = None
    # shape of the lr decay after warmup: "cosine" or "linear"
    lr_decay: str = "cosine"

    def __post_init__(self) -> None:
        _check_lengths(self.total_steps, self.warmup_steps)

    @classmethod
    def from_config(cls, optim: OptimConfig, derived: Derived) -> Schedules:
        """The run's schedules: peak lr and step counts from ``derive()``, the rest from the config."""
        if derived.total_steps is None or derived.warmup_steps is None:
            raise ValueError("the schedules need step counts: call derive() with num_train_samples")
        return cls(total_steps=derived.total_steps, warmup_steps=derived.warmup_steps, lr=derived.lr,
                   min_lr=derived.min_lr, warmup_lr=derived.warmup_lr, weight_decay=optim.weight_decay,
                   weight_decay_end=optim.weight_decay_end, lr_decay=optim.lr_decay)

    def lr_at(self, step: int) -> float:
        return cosine_schedule(step, self.total_steps, self.warmup_steps, self.lr, self.min_lr, self.warmup_lr,
                               self.lr_decay)

    def wd_at(self, step: int) -> float:
        if self.weight_decay_end is None:
            return self.weight_decay
        # VideoMAE's wd schedule has no warmup: cosine over the whole run.
        return cosine_schedule(
            step, self.total_steps, 0, self.weight_decay, self.weight_decay_end, self.weight_decay
        )


def apply_schedules(optimizer: Any, step: int, schedules: Schedules) -> tuple[float, float]:
    """Set every group's lr and weight decay for optimizer step ``step``; returns (lr, wd) to log.

    ``optimizer`` is anything with ``param_groups`` (a torch optimizer, DeepSpeed's
    ``engine.optimizer``) or the list of group dicts itself. Each group gets
    ``lr(step) * lr_scale``; the weight decay is written only into groups that decay, so
    no-decay groups stay at 0 whatever the wd schedule does.
    """
    lr, wd = schedules.lr_at(step), schedules.wd_at(step)
    groups = optimizer.param_groups if hasattr(optimizer, "param_groups") else optimizer
    for group in groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if "fixed_weight_decay" in group:  # a group with a weight decay of its own (one head of a probe grid)
            group["weight_decay"] = group["fixed_weight_decay"]
        elif _group_decays(group):
            group["weight_decay"] = wd
    return lr, wd


def _group_decays(group: dict) -> bool:
    # Groups built here say so explicitly: a current wd of 0 cannot tell a no-decay group from a
    # decay group whose cosine wd schedule has reached weight_decay_end = 0. Groups built
    # elsewhere fall back to VideoMAE's rule (base weight decay > 0).
    if "use_weight_decay" in group:
        return bool(group["use_weight_decay"])
    return group.get("weight_decay", 0.0) > 0


# --------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, layer_decay: Optional[float] = None
) -> torch.optim.Optimizer:
    """``cfg.name``'s optimizer over ``param_groups(model, cfg.weight_decay, layer_decay)``.

    * ``adamw``: ``torch.optim.AdamW`` with the config's betas and eps (decoupled weight decay).
    * ``sgd``: ``torch.optim.SGD`` with ``momentum`` / ``nesterov``; weight decay is L2 added to
      the gradient.
    * ``lars``: timm's ``Lars`` (SGD with momentum whose step for each weight tensor is rescaled by
      the trust ratio ``trust_coefficient x |w| / (|g| + wd |w|)``), without LARC clipping, as MAE's.
      Per-tensor norms need whole tensors: ZeRO-0 only (``engine.ds.initialize`` refuses stages 1-3).

    Every optimizer gets the same groups, so the no-decay set, layer decay and the omission of frozen
    parameters hold for all of them, and ``apply_schedules`` drives each the same way. The lr stored
    now (``warmup_lr x lr_scale``) is a placeholder: call ``apply_schedules`` before every ``step()``.
    AdamW runs torch's fused kernel when CUDA is there (one launch for all tensors, instead of the foreach
    kernels per step); on the CPU the plain loop, with which the tests compare results bit for bit.
    """
    return optimizer_over(param_groups(model, cfg.weight_decay, layer_decay), cfg)


def optimizer_over(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """``cfg.name``'s optimizer over parameter groups built elsewhere (each with ``lr_scale`` and
    ``use_weight_decay``, as ``param_groups`` makes them): see ``build_optimizer``."""
    for group in groups:
        group["lr"] = cfg.warmup_lr * group["lr_scale"]
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            groups, lr=cfg.warmup_lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
            fused=torch.cuda.is_available(),
        )
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.warmup_lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.name == "lars":
        from timm.optim import Lars  # imported here: loading a config must not import timm's optimizers

        # MAE's LARS adapts only weight matrices, never biases and norm scales (an adaptive step
        # for a near-zero bias is ill-defined), and adapts them even at weight decay 0 (its linear
        # probe runs without wd). timm adapts a group when its weight_decay != 0 or always_adapt is
        # set, so: decay groups always adapt, whatever the wd schedule does; no-decay groups keep
        # weight_decay 0 (apply_schedules never writes it) and never adapt, i.e. plain momentum SGD.
        # The no-decay groups also hold the position tables and cls / mask tokens, which MAE's
        # shape rule would adapt; here they follow their group, as they do for weight decay.
        # trust_clip stays off: LARC's clipping is not part of MAE's LARS. With weight decay, timm's
        # denominator is |g| + wd |w| (the LARS paper's), MAE's |g + wd w|; they agree at wd 0.
        for group in groups:
            group["always_adapt"] = group["use_weight_decay"]
        return Lars(groups, lr=cfg.warmup_lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                    weight_decay=cfg.weight_decay, trust_coeff=cfg.trust_coefficient, trust_clip=False,
                    always_adapt=False)
    raise ValueError(f"unknown optimizer {cfg.name!r}; choose one of {', '.join(OPTIMIZERS)}")
