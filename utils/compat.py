"""The library internals this repo relies on, each with a start-up probe, and the locked versions they were tested
with (constraints.txt).

Every other call into transformers, TRL, accelerate and DeepSpeed goes through their public API. These four reach
inside, each for a reason given where it is used; a release may move them without notice, so the code that uses one
calls `require(NAME)` first. On a version without it the run stops with one line naming the package, the version
found and the version tested, never a deep traceback and never a silent change of behaviour:

- `dpo_prepare_dataset`: `DPOTrainer._prepare_dataset`, overridden by mini_qwen_dpo.py so that TRL does not
  tokenize again what utils.prepare already tokenized (tests/test_compat.py proves both give the same rows);
- `trl_fused_head_switch`: `trl.trainer.utils._use_triton`, the switch utils.modeling flips so that a CPU run scores
  only the labelled positions;
- `trainer_load_from_checkpoint`: `Trainer._load_from_checkpoint`, with which utils.training loads the weights of a
  finished run's checkpoint (resumed at its last step: nothing to train, the final model still to write);
- `swanlab_callback_table`: `transformers.integrations.integration_utils.INTEGRATION_TO_CALLBACK`, where
  utils.trackers puts swanlab's own callback.
"""

import importlib
import inspect
import re
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from utils.errors import ConfigError

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
INSTALL_LOCKED = "pip install -r requirements.txt -c constraints.txt"


def locked_versions(path: Path = CONSTRAINTS) -> dict[str, str]:
    """name -> version of every `name==version` line of the lock (names normalised as pip does)."""
    if not path.is_file():
        return {}
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line.strip())
        if match:
            pins[normalise(match[1])] = match[2]
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _dpo_prepare_dataset() -> bool:
    from trl import DPOTrainer

    method = getattr(DPOTrainer, "_prepare_dataset", None)
    return method is not None and list(inspect.signature(method).parameters) == [
        "self", "dataset", "processing_class", "args", "dataset_name"]


def _trl_fused_head_switch() -> bool:
    trl_utils = importlib.import_module("trl.trainer.utils")
    return callable(getattr(trl_utils, "_use_triton", None))


def _trainer_load_from_checkpoint() -> bool:
    from transformers import Trainer

    method = getattr(Trainer, "_load_from_checkpoint", None)
    return method is not None and list(inspect.signature(method).parameters)[:2] == ["self", "resume_from_checkpoint"]


def _swanlab_callback_table() -> bool:
    from transformers.integrations import integration_utils

    return isinstance(getattr(integration_utils, "INTEGRATION_TO_CALLBACK", None), dict)


# name -> (package, what is used, who uses it, the probe)
INTERNALS: dict[str, tuple[str, str, str, Callable[[], bool]]] = {
    "dpo_prepare_dataset": ("trl", "DPOTrainer._prepare_dataset(self, dataset, processing_class, args, dataset_name)",
                            "mini_qwen_dpo.py skips TRL's tokenization with it", _dpo_prepare_dataset),
    "trl_fused_head_switch": ("trl", "trl.trainer.utils._use_triton",
                              "utils.modeling scores only labelled positions on a CPU with it",
                              _trl_fused_head_switch),
    "trainer_load_from_checkpoint": ("transformers", "Trainer._load_from_checkpoint(self, resume_from_checkpoint)",
                                     "utils.training loads a finished run's checkpoint without training with it",
                                     _trainer_load_from_checkpoint),
    "swanlab_callback_table": ("transformers", "integration_utils.INTEGRATION_TO_CALLBACK",
                               "utils.trackers installs swanlab's own callback in it", _swanlab_callback_table),
}


def require(name: str) -> None:
    """Stops with one line when the installed package lacks the internal `name` (see the module docstring)."""
    package, what, used_by, probe = INTERNALS[name]
    try:
        present = probe()
    except (ImportError, AttributeError, TypeError, ValueError):
        present = False
    if not present:
        found, tested = installed_version(package), locked_versions().get(package, "unknown")
        raise ConfigError(f"{package} {found} has no {what} ({used_by}); this repo was tested with {package} "
                          f"{tested}: {INSTALL_LOCKED}")


def unlocked_versions(packages: tuple[str, ...]) -> list[str]:
    """'name found (locked: tested)' for each of `packages` installed at another version than the lock's (torch's
    local build tag aside: the lock has no torch)."""
    locked = locked_versions()
    moved = []
    for package in packages:
        found, tested = installed_version(package), locked.get(normalise(package))
        if tested and found not in (tested, "not installed"):  # optional ones (flash-attn) may be absent
            moved.append(f"{package} {found} (locked: {tested})")
    return moved
