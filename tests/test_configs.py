"""Every shipped recipe parses through its stage's parser, and the full recipes keep the original's settings."""

import json

import pytest
from transformers import TrainingArguments
from trl import DPOConfig, SFTConfig

from conftest import REPO
from mini_qwen_dpo import DPOScriptArguments
from mini_qwen_pt import PretrainArguments
from mini_qwen_sft import SFTScriptArguments
from utils.config import parse_config
from utils.crash_safety import CrashSafetyArguments
from utils.peft_utils import LoraArguments

STAGES = {"pt": (PretrainArguments, TrainingArguments), "sft": (SFTScriptArguments, SFTConfig),
          "dpo": (DPOScriptArguments, DPOConfig)}


def parse(stage: str, config: str, *flags: str):
    script, trainer = STAGES[stage]
    # bf16 is validated against the hardware when parsed: CPU here.
    return parse_config((script, LoraArguments, CrashSafetyArguments, trainer),
                        ["--config", str(REPO / "configs" / config), "--bf16", "false", "--use_cpu", "true", *flags])


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("prefix", ["", "demo_"])
def test_every_recipe_parses(stage, prefix):
    script_args, _, _, training_args = parse(stage, f"{prefix}{stage}.yaml")
    assert training_args.logging_nan_inf_filter is False
    assert training_args.max_grad_norm == 1.0 and training_args.weight_decay == 0.1
    assert training_args.lr_scheduler_type == "cosine_with_min_lr"
    assert training_args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}


def test_full_recipes_mirror_the_original():
    _, _, _, pt = parse("pt", "pt.yaml")
    assert (pt.learning_rate, pt.warmup_steps, pt.per_device_train_batch_size, pt.gradient_accumulation_steps,
            pt.num_train_epochs, pt.logging_steps) == (1e-4, 0.1, 12, 16, 1, 20)
    assert pt.save_steps < 13_523  # the original's 100,000 never fired
    pt_script, *_ = parse("pt", "pt.yaml")
    assert len(pt_script.data_files) == 20 and pt_script.block_size == 1024
    _, _, _, sft = parse("sft", "sft.yaml")
    assert (sft.learning_rate, sft.num_train_epochs, sft.max_length, sft.save_strategy, sft.save_total_limit) == (
        1e-5, 3, 1024, "epoch", 3)
    assert sft.assistant_only_loss
    dpo_script, _, _, dpo = parse("dpo", "dpo.yaml")
    assert (dpo.learning_rate, dpo.per_device_train_batch_size, dpo.gradient_accumulation_steps, dpo.beta,
            dpo.max_length, dpo_script.max_prompt_length) == (5e-7, 4, 16, 0.1, 1024, 512)


def test_cli_flag_overrides_yaml():
    script_args, lora_args, crash_args, training_args = parse(
        "pt", "demo_pt.yaml", "--packing", "document", "--learning_rate", "0.5", "--lora_r", "7",
        "--skip_samples", "0:8", "16:24")
    assert (script_args.packing, training_args.learning_rate, lora_args.lora_r) == ("document", 0.5, 7)
    assert crash_args.skip_samples == ["0:8", "16:24"]


def test_deepspeed_config_leaves_batch_and_precision_to_the_trainer():
    config = json.loads((REPO / "configs" / "ds_zero2.json").read_text())
    assert config["zero_optimization"]["stage"] == 2
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto"
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"


def test_lean_recipe_differs_from_the_full_one_only_where_marked():
    import yaml

    full = yaml.safe_load((REPO / "configs" / "pt.yaml").read_text())
    lean_text = (REPO / "configs" / "pt_lean.yaml").read_text()
    lean = yaml.safe_load(lean_text)
    marked = {line.split(":")[0] for line in lean_text.splitlines() if line.rstrip().endswith("# lean")}
    assert marked == {"weights_dtype", "stochastic_rounding", "per_device_train_batch_size",
                      "gradient_accumulation_steps", "activation_checkpointing", "output_dir"}
    assert {k for k in full.keys() | lean.keys() if full.get(k) != lean.get(k)} == marked
    assert (full["per_device_train_batch_size"] * full["gradient_accumulation_steps"]
            == lean["per_device_train_batch_size"] * lean["gradient_accumulation_steps"])
    script, _, _, training = parse("pt", "pt_lean.yaml")
    assert script.weights_dtype == "bfloat16" and script.stochastic_rounding and training.activation_checkpointing
