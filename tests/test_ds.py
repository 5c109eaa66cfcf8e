"""engine.ds: DeepSpeed config building, and real DeepSpeed engines on CPU (one rank in-process, two via torchrun).

The first DeepSpeed process group on a machine JIT-compiles DeepSpeed's CPU shared-memory all-reduce op
(about a minute on 2 cores, cached in ~/.cache/torch_extensions afterwards); later runs take seconds.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import LAUNCH_VARS

from engine.config import BatchConfig, derive
from engine.ds import DeepSpeedConfig, available_templates, build_ds_config, load_template
from engine.optim import OptimConfig

# DeepSpeed 0.19.8 calls torch.distributed collectives that torch 2.14 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning")

ROOT = Path(__file__).resolve().parents[1]


class FakeAccelerator:
    def __init__(self, fp16=True, bf16=True, name="cpu"):
        self.fp16, self.bf16, self.name = fp16, bf16, name

    def device_name(self):
        return self.name

    def is_fp16_supported(self):
        return self.fp16

    def is_bf16_supported(self):
        return self.bf16


def _batch_and_derived(world_size=1, micro_batch=2, grad_accum=2, repeats=1):
    batch = BatchConfig(micro_batch=micro_batch, grad_accum=grad_accum, repeats=repeats, num_workers=0)
    return batch, derive(batch, OptimConfig(), world_size)


# --------------------------------------------------------------------------
# Config building (no DeepSpeed engine)
# --------------------------------------------------------------------------


def test_build_fills_batch_in_clips_accumulation_and_clipping():
    batch, derived = _batch_and_derived(world_size=4, micro_batch=2, grad_accum=3, repeats=2)
    cfg = DeepSpeedConfig(template="zero2_bf16")
    ds_config = build_ds_config(cfg, batch, derived, clip_grad=1.5, accelerator=FakeAccelerator())
    assert ds_config["train_micro_batch_size_per_gpu"] == 4  # 2 videos x 2 clips
    assert ds_config["gradient_accumulation_steps"] == 3
    assert ds_config["train_batch_size"] == 48 == derived.global_clips  # 4 clips x 3 x 4 ranks
    assert ds_config["gradient_clipping"] == 1.5
    assert ds_config["zero_optimization"] == load_template("zero2_bf16")["zero_optimization"]
    off = build_ds_config(cfg, batch, derived, clip_grad=None, accelerator=FakeAccelerator())
    assert off["gradient_clipping"] == 0.0
    assert "train_batch_size" not in load_template("zero2_bf16")  # the template is not modified


def test_built_config_is_accepted_by_deepspeed():
    from deepspeed.runtime.config import DeepSpeedConfig as DSConfig

    batch, derived = _batch_and_derived(micro_batch=3, grad_accum=2, repeats=2)
    for name in available_templates():
        if name == "zero0_fp16":  # refused, see test_zero0_fp16_is_refused
            continue
        ds_config = build_ds_config(DeepSpeedConfig(name), batch, derived, 1.0,
                                    accelerator=FakeAccelerator())
        parsed = DSConfig(ds_config)
        assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps,
                parsed.train_batch_size, parsed.gradient_clipping) == (6, 2, 12, 1.0)


@pytest.mark.parametrize("key", ["optimizer", "scheduler", "train_batch_size", "gradient_clipping"])
def test_templates_that_set_engine_owned_fields_are_rejected(tmp_path, key):
    template = dict(load_template("zero1_fp32"), **{key: {"type": "AdamW"} if key in ("optimizer", "scheduler") else 8})
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(template))
    with pytest.raises(ValueError, match=f"template {path} sets '{key}', which it must not"):
        DeepSpeedConfig(template=str(path))


def test_the_template_alone_states_the_precision():
    assert [DeepSpeedConfig(name).precision for name in ("zero2_bf16", "zero3_fp32", "zero1_fp16")] == \
        ["bf16", "fp32", "fp16"]
    assert {DeepSpeedConfig(name).precision for name in available_templates() if name != "zero0_fp16"} == \
        {"fp32", "fp16", "bf16"}


def test_unknown_template_lists_the_available_ones():
    with pytest.raises(ValueError) as err:
        DeepSpeedConfig(template="zero9_bf16")
    assert "unknown DeepSpeed template 'zero9_bf16'" in str(err.value)
    assert ", ".join(available_templates()) in str(err.value)
    assert "zero2_offload_bf16" in available_templates()
    with pytest.raises(ValueError, match="does not exist"):
        DeepSpeedConfig(template="/nowhere/ds.json")


def test_unsupported_precisions_fail_clearly():
    batch, derived = _batch_and_derived()
    with pytest.raises(ValueError, match="the template enables fp16 but DeepSpeed's cpu accelerator does not support fp16"):
        build_ds_config(DeepSpeedConfig("zero2_fp16"), batch, derived, None,
                        accelerator=FakeAccelerator(fp16=False))
    with pytest.raises(ValueError, match="does not support bf16"):
        build_ds_config(DeepSpeedConfig("zero2_bf16"), batch, derived, None,
                        accelerator=FakeAccelerator(bf16=False, name="cuda"))


def test_batch_fields_must_come_from_the_same_batch_config():
    batch, derived = _batch_and_derived(world_size=2)
    other = BatchConfig(micro_batch=5, grad_accum=2, repeats=1, num_workers=0)
    with pytest.raises(ValueError, match="clips_per_micro_step"):
        build_ds_config(DeepSpeedConfig("zero1_fp32"), other, derived, None, accelerator=FakeAccelerator())


# --------------------------------------------------------------------------
# Real DeepSpeed engines, one rank, in this process
# --------------------------------------------------------------------------

STEPS, ACCUM, MICRO = 3, 2, 4
LRS = (1e-2, 5e-3, 2e-3)  # our own schedule, written into the param groups before each optimizer step


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _optimizer(model):
    """Two groups, as the engine builds them: weights decay, biases do not and (here) learn at half the lr."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05, "lr_mult": 1.0},
                              {"params": no_decay, "weight_decay": 0.0, "lr_mult": 0.5}],
                             lr=LRS[0], betas=(0.9, 0.95))


def _set_lr(optimizer, step):
    for group in optimizer.param_groups:
        group["lr"] = LRS[step] * group["lr_mult"]


def _data(rank=0):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(MICRO, 8, generator=g), torch.randn(MICRO, 4, generator=g)) for _ in range(ACCUM)]


def _reference(clip=None):
    """Plain torch: the same steps, loss / accumulation per micro-step, optional clipping by global norm."""
    model, data = _model(), _data()
    optimizer = _optimizer(model)
    norms = []
    for step in range(STEPS):
        _set_lr(optimizer, step)
        for x, y in data:
            (torch.nn.functional.mse_loss(model(x), y) / ACCUM).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))))
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


def _train(ds, template, precision, clip=None):
    batch = BatchConfig(micro_batch=MICRO, grad_accum=ACCUM, repeats=1, num_workers=0)
    ds_config = build_ds_config(DeepSpeedConfig(template), batch, derive(batch, OptimConfig(), 1), clip)
    model = _model()
    optimizer = _optimizer(model)
    engine = ds.initialize(model, optimizer, ds_config)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    losses, boundaries, norms, scales = [], [], [], []
    for step in range(STEPS):
        _set_lr(optimizer, step)
        step_loss = 0.0
        for x, y in _data():
            assert engine.is_gradient_accumulation_boundary() == (len(boundaries) % ACCUM == ACCUM - 1)
            loss = torch.nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
            step_loss += loss.item() / ACCUM
            boundaries.append(ds.engine_step(engine, loss))
        losses.append(step_loss)
        norms.append(ds.global_grad_norm(engine))
        scales.append(ds.loss_scale(engine))
    assert ds.skipped_steps(engine) == 0
    steps = {int(state["step"]) for state in optimizer.state.values()}
    return SimpleNamespace(params=ds.full_parameters(engine), losses=losses, boundaries=boundaries, norms=norms,
                           scales=scales, adam_steps=steps)


def _max_diff(params, reference):
    assert params.keys() == reference.keys()
    return max((params[n] - reference[n]).abs().max().item() for n in params)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp32_engine_matches_plain_torch_exactly(ds_group, stage):
    run = _train(ds_group, f"zero{stage}_fp32", "fp32")
    reference, ref_norms = _reference()
    assert run.boundaries == [False, True] * STEPS
    assert run.losses[-1] < run.losses[0]
    assert run.scales == [None] * STEPS
    assert run.adam_steps == {STEPS}
    assert run.norms == pytest.approx(ref_norms, rel=1e-6)
    assert _max_diff(run.params, reference) == 0.0  # bit for bit, ZeRO-3 included (DeepSpeed 0.19.8, CPU)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp32_gradient_clipping_matches_torch(ds_group, stage):
    reference, ref_norms = _reference(clip=0.5)
    assert min(ref_norms) > 0.5  # clipping is active on every step
    run = _train(ds_group, f"zero{stage}_fp32", "fp32", clip=0.5)
    assert run.norms == pytest.approx(ref_norms, rel=1e-6)  # the norm before clipping
    assert _max_diff(run.params, reference) < 1e-6  # measured: 0 for ZeRO 0-2, 1.5e-8 for ZeRO-3


@pytest.mark.parametrize("template", ["zero0_bf16", "zero1_bf16", "zero2_bf16", "zero3_bf16",
                                      "zero1_fp16", "zero2_fp16", "zero3_fp16"])
def test_mixed_precision_engine_trains_close_to_fp32(ds_group, template):
    from deepspeed.accelerator import get_accelerator

    precision = template.split("_")[-1]
    if precision == "fp16" and not get_accelerator().is_fp16_supported():
        pytest.skip("DeepSpeed's CPU accelerator reports no fp16 support on this CPU")
    run = _train(ds_group, template, precision)
    reference, ref_norms = _reference()
    assert run.boundaries == [False, True] * STEPS
    assert run.losses[-1] < run.losses[0]
    # One Adam step per optimizer step: ZeRO-0's wrapper steps once at construction; initialize() undoes that.
    assert run.adam_steps == {STEPS}
    assert run.norms == pytest.approx(ref_norms, rel=1e-2)
    assert (run.scales[0] is not None) == (precision == "fp16")
    # measured on CPU: bf16 1.7e-3 (all stages), fp16 2.3e-4 (parameters move ~1e-2 per step)
    assert _max_diff(run.params, reference) < (5e-3 if precision == "bf16" else 1e-3)


def test_zero0_fp16_is_refused():
    with pytest.raises(ValueError, match="fp16 with ZeRO stage 0, which DeepSpeed .* gets wrong.*use zero1_fp16"):
        DeepSpeedConfig("zero0_fp16")


def test_offload_template_needs_deepspeed_cpu_adam(ds_group):
    batch, derived = _batch_and_derived()
    ds_config = build_ds_config(DeepSpeedConfig("zero2_offload_bf16"), batch, derived, None)
    model = _model()
    with pytest.raises(ValueError, match="needs deepspeed.ops.adam.DeepSpeedCPUAdam"):
        ds_group.initialize(model, _optimizer(model), ds_config)


def test_config_for_another_world_size_is_rejected(ds_group):
    batch, derived = _batch_and_derived(world_size=2)
    ds_config = build_ds_config(DeepSpeedConfig("zero1_fp32"), batch, derived, None)
    model = _model()
    with pytest.raises(ValueError, match=r"world size 1 .*call derive\(\) with the launched world size"):
        ds_group.initialize(model, _optimizer(model), ds_config)


# --------------------------------------------------------------------------
# Two ranks through torchrun
# --------------------------------------------------------------------------

TWO_RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as torch_dist
    from engine import dist, ds
    from engine.config import BatchConfig, derive
    from engine.optim import OptimConfig

    info = dist.init_distributed()
    dist.setup_logging(info.rank)
    assert (info.world_size, info.launcher) == (2, "torchrun"), info

    def build():
        torch.manual_seed(0)  # the same initial weights on both ranks
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)

    def data(rank):  # each rank sees different data
        g = torch.Generator().manual_seed(100 + rank)
        return [(torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)) for _ in range(2)]

    # Plain torch on the whole global batch: the mean over both ranks' losses, / 2 for accumulation.
    ref_model, ref_opt = build()
    for step in range(3):
        for (x0, y0), (x1, y1) in zip(data(0), data(1)):
            loss = (torch.nn.functional.mse_loss(ref_model(x0), y0) + torch.nn.functional.mse_loss(ref_model(x1), y1))
            (loss / 4).backward()
        ref_norm = float(torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.3))
        ref_opt.step()
        ref_opt.zero_grad()
    reference = torch.cat([p.detach().reshape(-1) for p in ref_model.parameters()])

    results = {}
    batch = BatchConfig(micro_batch=4, grad_accum=2, repeats=1, num_workers=0)
    for template in ("zero0_fp32", "zero2_fp32"):
        model, optimizer = build()
        initial = torch.cat([p.detach().clone().reshape(-1) for p in model.parameters()])
        ds_config = ds.build_ds_config(ds.DeepSpeedConfig(template), batch,
                                       derive(batch, OptimConfig(), info.world_size), clip_grad=0.3)
        engine = ds.initialize(model, optimizer, ds_config)
        losses = []
        for step in range(3):
            for x, y in data(info.rank):
                loss = torch.nn.functional.mse_loss(engine(x), y)
                ds.engine_step(engine, loss)
            losses.append(loss.item())
        flat = torch.cat([p.reshape(-1) for p in ds.full_parameters(engine).values()])
        gathered = [torch.empty_like(flat) for _ in range(2)]
        torch_dist.all_gather(gathered, flat)
        norms = [None, None]
        torch_dist.all_gather_object(norms, ds.global_grad_norm(engine))
        results[template] = {"max_rank_diff": (gathered[0] - gathered[1]).abs().max().item(),
                             "max_ref_diff": (flat - reference).abs().max().item(),
                             "moved": (flat - initial).abs().max().item(),
                             "norms": norms, "ref_norm": ref_norm, "losses": losses}
    dist.barrier()
    if dist.is_main_process():
        json.dump(results, open(sys.argv[1], "w"))
    dist.cleanup()
""")


@pytest.mark.e2e
def test_two_ranks_with_torchrun_end_with_identical_parameters(tmp_path):
    script, result = tmp_path / "two_ranks.py", tmp_path / "result.json"
    script.write_text(TWO_RANK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(result)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for template, out in json.loads(result.read_text()).items():
        assert out["max_rank_diff"] == 0.0, template
        assert out["moved"] > 0 and out["losses"][-1] < out["losses"][0], template
        assert out["max_ref_diff"] < 1e-6, template  # = plain torch on the global batch (measured: ~1e-8 or 0)
        assert out["norms"][0] == out["norms"][1] == pytest.approx(out["ref_norm"], rel=1e-6), template
