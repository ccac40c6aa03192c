"""Weights & Biases and SwanLab by `report_to: [wandb]` / `[swanlab]`: offline by default, each run inside output_dir.

transformers' Trainer already logs to both (WandbCallback, SwanLabCallback, chosen by `report_to`), and they take
their settings from environment variables. `configure_trackers` sets those the user has not set (the user's own
always win):
- the run folder: wandb's `<output_dir>/wandb/offline-run-*` (WANDB_DIR=<output_dir>), swanlab's
  `<output_dir>/swanlog/run-*` (SWANLAB_LOG_DIR);
- the project `mini_qwen` (WANDB_PROJECT, SWANLAB_PROJECT_NAME);
- the run name: `run_name` if the recipe or command line sets it, else output_dir's folder name, which is the
  stage in every recipe (`pt`, `sft`, `dpo`; `pt_lean` for the lean preset) (WANDB_NAME, SWANLAB_EXPERIMENT_NAME);
- the mode: `offline` with `tracker_offline` (the default), else `online` (WANDB_MODE, SWANLAB_MODE).
An offline run is uploaded later with `wandb sync <run folder>` / `swanlab sync <run folder>`.

swanlab 0.10 reads its settings with pydantic, nested by `_`: SWANLAB_PROJECT_NAME is its project's name, and
SWANLAB_PROJECT, the variable transformers' docstring names, fails to parse there (it would be the whole section).
transformers' SwanLabCallback (5.24) cannot start a run with swanlab >= 0.8: it asks `swanlab.get_run() is None`,
and get_run now raises when no run is active, so training fails at its first step. `report_to: [swanlab]` gets
SwanLab's own Trainer callback instead (swanlab.integration.transformers), which reads the same settings.
Importing this module imports neither package (swanlab is imported when report_to names it). A tracker that is not
installed is found before the Trainer is built, as a one-line ConfigError instead of transformers' RuntimeError.
"""

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from utils.compat import require
from utils.errors import ConfigError

PROJECT = "mini_qwen"
# Each tracker's environment variables for: the folder its runs go in, project, run name, mode.
TRACKER_ENV = {
    "wandb": ("WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME", "WANDB_MODE"),
    "swanlab": ("SWANLAB_LOG_DIR", "SWANLAB_PROJECT_NAME", "SWANLAB_EXPERIMENT_NAME", "SWANLAB_MODE"),
}
# wandb makes a `wandb/` folder of its own under WANDB_DIR; swanlab puts its runs straight into SWANLAB_LOG_DIR.
RUNS_FOLDER = {"wandb": ".", "swanlab": "swanlog"}

# The values this process set, told apart from the user's: a second stage run in the same process (tests, a
# notebook) gets its own output_dir and name instead of keeping the first stage's as if the user had set them.
_defaults_set: dict[str, str] = {}


@dataclass
class TrackerArguments:
    """Offline by default: a training machine often has no login to either service, or no internet at all, and an
    online tracker then stops at a login prompt or fails at start-up, while an offline run needs nothing and can be
    uploaded afterwards. `--tracker_offline false` logs online (after `wandb login` / `swanlab login`)."""

    tracker_offline: bool = field(default=True, metadata={
        "help": "with report_to wandb / swanlab: write the run into output_dir only, to upload later with "
                "`wandb sync` / `swanlab sync` (false: log online, which needs a login)"})


def _set_default(name: str, value: str) -> None:
    if name in os.environ and os.environ[name] != _defaults_set.get(name):
        return  # the user's own setting
    os.environ[name] = _defaults_set[name] = value


def configure_trackers(training_args, tracker_args: TrackerArguments) -> None:
    """For wandb and swanlab, where `report_to` names them: check that the package is installed, then set the
    defaults of its run folder, project, run name and mode (see the module docstring)."""
    output_dir = Path(training_args.output_dir).absolute()
    for tracker, (folder_var, project_var, name_var, mode_var) in TRACKER_ENV.items():
        if tracker not in training_args.report_to:
            continue
        if importlib.util.find_spec(tracker) is None:
            raise ConfigError(f"report_to names {tracker}, which is not installed: pip install {tracker}")
        _set_default(folder_var, str(output_dir / RUNS_FOLDER[tracker]))
        _set_default(project_var, PROJECT)
        _set_default(name_var, training_args.run_name or output_dir.name)
        _set_default(mode_var, "offline" if tracker_args.tracker_offline else "online")
    if "swanlab" in training_args.report_to:
        _use_swanlabs_own_callback()


def _use_swanlabs_own_callback() -> None:
    """A Trainer, when created, takes the callback class of each `report_to` name from this transformers table."""
    from swanlab.integration.transformers import SwanLabCallback
    from transformers.integrations import integration_utils

    require("swanlab_callback_table")  # transformers-internal: probed (utils.compat)

    integration_utils.INTEGRATION_TO_CALLBACK["swanlab"] = SwanLabCallback
