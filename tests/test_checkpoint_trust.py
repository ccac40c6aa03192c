"""Checkpoints are verified against the file list in their completion marker before a resume, and a resume of a
run that already reached its last step trains nothing."""

import json
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import mini_qwen_pt
from conftest import REPO, cpu_flags
from utils.callbacks import CheckpointCompleteCallback, ThroughputCallback
from utils.checkpoint import COMPLETE_MARKER, checkpoint_problem
from utils.errors import run_main


def pt_flags(tmp_path, max_steps: int, save_steps: int) -> list[str]:
    """A tiny PT run on mini_data: 32-token blocks, 2 per step, so an epoch (~590 steps) never ends in the test."""
    return ["--config", str(REPO / "configs" / "demo_pt.yaml"), *cpu_flags(tmp_path / "out", tmp_path / "cache"),
            "--data_files", str(REPO / "mini_data" / "pt"), "--block_size", "32", "--per_device_train_batch_size", "2",
            "--max_steps", str(max_steps), "--save_strategy", "steps", "--save_steps", str(save_steps),
            "--save_total_limit", "3"]


def test_a_damaged_checkpoint_is_skipped_by_auto_and_refused_by_name(tmp_path, capsys):
    flags = pt_flags(tmp_path, max_steps=4, save_steps=2)
    mini_qwen_pt.main(flags)
    damaged = tmp_path / "out" / "checkpoint-4"
    weights = damaged / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:  # a copy cut short, a disk that filled up
        handle.truncate(size // 2)
    capsys.readouterr()

    with pytest.raises(SystemExit) as stopped:
        run_main(mini_qwen_pt.main, flags + ["--resume_from_checkpoint", str(damaged)])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith(f"error: {damaged} changed since it was saved")
    assert f"model.safetensors: {size // 2:,} bytes, the marker says {size:,}" in error

    mini_qwen_pt.main(flags + ["--resume_from_checkpoint", "auto"])
    log = capsys.readouterr().out
    assert f"skipping {damaged}, which changed since it was saved: model.safetensors: {size // 2:,} bytes" in log
    assert f"resuming from {tmp_path / 'out' / 'checkpoint-2'}" in log
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4]
    assert checkpoint_problem(damaged) is None  # saved again by the resumed run


def test_resuming_a_finished_run_trains_nothing_and_writes_the_final_model(tmp_path, capsys):
    flags = pt_flags(tmp_path, max_steps=3, save_steps=3)
    mini_qwen_pt.main(flags)
    out = tmp_path / "out"
    uninterrupted = load_file(out / "model.safetensors")
    # As after a crash between the last checkpoint and the final save.
    (out / "model.safetensors").unlink()
    (out / "report.md").unlink()
    capsys.readouterr()

    run_main(mini_qwen_pt.main, flags + ["--resume_from_checkpoint", "auto"])  # returns: exit status 0
    log = capsys.readouterr().out
    assert "is at step 3, the last of this run: nothing to train" in log
    assert "step 4/3" not in log
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    resumed = load_file(out / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)
    assert (out / "report.md").is_file()


def test_the_marker_lists_every_file_and_any_change_is_named(tmp_path):
    folder = tmp_path / "checkpoint-5"
    (folder / "global_step5").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    (folder / "global_step5" / "optim_states.pt").write_bytes(b"moments" * 100)
    args = SimpleNamespace(output_dir=str(tmp_path), world_size=1, per_device_train_batch_size=2,
                           gradient_accumulation_steps=1)
    CheckpointCompleteCallback().on_save(args, SimpleNamespace(global_step=5, is_world_process_zero=True), None)
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert sorted(marker["files"]) == ["global_step5/optim_states.pt", "model.safetensors"]
    assert checkpoint_problem(folder) is None

    (folder / "global_step5" / "optim_states.pt").write_bytes(b"Moments" * 100)  # same size, one byte flipped
    assert checkpoint_problem(folder) == ("global_step5/optim_states.pt: same size (700 bytes) but other contents "
                                          "than when it was saved")
    (folder / "global_step5" / "optim_states.pt").unlink()
    assert checkpoint_problem(folder) == "global_step5/optim_states.pt: missing"
    # A marker written before markers listed the files: accepted as before.
    (folder / COMPLETE_MARKER).write_text(json.dumps({k: v for k, v in marker.items() if k != "files"}))
    assert checkpoint_problem(folder) is None


def test_eta_is_never_negative():
    callback = ThroughputCallback()
    callback._window = torch.tensor([640, 640 * 32, 640])  # tokens, squared lengths, LM-head positions
    callback._window_start, callback._window_step = time.perf_counter() - 1.0, 10
    callback.peak, callback.on_gpu, callback.distributed = None, False, False
    state = SimpleNamespace(global_step=11, max_steps=10, log_history=[{"loss": 1.0}], is_world_process_zero=False)
    logs = {"loss": 1.0}
    callback.on_log(SimpleNamespace(world_size=1), state, None, logs=logs)
    assert logs["eta_seconds"] == 0
