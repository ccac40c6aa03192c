"""A save that runs out of disk space stops with one line: where, how much is free there, about how much a
checkpoint needs, and the command that resumes; that command finishes the run from the last complete checkpoint.
Each writer's way of failing for space is recognised (OSError ENOSPC, safetensors' Rust error, torch.save's
causeless RuntimeError on a full filesystem); any other failure keeps its traceback."""

import errno
import logging
import shlex
from collections import namedtuple
from pathlib import Path

import pytest
import transformers.modeling_utils
from safetensors import SafetensorError

import mini_qwen_pt
import utils.disk
from conftest import REPO, cpu_flags
from utils.disk import folder_bytes, human_bytes, warn_if_low
from utils.errors import run_main

Usage = namedtuple("Usage", "total used free")
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def fake_disk(monkeypatch, free: int, total: int = 100 << 30) -> list:
    """utils.disk sees `free` bytes free; returns the paths it asked about."""
    asked = []
    monkeypatch.setattr(utils.disk, "disk_usage", lambda path: asked.append(path) or Usage(total, total - free, free))
    return asked


def test_full_disk_at_the_second_checkpoint_is_one_line_and_its_resume_command_finishes(tmp_path, monkeypatch,
                                                                                         capsys):
    real_save = transformers.modeling_utils.safe_save_file
    calls = []

    def save_file(*args, **kwargs):  # the weights of checkpoint-2 are written; those of checkpoint-4 hit a full disk
        calls.append(args[1])
        if len(calls) > 1:
            raise SafetensorError(SAFETENSORS_FULL)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    asked = fake_disk(monkeypatch, free=123_400_000)
    out = tmp_path / "out"
    flags = ["--config", str(REPO / "configs" / "demo_pt.yaml"), *cpu_flags(out, tmp_path / "cache"),
             "--data_files", str(REPO / "mini_data" / "pt"), "--block_size", "32", "--per_device_train_batch_size",
             "2", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
    with pytest.raises(SystemExit) as stopped:
        run_main(mini_qwen_pt.main, flags)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert f"error: No space left on device ({out}): 123.4 MB free on that filesystem" in line, line
    assert all(str(path).startswith(str(out)) for path in asked)  # the filesystem of output_dir was measured
    size = human_bytes(folder_bytes(out / "checkpoint-2"))
    assert f"a checkpoint needs about {size} (the size of checkpoint-2)" in line, line
    command = shlex.split(line.split("resume from the last complete checkpoint: ", 1)[1])
    assert command[0] == "python" and Path(command[1]).resolve() == REPO / "mini_qwen_pt.py"
    assert command[-2:] == ["--resume_from_checkpoint", "auto"]

    monkeypatch.undo()  # the disk has room again: the printed command resumes and finishes
    run_main(mini_qwen_pt.main, command[2:])
    assert "resume=auto: resuming from " + str(out / "checkpoint-2") in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-4" / "checkpoint_complete").is_file()


TORCH_WRITE_FAILED = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


@pytest.mark.parametrize("error, free, headline", [
    (OSError(errno.ENOSPC, "No space left on device"), 50 << 30, "No space left on device"),  # json, tokenizer
    (OSError(errno.EDQUOT, "Disk quota exceeded"), 50 << 30, "Disk quota exceeded"),
    (SafetensorError(SAFETENSORS_FULL), 50 << 30, "No space left on device"),
    # torch.save's writer names no cause: a full disk only where the filesystem is (nearly) full
    (RuntimeError(TORCH_WRITE_FAILED), 1 << 20, "No space left on device"),
    (RuntimeError(TORCH_WRITE_FAILED), 50 << 30, None),
    (OSError(errno.EIO, "Input/output error"), 1 << 20, None),
])
def test_each_writers_full_disk_is_one_line_and_other_failures_keep_their_traceback(error, free, headline, tmp_path,
                                                                                     monkeypatch, capsys):
    fake_disk(monkeypatch, free)

    def main(argv):
        raise RuntimeError("saving failed") from error  # as a wrapper around the writer would

    if headline is None:
        with pytest.raises(RuntimeError, match="saving failed"):
            run_main(main, ["--output_dir", str(tmp_path)])
        return
    with pytest.raises(SystemExit) as stopped:
        run_main(main, ["--output_dir", str(tmp_path)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (f"error: {headline} ({tmp_path}): {human_bytes(free)} free on that "
                                       "filesystem. Free some space and run it again\n")


def test_warn_if_low_below_two_checkpoints_of_room(tmp_path, monkeypatch, caplog):
    fake_disk(monkeypatch, free=3_000_000_000)
    with caplog.at_level(logging.WARNING, logger="mini_qwen"):
        assert not warn_if_low(tmp_path, 1_500_000_000)
        assert warn_if_low(tmp_path, 2_000_000_000)
    assert caplog.messages == [f"only 3.0 GB free on the filesystem of {tmp_path}, and a checkpoint takes 2.0 GB: "
                               "the next saves may run out of space; free some, or lower --save_total_limit"]
