"""One source of truth per run: a YAML recipe (`--config`) plus CLI overrides, parsed into dataclasses.

Every field of the stage's script arguments and of TrainingArguments / SFTConfig / DPOConfig is both a YAML key
and a `--flag`; the CLI wins. Relative paths are taken from the repository root, so a stage runs the same from
any working directory (the original had to be started from the repo root).
"""

import dataclasses
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import datasets
import torch
import transformers
import yaml
from trl import TrlParser

from utils.errors import ConfigError, MissingInputError
from utils.validation import check_namespace, unknown_setting

REPO_ROOT = Path(__file__).resolve().parent.parent


def repo_path(path: str | None) -> str | None:
    """A relative path that exists from the current directory is kept; any other relative path is taken from the
    repository root."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    return str(REPO_ROOT / path)


def run_stage(stage: str, argv: list[str]) -> None:
    """Run a stage script (mini_qwen_<stage>.py) as its own process, the way a user runs it: tools drive the stages
    this way rather than importing them, so utils/ never depends on a top-level script."""
    command = [sys.executable, str(REPO_ROOT / f"mini_qwen_{stage}.py"), *argv]
    if subprocess.run(command).returncode:
        raise SystemExit(f"{stage} stage failed: {shlex.join(command)}")


def _prepare_only(argv: list[str]) -> bool:
    for index, arg in enumerate(argv):
        if arg.startswith("--prepare_only="):
            return arg.split("=", 1)[1].lower() in ("true", "1", "yes")
        if arg == "--prepare_only":
            return index + 1 == len(argv) or argv[index + 1].lower() not in ("false", "0", "no")
    return False


def recipe_value(argv: list[str], key: str, default: str) -> str:
    """One key's value before the whole command line is parsed (`--key V`, `--key=V`, else the recipe's, else
    `default`): for a key that decides which dataclasses parse the rest."""
    for index, arg in enumerate(argv):
        if arg == f"--{key}" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(f"--{key}="):
            return arg.split("=", 1)[1]
    recipe = _recipe(argv)
    return str(recipe.get(key, default)) if recipe else default


def _recipe(argv: list[str]) -> dict | None:
    for index, arg in enumerate(argv):
        path = argv[index + 1] if arg == "--config" and index + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if path is not None:
            if not Path(repo_path(path)).is_file():
                from utils.errors import MissingInputError

                raise MissingInputError(f"--config {path}: no such recipe file")
            return yaml.safe_load(Path(repo_path(path)).read_text()) or {}
    return None


class _Parser(TrlParser):
    def error(self, message):
        # argparse would print its usage block and exit: one line instead (a value of the wrong type, say)
        raise ConfigError(message)

    def parse_known_args(self, args=None, namespace=None):
        namespace, remaining = super().parse_known_args(args, namespace)
        check_namespace(namespace, self.dataclass_types)  # before the config classes are built from it
        return namespace, remaining


def _one_recipe(argv: list[str]) -> list[str]:
    """`argv` with its recipe as `--config PATH`, PATH taken from the repository root like every other path
    (TrlParser reads only that spelling, from the current directory); one recipe at most."""
    at = [i for i, arg in enumerate(argv) if arg == "--config" or arg.startswith("--config=")]
    paths = [argv[i].split("=", 1)[1] if "=" in argv[i] else argv[i + 1] if i + 1 < len(argv) else "" for i in at]
    if len(at) > 1:
        raise ConfigError(f"--config given {len(at)} times ({', '.join(paths)}): give one recipe, and override "
                          "its keys with flags")
    if not at:
        return argv
    path = repo_path(paths[0])
    if not path or not os.path.isfile(path):
        raise MissingInputError(f"{paths[0] or '--config'}: no such recipe file (--config)")
    return [*argv[:at[0]], "--config", path, *argv[at[0] + (1 if "=" in argv[at[0]] else 2):]]


def parse_config(dataclass_types: tuple, argv: list[str] | None = None,
                 unused_recipe_keys: tuple[set[str], str] = (set(), "")):
    """The dataclasses of `dataclass_types` from the recipe and flags, every value checked (utils.validation)
    before anything else runs: each problem is a ConfigError of one line. `unused_recipe_keys` (keys, why) are
    recipe keys written for a sibling (the DPO recipe's DPO-only keys under ORPO): not used, and printed; the same
    keys given as flags are still refused."""
    argv = _one_recipe(sys.argv[1:] if argv is None else list(argv))
    if _prepare_only(argv) and not torch.cuda.is_available():
        # Preparing data needs no GPU (it is meant to run on a CPU machine), but TrainingArguments refuses a
        # GPU recipe's bf16 where there is none: the trainer's device is the CPU for this run.
        argv += ["--use_cpu", "true"]
    # accelerate passes accelerate_config.yaml's relative DeepSpeed JSON path on as is; anchor it to the repo too.
    deepspeed_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if deepspeed_file:
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = repo_path(deepspeed_file)
    try:
        *parsed, from_recipe, from_flags = _Parser(dataclass_types).parse_args_and_config(
            args=argv, return_remaining_strings=True, separate_remaining_strings=True)
    except ValueError as err:  # a config class's own check (__post_init__), or a recipe that is not a mapping
        raise ConfigError(" ".join(str(err).split())) from err
    unused, why = unused_recipe_keys
    recipe_keys = from_recipe[::2]  # TrlParser hands the recipe's unknown keys back as "--key", "value" pairs
    left_out = sorted(key[2:] for key in recipe_keys if key[2:] in unused)
    if left_out:
        print(f"recipe keys left out ({why}): {', '.join(left_out)}", file=sys.stderr)
    from_recipe = [item for key, value in zip(recipe_keys, from_recipe[1::2]) if key[2:] not in unused
                   for item in (key, value)]
    if from_flags or from_recipe:
        known = [f.name for dataclass_type in dataclass_types for f in dataclasses.fields(dataclass_type)]
        raise ConfigError(unknown_setting(from_flags, from_recipe, known))
    return tuple(parsed)


def setup_logging(training_args) -> logging.Logger:
    """Log on the main process only (8 GPUs must not print 8 times); warnings and errors everywhere."""
    level = logging.INFO if training_args.process_index == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=level, force=True)
    transformers.utils.logging.set_verbosity(logging.WARNING)  # its INFO dumps whole configs
    datasets.utils.logging.set_verbosity(logging.WARNING)
    logger = logging.getLogger("mini_qwen")
    logger.setLevel(level)
    return logger


def parse_stage_args(script_arguments, trainer_config, argv: list[str] | None = None,
                     unused_recipe_keys: tuple[set[str], str] = (set(), "")):
    """What every stage parses, from one YAML plus CLI: (its own arguments, LoRA, crash safety, trackers, the
    trainer's config); `unused_recipe_keys` as in parse_config."""
    from utils.crash_safety import CrashSafetyArguments
    from utils.lora import LoraArguments
    from utils.memory_plan import MemoryPlanArguments, plan_or_check
    from utils.trackers import TrackerArguments

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--memory_plan" in argv and not torch.cuda.is_available():
        argv += ["--use_cpu", "true"]  # a plan needs no GPU; TrainingArguments would refuse bf16 without one
    *parsed, plan_args = parse_config((script_arguments, LoraArguments, CrashSafetyArguments, TrackerArguments,
                                       trainer_config, MemoryPlanArguments), argv, unused_recipe_keys)
    plan_or_check(plan_args, parsed[0], parsed[-1])
    return tuple(parsed)


def start_run(training_args, tracker_args) -> logging.Logger:
    """What every stage does once parsed: output_dir anchored to the repo; wandb / swanlab set up
    (utils.trackers); rank-0 logging; bf16 falling back to fp16 where unsupported."""
    from utils.compat import INSTALL_LOCKED, unlocked_versions
    from utils.modeling import resolve_mixed_precision
    from utils.report import LIBRARIES
    from utils.trackers import configure_trackers

    training_args.output_dir = repo_path(training_args.output_dir)
    configure_trackers(training_args, tracker_args)  # after output_dir is anchored: the run folders go inside it
    logger = setup_logging(training_args)
    moved = unlocked_versions(LIBRARIES)
    if moved:
        logger.warning("libraries at versions this repo was not tested with: %s; the tested set: %s",
                       ", ".join(moved), INSTALL_LOCKED)
    resolve_mixed_precision(training_args)
    return logger
