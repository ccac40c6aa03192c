"""Reward functions for the GRPO stage (mini_qwen_grpo.py), in the signature TRL's GRPOTrainer calls:
`reward(prompts, completions, **dataset_columns) -> list[float]`, one float per completion.

Math word problems in GSM8K's shape end their solution with a line `#### <number>`; the model is asked to do the same
(utils.formats normalises every problem's answer to that number). Two rewards check it, and GRPO logs each one apart
(rewards/<name>/mean):
- correct_answer: 1 when the number on the completion's `####` line equals the problem's answer, else 0;
- answer_format: 1 when the completion ends with a `#### <number>` line; 0.25 when it states some number but not on
  such a line (a first step a young model can learn from); 0 otherwise.

`reward_funcs` in the recipe names these, or `module:function` for one of yours (same signature), or a reward-model
folder (mini_qwen_rm.py), which GRPOTrainer loads as a sequence classifier and scores with.
"""

import importlib
import re
from pathlib import Path

from utils.errors import ConfigError

NUMBER = r"-?\d+(?:\.\d+)?"
FINAL_LINE = re.compile(rf"^\s*####\s*({NUMBER})\s*$")
ANY_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def parse_number(text: str) -> float | None:
    """'1,234' / '12.50' / '-3' as a float; None for anything else."""
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """The number after the last `####` of a text (GSM8K's convention), or None."""
    if "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip().split("\n", 1)[0]
    match = ANY_NUMBER.match(tail)
    return parse_number(match.group()) if match else None


def _text(completion) -> str:
    """A completion is a string (plain prompts) or a list with one assistant message (conversational prompts)."""
    return completion if isinstance(completion, str) else "".join(message["content"] for message in completion)


def correct_answer(completions, answer, **kwargs) -> list[float]:
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        given = final_number(_text(completion))
        rewards.append(float(given is not None and abs(given - float(expected)) < 1e-6))
    return rewards


def answer_format(completions, **kwargs) -> list[float]:
    rewards = []
    for completion in completions:
        lines = [line for line in _text(completion).strip().splitlines() if line.strip()]
        if lines and FINAL_LINE.match(lines[-1]):
            rewards.append(1.0)
        elif ANY_NUMBER.search(_text(completion)):
            rewards.append(0.25)
        else:
            rewards.append(0.0)
    return rewards


BUILT_IN = {"correct_answer": correct_answer, "answer_format": answer_format}


def resolve_reward_funcs(specs: list[str], locate=str) -> list:
    """Recipe names → what GRPOTrainer takes: built-in functions, imported `module:function`s, reward-model folders
    (passed on as paths; `locate` turns a relative one into a path, e.g. utils.config.repo_path)."""
    if not specs:
        raise ConfigError("reward_funcs is empty: name at least one reward (" + ", ".join(BUILT_IN) + ")")
    resolved = []
    for spec in specs:
        if spec in BUILT_IN:
            resolved.append(BUILT_IN[spec])
        elif (Path(locate(spec)) / "config.json").is_file():
            resolved.append(locate(spec))
        elif ":" in spec:
            module_name, function_name = spec.split(":", 1)
            try:
                resolved.append(getattr(importlib.import_module(module_name), function_name))
            except (ImportError, AttributeError) as err:
                raise ConfigError(f"reward function {spec}: {err}") from None
        else:
            raise ConfigError(f"unknown reward function {spec!r}: one of {', '.join(BUILT_IN)}, a module:function, "
                              "or a reward-model folder (with config.json)")
    return resolved
