"""DeepSpeed templates: valid for DeepSpeed itself, no optimizer/scheduler/batch blocks, precision as named."""

import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "ds_configs").glob("*.json"))


def test_every_stage_and_precision_has_a_template():
    names = {path.stem for path in TEMPLATES}
    expected = {f"zero{stage}_{precision}" for stage in range(4) for precision in ("fp32", "fp16", "bf16")}
    assert expected <= names


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_template_is_valid_and_consistent_with_its_name(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    template = json.loads(path.read_text())
    # The engine owns these: one source of truth for the optimizer, the schedule and the batch.
    forbidden = {"optimizer", "scheduler", "train_batch_size", "train_micro_batch_size_per_gpu",
                 "gradient_accumulation_steps"}
    assert not forbidden & template.keys()
    filled = dict(template, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, train_batch_size=2)
    config = DeepSpeedConfig(filled)  # pydantic: unknown keys are rejected
    stage, precision = path.stem.split("_")[0], path.stem.split("_")[-1]
    assert config.zero_optimization_stage == int(stage.removeprefix("zero"))
    assert config.float16_config.enabled == (precision == "fp16")
    assert config.bfloat16_config.enabled == (precision == "bf16")
    assert ("offload" in path.stem) == (config.zero_config.offload_optimizer is not None)
