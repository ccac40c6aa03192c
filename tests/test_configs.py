"""Every shipped recipe parses through its stage's parser, and the full recipes keep the original's settings."""

import json

import pytest
import torch
from transformers import TrainingArguments
from trl import DPOConfig, GRPOConfig, RewardConfig, SFTConfig

from conftest import REFERENCE, REPO, needs_shared
from mini_qwen_dpo import DPOScriptArguments
from mini_qwen_grpo import GRPOScriptArguments
from mini_qwen_pt import PretrainArguments
from mini_qwen_rm import RewardScriptArguments
from mini_qwen_sft import SFTScriptArguments
from utils.config import parse_config
from utils.crash_safety import CrashSafetyArguments
from utils.lora import LoraArguments

STAGES = {"pt": (PretrainArguments, TrainingArguments), "sft": (SFTScriptArguments, SFTConfig),
          "dpo": (DPOScriptArguments, DPOConfig), "rm": (RewardScriptArguments, RewardConfig),
          "grpo": (GRPOScriptArguments, GRPOConfig)}


def parse(stage: str, config: str, *flags: str):
    script, trainer = STAGES[stage]
    # bf16 is validated against the hardware when parsed: CPU here.
    return parse_config((script, LoraArguments, CrashSafetyArguments, trainer),
                        ["--config", str(REPO / "configs" / config), "--bf16", "false", "--use_cpu", "true", *flags])


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("prefix", ["", "demo_"])
def test_every_recipe_parses_and_its_schedule_warms_up_then_ends_at_a_tenth_of_the_peak(stage, prefix):
    """Seed 002's schedule, as the Trainer will build it from the recipe (not as the YAML spells it): the rate
    rises over the warmup, peaks at learning_rate and ends at 10% of it."""
    from transformers import get_scheduler

    *_, args = parse(stage, f"{prefix}{stage}.yaml")
    total = 1000
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=args.learning_rate)
    (factor,) = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(total),
                              num_training_steps=total, scheduler_specific_kwargs=args.lr_scheduler_kwargs).lr_lambdas
    warmup = args.get_warmup_steps(total)
    rates = [factor(step) for step in range(total + 1)]
    assert warmup > 0 and rates[0] < rates[warmup] == pytest.approx(1.0)
    assert max(rates) == pytest.approx(1.0) and rates[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("method, config_name, loss_type", [("orpo", "ORPOConfig", None),
                                                            ("simpo", "CPOConfig", "simpo"), ("kto", "KTOConfig", "kto")])
def test_dpo_recipe_runs_every_method_without_its_dpo_only_keys(method, config_name, loss_type, capsys):
    from mini_qwen_dpo import parse_method_args

    flags = ["--config", str(REPO / "configs" / "dpo.yaml"), "--bf16", "false", "--use_cpu", "true"]
    script_args, *_, training_args = parse_method_args([*flags, "--method", method])
    assert type(training_args).__name__ == config_name and script_args.method == method
    assert training_args.learning_rate == 5e-7 and training_args.max_length == 1024  # the recipe's shared keys
    left_out = capsys.readouterr().err
    assert "truncation_mode" in left_out  # a DPO-only recipe key: left out, and said so
    # DPOTrainer's loss_type: left out where the method has none, replaced by the method's own where it has one
    assert ("loss_type" in left_out) == (loss_type is None)
    assert getattr(training_args, "loss_type", None) == loss_type
    with pytest.raises(ValueError, match="loss_weights"):  # a DPO-only flag given on purpose: refused, not dropped
        parse_method_args([*flags, "--method", method, "--loss_weights", "1.0"])


def logged_learning_rates(log: str) -> tuple[int, list[tuple[int, float]]]:
    """(total optimizer steps, [(step, learning rate)]) of one of the original's nohup logs (logging every 20)."""
    import ast
    import re

    text = (REFERENCE / "logs" / log).read_text(errors="replace")
    total = int(re.findall(r"\d+/(\d+) \[", text)[-1])
    logs = [ast.literal_eval(entry) for entry in re.findall(r"\{'loss': [^}]*\}", text)]
    return total, [(20 * (index + 1), entry["learning_rate"]) for index, entry in enumerate(logs)]


@needs_shared
@pytest.mark.parametrize("stage, log", [("pt", "output_pt.log"), ("dpo", "output_dpo.log")])
def test_full_recipes_schedule_the_learning_rate_as_the_original_logged_it(stage, log):
    """Our recipe's scheduler over the original run's length gives the warmup it logged, then its cosine with the
    10% floor that seed 002 asks for: ours = 0.1 peak + 0.9 theirs (the original decayed to 0)."""
    import torch
    from transformers import get_scheduler

    total, logged = logged_learning_rates(log)
    *_, args = parse(stage, f"{stage}.yaml")
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=args.learning_rate)
    schedule = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(total),
                             num_training_steps=total, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    (factor,) = schedule.lr_lambdas
    warmup = args.get_warmup_steps(total)
    assert len(logged) > 20 and any(step < warmup for step, _ in logged) and any(step > warmup for step, _ in logged)
    for step, theirs in logged:
        expected = theirs if step <= warmup else 0.1 * args.learning_rate + 0.9 * theirs
        assert factor(step) * args.learning_rate == pytest.approx(expected, rel=1e-6), f"step {step}"


def test_full_recipes_keep_the_original_batch_and_lengths():
    pt_script, _, _, pt = parse("pt", "pt.yaml")
    # 12 x 16 accumulation x 6 GPUs of 1024 tokens: the original's 1.18M tokens per optimizer step
    assert pt.per_device_train_batch_size * pt.gradient_accumulation_steps * 6 * pt_script.block_size == 1_179_648
    assert len(pt_script.data_files) == 20 and pt.save_steps < 13_523  # the original's save_steps 100,000 never fired
    _, _, _, sft = parse("sft", "sft.yaml")
    assert sft.assistant_only_loss and sft.max_length == 1024
    dpo_script, _, _, dpo = parse("dpo", "dpo.yaml")
    assert (dpo.beta, dpo.max_length, dpo_script.max_prompt_length) == (0.1, 1024, 512)


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
