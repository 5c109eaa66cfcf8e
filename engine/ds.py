"""DeepSpeed, behind a few functions: the only module that imports deepspeed (engine.dist never does).

deepspeed is imported inside the functions that need it (importing it takes seconds and probes the
accelerator), so ``from engine.ds import DeepSpeedConfig`` stays cheap for config loading.

Who owns what:

* ``ds_configs/*.json`` templates own ZeRO and precision settings only (stage, buckets, offload,
  fp16/bf16 blocks). They carry no optimizer, scheduler or batch fields.
* The engine owns the optimizer (a torch optimizer built with our own parameter groups), the lr/wd
  schedule (written into ``optimizer.param_groups`` before each step; DeepSpeed's optimizer wrappers share
  those group dicts, so the change reaches the update) and the batch sizes, which ``build_ds_config`` fills
  in from ``BatchConfig`` / ``Derived``.

DeepSpeed's batch fields count **clips**, the samples the model's forward actually sees:
``train_micro_batch_size_per_gpu = batch.micro_batch x batch.repeats`` (``Derived.clips_per_micro_step``),
``train_batch_size = global_clips = micro x grad_accum x world_size x repeats``. DeepSpeed only uses them for
throughput reports and the consistency check micro x accumulation x world = train batch; the loss is a mean
over the clips of a micro-step, divided by ``gradient_accumulation_steps`` in ``engine.backward``. The lr
rule (videos or clips) lives in ``engine.config.derive`` and is independent of these fields.

What DeepSpeed 0.19.8 does on its CPU accelerator (gloo, one or two ranks; measured by tests/test_ds.py):

* fp32: ZeRO 0, 1, 2 and 3 run and give exactly (bit for bit) the parameters of a plain torch run of
  the same steps with AdamW, two parameter groups, a changing lr and gradient accumulation; with gradient
  clipping too (ZeRO-3 within 2e-8). Two ranks (ZeRO 0 and 2) end identical and within 3e-8 of plain torch
  on the global batch.
* bf16: ZeRO 0, 1, 2 and 3 run, with fp32 master weights, all four within ~2e-3 of the fp32 run in the test.
  ZeRO 0 goes through FP16_UnfusedOptimizer, whose constructor steps the optimizer once on zero gradients
  (an extra AdamW step count and one weight decay); ``initialize`` makes that step inert (see
  ``_steps_at_construction``).
* fp16: ZeRO 1, 2 and 3 run where the CPU has native fp16 (DeepSpeed asks oneDNN:
  ``torch.ops.mkldnn._is_mkldnn_fp16_supported()``, true on e.g. Sapphire Rapids with AVX512-FP16);
  elsewhere ``build_ds_config`` refuses fp16 with a clear error. fp16 with ZeRO 0 is refused everywhere
  (CPU and GPU): DeepSpeed 0.19.8 then wraps a torch optimizer in FP16_UnfusedOptimizer, which the engine's
  backward does not loss-scale although its step divides the gradients by the loss scale.
* The ``*_offload_*`` templates need DeepSpeed's own CPU Adam (``deepspeed.ops.adam.DeepSpeedCPUAdam``,
  a JIT-compiled op); ``initialize`` refuses a plain torch optimizer for them with a clear error.
* The first process group DeepSpeed adopts on CPU JIT-compiles its shared-memory all-reduce op
  (``deepspeed_shm_comm``; about a minute on 2 cores, once, cached under ``~/.cache/torch_extensions`` or
  ``$TORCH_EXTENSIONS_DIR``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from engine import dist
from engine.config import BatchConfig, Derived

# The repository's DeepSpeed templates (ds_configs/<name>.json).
TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "ds_configs"

# Keys a template must not set, and which part of our config owns each of them instead.
_OWNED_ELSEWHERE = {
    "optimizer": "the engine builds the torch optimizer from optim.* with its own parameter groups",
    "scheduler": "the engine sets the lr/wd schedule itself (optim.*)",
    "train_batch_size": "build_ds_config fills it from batch.* and the world size",
    "train_micro_batch_size_per_gpu": "build_ds_config fills it from batch.micro_batch x batch.repeats",
    "gradient_accumulation_steps": "build_ds_config fills it from batch.grad_accum",
    "gradient_clipping": "build_ds_config fills it from optim.clip_grad",
}


@dataclass
class DeepSpeedConfig:
    """Which DeepSpeed template the run starts from; the template alone says the precision (its fp16 / bf16 block)."""

    # ds_configs/ template name without .json (zero0..3_fp32/fp16/bf16, zero2/3_offload_bf16) or a path to a json file
    template: str = "zero2_bf16"

    def __post_init__(self) -> None:
        if not isinstance(self.template, str) or not self.template.strip():
            raise ValueError(
                f"template must name a file in ds_configs/ ({', '.join(available_templates())}) "
                f"or a json path, got {self.template!r}"
            )
        # Fail at config load, not after the data and model were built.
        _check_template(self.template, load_template(self.template))

    @property
    def precision(self) -> str:
        """fp32, fp16 or bf16: what the template enables."""
        return template_precision(load_template(self.template), f"template {self.template}")


# --------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------


def zero_stage(cfg: DeepSpeedConfig) -> int:
    """The ZeRO stage the configured template runs (0 without a zero_optimization block)."""
    return int(load_template(cfg.template).get("zero_optimization", {}).get("stage", 0))


def available_templates() -> list[str]:
    """Names of the templates in ds_configs/ (without .json), sorted."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.json"))


def _template_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    looks_like_path = name_or_path.endswith(".json") or os.sep in name_or_path or "/" in name_or_path
    if looks_like_path:
        if path.is_file():
            return path
        raise ValueError(
            f"DeepSpeed config file {name_or_path!r} does not exist; give an existing json path or one of "
            f"the templates in {TEMPLATE_DIR}: {', '.join(available_templates())}"
        )
    candidate = TEMPLATE_DIR / f"{name_or_path}.json"
    if candidate.is_file():
        return candidate
    raise ValueError(
        f"unknown DeepSpeed template {name_or_path!r}; available templates in {TEMPLATE_DIR}: "
        f"{', '.join(available_templates()) or '(none found)'} (or give a path to a json file)"
    )


def load_template(name_or_path: str) -> dict:
    """The template as a dict: a ds_configs/ name (``zero2_bf16``) or a path to a json file."""
    path = _template_path(name_or_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed template {path} is not valid json: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"DeepSpeed template {path} must hold a json object, got {type(data).__name__}")
    return data


def _enabled(block: Any) -> bool:
    return isinstance(block, dict) and bool(block.get("enabled", False))


def template_precision(template: dict, name: str = "template") -> str:
    """fp16 / bf16 when the template enables that block (``bf16`` or its alias ``bfloat16``), else fp32."""
    fp16 = _enabled(template.get("fp16"))
    bf16 = _enabled(template.get("bf16")) or _enabled(template.get("bfloat16"))
    if _enabled(template.get("amp")):
        raise ValueError(f"{name} enables DeepSpeed's apex 'amp' block; use its fp16 or bf16 block instead")
    if fp16 and bf16:
        raise ValueError(f"{name} enables both fp16 and bf16; enable at most one")
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def _check_template(name: str, template: dict) -> None:
    """No engine-owned key in the template, one precision at most, and not fp16 with ZeRO-0."""
    for key, owner in _OWNED_ELSEWHERE.items():
        if key in template:
            raise ValueError(f"template {name} sets '{key}', which it must not: {owner}. Remove '{key}' from it")
    precision = template_precision(template, f"template {name}")
    stage = (template.get("zero_optimization") or {}).get("stage", 0)
    if precision == "fp16" and stage == 0:
        raise ValueError(
            f"template {name} uses fp16 with ZeRO stage 0, which DeepSpeed (0.19.8) gets wrong with a torch "
            f"optimizer: the engine never scales the loss but its FP16 optimizer wrapper divides the gradients by the "
            f"loss scale (65536 at start), so the optimizer sees gradients / 65536 and gradient clipping never "
            f"triggers; use zero1_fp16 (or a higher stage) or bf16"
        )


def check_precision_supported(precision: str, accelerator: Any = None) -> None:
    """Raise ValueError when DeepSpeed's accelerator (CPU or CUDA) cannot train in ``precision``.

    DeepSpeed's CPU accelerator reports bf16 as always supported and fp16 only where oneDNN has native fp16
    kernels (``torch.ops.mkldnn._is_mkldnn_fp16_supported()``, e.g. AVX512-FP16 CPUs).
    """
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    acc = accelerator
    name = acc.device_name()
    if precision == "fp16" and not acc.is_fp16_supported():
        raise ValueError(
            f"the template enables fp16 but DeepSpeed's {name} accelerator does not support fp16 on this machine"
            + (" (its CPU has no native fp16 kernels)" if name == "cpu" else "")
            + "; pick a *_bf16 or *_fp32 template (ds.template=...)"
        )
    if precision == "bf16" and not acc.is_bf16_supported():
        raise ValueError(
            f"the template enables bf16 but DeepSpeed's {name} accelerator does not support bf16 on this machine "
            f"(e.g. a GPU older than Ampere); pick a *_fp16 or *_fp32 template (ds.template=...)"
        )


def build_ds_config(
    cfg: DeepSpeedConfig,
    batch: BatchConfig,
    derived: Derived,
    clip_grad: Optional[float],
    *,
    accelerator: Any = None,
) -> dict:
    """The complete DeepSpeed config: the template plus the fields the engine owns.

    * ``train_micro_batch_size_per_gpu`` = ``derived.clips_per_micro_step`` (micro_batch x repeats clips),
    * ``gradient_accumulation_steps`` = ``batch.grad_accum``,
    * ``train_batch_size`` = ``derived.global_clips`` (= micro x accumulation x ``derived.world_size``),
    * ``gradient_clipping`` = ``clip_grad`` (None -> 0.0, which DeepSpeed reads as off).

    Raises ValueError when the template sets one of those fields or an optimizer/scheduler block, or when
    DeepSpeed's accelerator (``accelerator``, default: the one DeepSpeed detected) cannot run its precision.
    """
    template = load_template(cfg.template)
    _check_template(cfg.template, template)
    check_precision_supported(template_precision(template), accelerator)
    if clip_grad is not None and not (clip_grad > 0 and math.isfinite(clip_grad)):
        raise ValueError(f"clip_grad must be a positive finite number or None (off), got {clip_grad}")
    micro = derived.clips_per_micro_step
    if micro != batch.micro_batch * batch.repeats:
        raise ValueError(
            f"derived.clips_per_micro_step={micro} does not match batch.micro_batch x batch.repeats = "
            f"{batch.micro_batch} x {batch.repeats}; derive it from this batch config"
        )
    train_batch = micro * batch.grad_accum * derived.world_size
    if train_batch != derived.global_clips:
        raise ValueError(
            f"derived.global_clips={derived.global_clips} but micro x grad_accum x world_size = "
            f"{micro} x {batch.grad_accum} x {derived.world_size} = {train_batch}; derive it from this batch config"
        )
    config = dict(template)
    config["train_micro_batch_size_per_gpu"] = micro
    config["gradient_accumulation_steps"] = batch.grad_accum
    config["train_batch_size"] = train_batch
    config["gradient_clipping"] = float(clip_grad) if clip_grad is not None else 0.0
    return config


def offloads_optimizer(ds_config: dict) -> bool:
    zero = ds_config.get("zero_optimization") or {}
    offload = zero.get("offload_optimizer") or {}
    return isinstance(offload, dict) and offload.get("device", "none") not in ("none", None)


# --------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
    """Wrap ``model`` and our torch ``optimizer`` in a DeepSpeed engine and return the engine.

    Makes sure a process group exists first (``engine.dist.init_distributed(require_group=True)``: a
    1-process group for a plain ``python`` run) and checks the config's batch fields against the actual
    world size. No DeepSpeed scheduler: set ``optimizer.param_groups[i]["lr"]`` yourself before each step.
    Returns the engine; ``engine.module`` is the model, ``engine.optimizer`` DeepSpeed's wrapper.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer built by the engine, got {type(optimizer)!r}")
    for key in ("optimizer", "scheduler"):
        if key in ds_config:
            raise ValueError(f"ds_config has a '{key}' block; {_OWNED_ELSEWHERE[key]}")
    if offloads_optimizer(ds_config) and not _is_ds_cpu_optimizer(optimizer):
        raise ValueError(
            f"the DeepSpeed config offloads the optimizer to CPU (zero_optimization.offload_optimizer), which "
            f"needs deepspeed.ops.adam.DeepSpeedCPUAdam (same parameter groups, adamw_mode=True), not "
            f"{type(optimizer).__name__}; build that optimizer instead or pick a template without offload"
        )
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    from timm.optim import Lars

    if stage > 0 and isinstance(optimizer, Lars):
        # LARS scales each weight tensor's step by that tensor's norms, but ZeRO 1-3 hand the optimizer one
        # flat partition per group (split across ranks): the trust ratio would be one group slice's, and would
        # change with the world size.
        raise ValueError(
            f"optim.name=lars needs ZeRO stage 0, but the DeepSpeed config uses stage {stage}: ZeRO 1-3 give the "
            f"optimizer flat partitions of whole parameter groups, so LARS's per-tensor trust ratio would be "
            f"computed over a group's slice on each rank; pick a zero0_* template (e.g. zero0_fp32 or zero0_bf16)"
        )
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) and not _is_ds_cpu_optimizer(optimizer):
        # ZeRO 1-3 refuse optimizers outside DeepSpeed's own tested list (Adam, AdamW, its CPU / fused ones)
        # unless the config allows them. Of build_optimizer's, only SGD gets here under ZeRO (LARS is refused
        # above): its update is elementwise, so the same on ZeRO's flat partitions as on the tensors
        # (tests/test_optim.py: training and exact resume under ZeRO-2). A copy: the caller's config stays as built.
        ds_config = {**ds_config, "zero_allow_untested_optimizer": True}
    dist.init_distributed(require_group=True)
    world = dist.get_world_size()
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    accum = ds_config.get("gradient_accumulation_steps")
    total = ds_config.get("train_batch_size")
    if None in (micro, accum, total):
        raise ValueError("ds_config lacks the batch fields; build it with engine.ds.build_ds_config")
    if micro * accum * world != total:
        raise ValueError(
            f"ds_config train_batch_size={total} but micro {micro} x accumulation {accum} x world size {world} "
            f"= {micro * accum * world}: the config was derived for another world size; call derive() with "
            f"the launched world size ({world})"
        )
    _announce_op_builds(ds_config)
    import deepspeed

    _align_deepspeed_logger()
    if _steps_at_construction(ds_config):
        with _inert_optimizer(optimizer):
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        optimizer.state.clear()  # forget the zero-gradient step: the first real update is Adam's step 1
    else:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def _announce_op_builds(ds_config: dict) -> None:
    """The first DeepSpeed start on a CPU machine JIT-compiles its ops with g++ (about a minute on 2 cores), which
    would otherwise look like a hang: say which ones and where they are cached."""
    if torch.cuda.is_available():
        return
    try:
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError:  # a torch without it: nothing to announce
        return
    ops = ["deepspeed_shm_comm"] + (["cpu_adam"] if offloads_optimizer(ds_config) else [])
    folders = {op: Path(_get_build_directory(op, verbose=False)) for op in ops}
    missing = [op for op, folder in folders.items() if not (folder / f"{op}.so").is_file()]
    if missing:
        logging.getLogger("train").info(
            "DeepSpeed compiles %s for this machine now (once; about a minute on 2 cores), cached in %s",
            " and ".join(missing), folders[missing[0]].parent)


def _steps_at_construction(ds_config: dict) -> bool:
    """ZeRO 0 with fp16/bf16: DeepSpeed wraps the optimizer in FP16_(Unfused)Optimizer, whose constructor
    runs ``optimizer.step()`` on zero gradients to allocate the state. With AdamW that step counts (the first
    real update then uses step-2 bias correction: 0.73x its size with betas (0.9, 0.95)) and decays the fp32
    master weights once. ZeRO 1-3 do not step at construction."""
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    low_precision = template_precision(ds_config, "ds_config") != "fp32"
    return stage == 0 and low_precision


@contextlib.contextmanager
def _inert_optimizer(optimizer: torch.optim.Optimizer):
    """lr = weight_decay = 0 in every group for the duration (a step changes no parameter), then restored."""
    groups = list(optimizer.param_groups)  # DeepSpeed may drop empty groups from the list; keep the dicts
    saved = [(group.get("lr"), group.get("weight_decay")) for group in groups]
    for group in groups:
        group["lr"] = 0.0
        if "weight_decay" in group:
            group["weight_decay"] = 0.0
    try:
        yield
    finally:
        for group, (lr, weight_decay) in zip(groups, saved):
            group["lr"] = lr
            if weight_decay is not None:
                group["weight_decay"] = weight_decay


def _is_ds_cpu_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except ImportError:  # pragma: no cover - depends on the DeepSpeed build
        return False
    return isinstance(optimizer, DeepSpeedCPUAdam)


def _align_deepspeed_logger() -> None:
    """DeepSpeed's own logger (own handler, no propagation) is made no chattier than the root logger."""
    root_level = logging.getLogger().getEffectiveLevel()
    ds_logger = logging.getLogger("DeepSpeed")
    if ds_logger.getEffectiveLevel() < root_level:  # never chattier than ours (WARNING on ranks > 0)
        ds_logger.setLevel(root_level)


# Grad norms the engine does not report itself (ZeRO 0 in fp32), measured by engine_step.
_fallback_norms: "weakref.WeakKeyDictionary[Any, torch.Tensor]" = weakref.WeakKeyDictionary()


def _reports_grad_norm(engine) -> bool:
    """ZeRO 1-3 and the fp16/bf16 wrappers record the global grad norm; ZeRO 0 fp32 (plain optimizer) does not."""
    return engine.zero_optimization_stage() > 0 or engine.fp16_enabled() or engine.bfloat16_enabled()


def engine_step(engine, loss: torch.Tensor) -> bool:
    """Backward and step for one micro-step; True when it was an accumulation boundary (an optimizer step).

    ``engine.backward`` divides the loss by ``gradient_accumulation_steps``; ``engine.step`` only updates the
    parameters (and zeroes the gradients) on the boundary. With fp16 a boundary step can still be skipped
    after an overflow: ``engine.was_step_applied()`` tells.
    """
    boundary = engine.is_gradient_accumulation_boundary()
    engine.backward(loss)
    if boundary and not _reports_grad_norm(engine):
        grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
        if grads:  # kept as a tensor: read (a host sync) only when a logging step asks for it
            norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
            _fallback_norms[engine] = torch.linalg.vector_norm(norms)
    engine.step()
    return boundary


def loss_scale(engine) -> Optional[float]:
    """Current fp16 loss scale; None when the engine does not run in fp16."""
    if not engine.fp16_enabled():
        return None
    optimizer = engine.optimizer
    if hasattr(optimizer, "loss_scale_config"):
        return float(optimizer.loss_scale_config.cur_scale)
    scale = getattr(optimizer, "cur_scale", None)
    return float(scale) if scale is not None else None


def global_grad_norm(engine) -> Optional[float]:
    """Global 2-norm of the gradients of the last optimizer step (before clipping); None before the first.

    ZeRO 1-3 and fp16/bf16 take DeepSpeed's value; for ZeRO 0 in fp32, which DeepSpeed does not measure,
    ``engine_step`` computes it from the reduced gradients just before the step.
    """
    if not _reports_grad_norm(engine):
        norm = _fallback_norms.get(engine)
        return None if norm is None else float(norm)
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def skipped_steps(engine) -> int:
    """Optimizer steps DeepSpeed skipped so far (fp16 overflow, or a non-finite gradient norm)."""
    return int(engine.skipped_steps)


def parameters_partitioned(engine) -> bool:
    """Whether each rank holds only a slice of every parameter (ZeRO-3): then a forward gathers parameters from
    every rank, so every rank must run the same number of forwards, and reading whole weights is a collective."""
    return engine.zero_optimization_stage() == 3


def full_parameters(engine) -> dict[str, torch.Tensor]:
    """Name -> full fp32 CPU copy of every model parameter (ZeRO-3 partitions gathered).

    A collective under ZeRO-3: call it on every rank. These are the module's weights (bf16/fp16 copies in
    mixed precision), not the optimizer's fp32 master weights.
    """
    named = list(engine.module.named_parameters())
    if parameters_partitioned(engine):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {name: p.detach().float().cpu().clone() for name, p in named}
    return {name: p.detach().float().cpu().clone() for name, p in named}


def input_dtype(engine) -> torch.dtype:
    """The dtype the engine's module computes in (DeepSpeed does not autocast). The models cast their input to it
    themselves; evaluation feeds clips in it to halve their memory."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


# Dense bf16 tensor-core peaks (datasheet, FLOP/s) for MFU; other devices report achieved FLOP/s only.
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}


def peak_flops() -> Optional[float]:
    """This process's device peak for MFU, or None (CPU, unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in _PEAK_BF16.items() if key in name), None)


def consolidated_fp32_state_dict(engine, checkpoint_dir: str, tag: str) -> Optional[dict[str, torch.Tensor]]:
    """The model's fp32 weights, whole: from the ZeRO checkpoint just written (the fp32 master weights, ZeRO
    1-3 gathered from every rank's partition), or from the module itself without ZeRO (where the module holds
    the fp32 weights, or the only copy). Call on every rank after the checkpoint; rank 0 gets the dict, the
    other ranks None."""
    if engine.zero_optimization_stage() == 0:
        weights = full_parameters(engine)
        return weights if dist.is_main_process() else None
    if not dist.is_main_process():
        return None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    return {name: tensor.float() for name, tensor in state.items()}


def cpu_adam_like(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """DeepSpeed's CPU Adam (AdamW mode) over the same parameter groups and hyper-parameters as ``optimizer``,
    for the offload templates: ZeRO-Offload steps on the CPU with its own fused kernel (JIT-built once).
    Only an AdamW can be replaced so: any other optimizer would silently become Adam."""
    if not isinstance(optimizer, torch.optim.AdamW):
        raise ValueError(
            f"the offload templates (zero_optimization.offload_optimizer) step the optimizer with DeepSpeed's CPU "
            f"Adam, which can only stand in for AdamW, not {type(optimizer).__name__}; use optim.name=adamw or "
            f"pick a template without offload (e.g. zero2_bf16 or zero3_bf16)"
        )
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    defaults = optimizer.defaults
    return DeepSpeedCPUAdam(optimizer.param_groups, lr=defaults["lr"], betas=defaults["betas"],
                            eps=defaults["eps"], weight_decay=defaults["weight_decay"], adamw_mode=True)


def checkpoint_globals() -> list:
    """The classes DeepSpeed pickles into its checkpoint files (loss-scaler settings, the ZeRO stage enum,
    addresses of optimizer-state fragments): records whose unpickling runs no code chosen by the file, for
    ``torch.serialization.safe_globals``."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def fp32_state_dict_from_checkpoint(root: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """The weights in the DeepSpeed checkpoint ``root/tag`` on disk, no engine needed: under ZeRO 1-3 the fp32
    master weights gathered from every rank's partition; under ZeRO-0, which saves no partitions to map back to
    names, the module's weights as fp32 (what ``consolidated_fp32_state_dict`` exports for it too)."""
    directory = Path(root) / tag
    if not any(directory.glob("*_optim_states.pt")):
        states = torch.load(directory / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {name: tensor.float() for name, tensor in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    return {name: tensor.float() for name, tensor in state.items()}
