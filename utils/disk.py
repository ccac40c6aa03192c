"""A full disk as one sentence instead of a traceback, and a warning before it comes to that.

A save that runs out of space fails in one of three ways, depending on the writer: an OSError with errno ENOSPC
(json, the tokenizer files), safetensors' Rust writer (`SafetensorError: ... No space left on device (os error
28)`, no OSError), or torch.save's C++ writer (optimizer.pt, the largest file: `RuntimeError: [enforce fail at
inline_container.cc] . unexpected pos ...`, which names no cause at all). `full_disk_message` recognises each
(quotas, EDQUOT, alike) and says where, how much is free, roughly how much a checkpoint needs, and how to resume
from the last complete checkpoint.
"""

import errno
import logging
import os
import shlex
import sys
from pathlib import Path
from shutil import disk_usage

logger = logging.getLogger("mini_qwen")

FULL = (errno.ENOSPC, errno.EDQUOT)
TRAINING_STAGES = ("mini_qwen_pt", "mini_qwen_sft", "mini_qwen_dpo", "mini_qwen_grpo")


def human_bytes(count: float) -> str:
    """Decimal units (kB, MB, GB, TB), in every message about disk space."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:.0f} bytes"


def free_space(path: str | Path):
    """disk_usage of the filesystem `path` is on (or would be: its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return disk_usage(path)


def folder_bytes(folder: str | Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def largest_checkpoint(output_dir: str | Path) -> tuple[Path, int] | None:
    """The largest checkpoint-N folder in output_dir and its size: what the next save needs, roughly (the one
    that failed is partly written, so the largest, not the newest)."""
    sizes = [(folder, folder_bytes(folder)) for folder in Path(output_dir).glob("checkpoint-*") if folder.is_dir()]
    return max(sizes, key=lambda item: item[1], default=None)


def warn_if_low(output_dir: str | Path, checkpoint_bytes: int) -> bool:
    """Log a warning, and return True, when output_dir's filesystem has room for fewer than two more checkpoints:
    the next saves may fail, and save_total_limit deletes an old checkpoint only after the new one is written."""
    free = free_space(output_dir).free
    if free >= 2 * checkpoint_bytes:
        return False
    logger.warning("only %s free on the filesystem of %s, and a checkpoint takes %s: the next saves may run out of "
                   "space; free some, or lower --save_total_limit", human_bytes(free), output_dir,
                   human_bytes(checkpoint_bytes))
    return True


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _full_disk_errno(err: BaseException) -> int | None:
    if isinstance(err, OSError) and err.errno in FULL:
        return err.errno
    return next((code for code in FULL if f"(os error {code})" in str(err)), None)


def _torch_write_failure(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and ("unexpected pos" in str(err) or "file write failed" in str(err))


def full_disk_message(err: BaseException, argv: list[str], main) -> str | None:
    """One line for an exception that a full disk (or quota) caused, or None for any other exception. `argv` and
    `main` are run_main's: they give output_dir (where checkpoints are) and the command to resume with."""
    causes = list(_chain(err))
    code = next((code for cause in causes if (code := _full_disk_errno(cause))), None)
    if code is None and not any(_torch_write_failure(cause) for cause in causes):
        return None  # decided before reading argv: any other exception goes on as it came
    from utils.config import recipe_value, repo_path

    output_dir = repo_path(recipe_value(argv, "output_dir", "trainer_output"))
    path = next((cause.filename for cause in causes if isinstance(cause, OSError) and cause.filename), output_dir)
    usage = free_space(path)
    if code is None:
        # torch.save's writer names no cause: a write that failed on a filesystem left (nearly) full failed for
        # space; any other failing write keeps its traceback
        if usage.free >= usage.total / 100:
            return None
        code = errno.ENOSPC
    message = f"{os.strerror(code)} ({path}): {human_bytes(usage.free)} free on that filesystem"
    largest = largest_checkpoint(output_dir)
    if largest:
        message += f", a checkpoint needs about {human_bytes(largest[1])} (the size of {largest[0].name})"
    script = Path(getattr(sys.modules.get(main.__module__), "__file__", None) or "-").resolve()
    if script.stem not in TRAINING_STAGES:
        return message + ". Free some space and run it again"
    kept = [arg for i, arg in enumerate(argv) if not (arg.startswith("--resume_from_checkpoint")
                                                      or i and argv[i - 1] == "--resume_from_checkpoint")]
    shown = script.relative_to(Path.cwd()) if script.is_relative_to(Path.cwd()) else script
    launcher = "python" if int(os.environ.get("WORLD_SIZE", "1")) == 1 else "accelerate launch <your launch flags>"
    return (f"{message}. Free some space, then resume from the last complete checkpoint: {launcher} "
            + shlex.join([str(shown), *kept, "--resume_from_checkpoint", "auto"]))
