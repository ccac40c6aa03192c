"""Every setting checked when the command line is parsed, before any data or model is touched.

A value out of range used to surface minutes later as whatever broke first (`--block_size 0`: a ZeroDivisionError
in packing; `--learning_rate -1`: torch's optimizer; `--anomaly_min_history 0`: statistics.median of nothing).
RULES holds the allowed values of the numeric settings users set, the repo's own dataclass fields and the
TrainingArguments / TRL fields alike: an interval in math notation ("[2, inf)": 2 or more; "(0, 1)": strictly
between), alternatives joined by " or ", or a tuple of choices. A key `Class.field` overrides `field` for one
config class, where one name means two things (DPO's beta must be positive; GRPO's beta of 0 turns the KL term off).
None always passes: for every optional field here it means "the default". A list is checked item by item.
The values are checked as argparse parsed them (recipe keys included), before TrainingArguments and the TRL
configs run their own checks, so that one message form covers them all.
"""

import difflib
from dataclasses import fields

from utils.chat import SYSTEM_PROMPT_STRATEGIES, TURN_MODES
from utils.errors import ConfigError
from utils.packing import PACKING_MODES

POSITIVE, AT_LEAST_0, AT_LEAST_1 = "(0, inf)", "[0, inf)", "[1, inf)"

RULES = {
    # the repo's own arguments (mini_qwen_*.py, utils/prepare.py, lora.py, crash_safety.py, throughput.py,
    # memory_plan.py); the choices are checked here too, as the data workers would only meet them mid-preparation
    "block_size": "[2, inf)",  # a sample needs at least one token and the next one to predict
    "PretrainArguments.packing": PACKING_MODES,  # SFTConfig.packing is a bool
    "turns": TURN_MODES,
    "system_prompt_strategy": SYSTEM_PROMPT_STRATEGIES,
    "data_workers": AT_LEAST_1,
    "min_kept_fraction": "[0, 1]",
    "max_prompt_length": AT_LEAST_1,
    "heldout_fraction": "(0, 1)",
    "identity_repeat": AT_LEAST_0,
    "peak_tflops": POSITIVE,
    "muon_momentum": "[0, 1)",
    "lora_r": AT_LEAST_1,
    "lora_alpha": POSITIVE,
    "lora_dropout": "[0, 1)",
    "anomaly_factor": AT_LEAST_0,  # 0 turns the spike rule off
    "anomaly_window": AT_LEAST_1,
    "anomaly_min_history": AT_LEAST_1,  # the running median of no losses is undefined
    "num_gpus": AT_LEAST_1,
    # TrainingArguments
    "learning_rate": POSITIVE,
    "per_device_train_batch_size": AT_LEAST_1,
    "per_device_eval_batch_size": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1,
    "max_steps": "-1 or [1, inf)",  # -1: run num_train_epochs
    "num_train_epochs": POSITIVE,
    "warmup_steps": AT_LEAST_0,  # under 1: a share of the steps
    "weight_decay": AT_LEAST_0,
    "max_grad_norm": AT_LEAST_0,  # 0: no clipping
    "adam_beta1": "[0, 1)",
    "adam_beta2": "[0, 1)",
    "adam_epsilon": AT_LEAST_0,
    "label_smoothing_factor": "[0, 1)",
    "logging_steps": POSITIVE,  # under 1: a share of the steps, as for save_steps and eval_steps
    "save_steps": POSITIVE,
    "eval_steps": POSITIVE,
    "seed": "[0, 4294967295]",  # numpy's seed range
    "data_seed": "[0, 4294967295]",
    "dataloader_num_workers": AT_LEAST_0,
    "ddp_timeout": POSITIVE,
    # TRL configs (SFT, DPO and the other preference methods, GRPO) and mini_qwen_eval.py's decoding flags
    "max_length": AT_LEAST_1,
    "max_completion_length": AT_LEAST_1,
    "beta": POSITIVE,  # the preference losses divide by it, or flatten to a constant at 0
    "GKDConfig.beta": "[0, 1]",  # GKD: 0 forward KL, 1 reverse KL, between them a generalised JSD
    "lmbda": "[0, 1]",
    "GRPOConfig.beta": AT_LEAST_0,
    "label_smoothing": "[0, 0.5)",  # at 0.5 chosen and rejected weigh the same: nothing to learn
    "desirable_weight": POSITIVE,
    "undesirable_weight": POSITIVE,
    "cpo_alpha": AT_LEAST_0,
    "num_generations": "[2, inf)",  # GRPO compares each answer with the others of its group
    "num_iterations": AT_LEAST_1,
    "num_completions_to_print": AT_LEAST_0,
    "temperature": POSITIVE,
    "top_p": "(0, 1]",
    "top_k": AT_LEAST_0,  # 0: off
    "min_p": "[0, 1]",
    "repetition_penalty": POSITIVE,
    "sweep_repetition_penalty": POSITIVE,
    "no_repeat_ngram_size": AT_LEAST_0,
    "max_new_tokens": AT_LEAST_1,
}


def _within(part: str, value: float) -> bool:
    if part[0] not in "[(":
        return value == float(part)
    low, high = (float(bound) for bound in part[1:-1].split(","))
    return (low < value if part[0] == "(" else low <= value) and (value < high if part[-1] == ")" else value <= high)


def _describe(rule: str) -> str:
    """A rule in words: [2, inf) as ">= 2", (0, inf) as "> 0", a bounded interval as "in [0, 1)"."""
    def one(part: str) -> str:
        if part[0] in "[(" and part.endswith("inf)"):
            return f"{'>=' if part[0] == '[' else '>'} {part[1:].split(',')[0]}"
        return f"in {part}" if part[0] in "[(" else part
    return " or ".join(one(part) for part in rule.split(" or "))


def _problem(rule, value, whole: bool) -> str | None:
    if isinstance(rule, tuple):
        return None if value in rule else f"must be one of {', '.join(rule)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "must be a number"  # a recipe's true or [1] reaches here unconverted (argparse converts only text)
    if whole and not isinstance(value, int):
        return "must be a whole number"
    if not any(_within(part, value) for part in rule.split(" or ")):  # NaN fails every comparison
        return f"must be {_describe(rule)}"
    return None


def check_namespace(namespace, dataclass_types=()) -> None:
    """Raise ConfigError naming the first value outside RULES. `namespace`: what argparse parsed, checked before
    the config classes' own __post_init__ checks see it (some of those name no flag: GRPO's num_generations);
    `dataclass_types`: the classes its fields belong to, for Class.field rules and int fields. mini_qwen_eval.py
    passes its argparse Namespace alone."""
    owner = {f.name: (t.__name__, f.type is int) for t in dataclass_types for f in fields(t)}
    for name, value in vars(namespace).items():
        kind, whole = owner.get(name, ("", False))
        rule = RULES.get(f"{kind}.{name}", RULES.get(name))
        if rule is None or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            problem = _problem(rule, item, whole)
            if problem:
                shown = item if isinstance(item, (int, float)) else repr(item)
                raise ConfigError(f"--{name} {shown}: {problem}")


def unknown_setting(from_flags: list[str], from_recipe: list[str], known: list[str]) -> str:
    """The message for what the parser left over: the first unknown flag (or recipe key), with the closest
    valid name."""
    if from_flags:
        word = from_flags[0]
        if not word.startswith("-"):
            return f"unexpected argument {word!r}: each setting is a --flag followed by its value"
        name = word.lstrip("-").split("=")[0].replace("-", "_")
        message, prefix = f"unknown flag --{name}", "--"
    else:
        name = from_recipe[0][2:]  # TrlParser hands the recipe's unused keys back as --key value pairs
        message, prefix = f"unknown key {name!r} in the --config recipe", ""
    close = difflib.get_close_matches(name, known, n=1)
    return message + (f": did you mean {prefix}{close[0]}?" if close else "")

