"""The pretraining stage under several processes (gloo on CPU), through the launchers users run: torchrun,
`accelerate launch` (DDP and DeepSpeed ZeRO-2) and `run.sh --gpus 2`.

One reference run (1 process, accumulation 2) is compared with two ranks at accumulation 1: the same samples per
step, so the same loss and gradient-norm curves, with the two ranks on disjoint halves. Runs are tiny (block 32,
micro-batch 2, 6 steps) and use the repo's own mini_data, so they need nothing from ../shared.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, cpu_flags
from utils.checkpoint import COMPLETE_MARKER, CheckpointError, check_resumable
from utils.errors import run_main

STEPS = 6
TRACE_HOOK = REPO / "tests" / "trace_hook"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stage_flags(output_dir: Path, cache_dir: Path, accumulation: int, *extra) -> list[str]:
    return ["--config", str(REPO / "configs" / "demo_pt.yaml"), *cpu_flags(output_dir, cache_dir),
            "--data_files", str(REPO / "mini_data" / "pt"), "--block_size", "32", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", str(accumulation), "--max_steps", str(STEPS),
            "--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "3", *extra]


def launch(launcher: str, output_dir: Path, cache_dir: Path, accumulation: int, *extra, trace: bool = True,
           check: bool = True, wait: bool = True):
    """Run the PT stage with `launcher`: python (one process), torchrun / ddp / deepspeed (two processes)."""
    prefix = {
        "python": [sys.executable],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                     "--master_port", str(free_port())],
        "ddp": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "accelerate_config_ddp.yaml"), "--num_processes", "2", "--main_process_port",
                str(free_port())],
        "deepspeed": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                      str(REPO / "accelerate_config.yaml"), "--num_processes", "2", "--main_process_port",
                      str(free_port())],
        "zero2_muon": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(REPO / "accelerate_config.yaml"), "--deepspeed_config_file",
                       str(REPO / "configs" / "ds_zero2_muon.json"), "--num_processes", "2", "--main_process_port",
                       str(free_port())],
        "deepspeed1": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(REPO / "accelerate_config.yaml"), "--num_processes", "1", "--main_process_port",
                       str(free_port())],
    }[launcher]
    env = dict(os.environ, PYTHONPATH=str(TRACE_HOOK), OMP_NUM_THREADS="1")
    if trace:
        env["MINI_QWEN_TRACE_DIR"] = str(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    command = [*prefix, str(REPO / "mini_qwen_pt.py"), *stage_flags(output_dir, cache_dir, accumulation, *extra)]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def curves(run_dir: Path) -> tuple[list[float], list[float]]:
    log = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return [e["loss"] for e in log if "loss" in e], [e["grad_norm"] for e in log if "grad_norm" in e]


def traces(run_dir: Path, rank: int, micro_batches: int) -> list[list]:
    lines = (run_dir / f"trace-rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:micro_batches]]  # the loader may fetch one batch ahead


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, accumulation 2; it also builds the shared cache."""
    root = tmp_path_factory.mktemp("multiprocess")
    result = launch("python", root / "reference", root / "cache", 2)
    assert "[cache] prepared pt data written" in result.stdout
    return root


def assert_same_curves(run: Path, reference: Path):
    losses, grad_norms = curves(run)
    reference_losses, reference_grad_norms = curves(reference)
    assert losses == pytest.approx(reference_losses, rel=2e-4)
    assert grad_norms == pytest.approx(reference_grad_norms, rel=2e-3)


@pytest.fixture(scope="module")
def ddp_run(reference):
    """Two ranks, accumulation 1, through `run.sh --gpus 2 --ddp`: it prepares first (a plain process), then
    launches, and the launched ranks only read what was prepared (the test asserts they say so)."""
    run = reference / "ddp"
    run.mkdir()
    env = dict(os.environ, PYTHONPATH=str(TRACE_HOOK), MINI_QWEN_TRACE_DIR=str(run), OMP_NUM_THREADS="1")
    result = subprocess.run(
        ["bash", str(REPO / "run.sh"), "pt", "--demo", "--gpus", "2", "--ddp",
         *stage_flags(run, reference / "cache", 1)[2:]],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return run, result.stdout + result.stderr


def test_two_ddp_ranks_match_one_rank_with_twice_the_accumulation(reference, ddp_run):
    run, output = ddp_run
    assert "launch: 2 process(es), no DeepSpeed" in output
    assert "[cache] prepared pt data written" not in output and "reusing prepared pt data" in output
    assert "find_unused_parameters" not in output  # DDP's warning about the wasted graph search is gone
    assert output.count("'loss'") == STEPS  # logs printed by rank 0 only
    assert_same_curves(run, reference / "reference")
    # Every step, the two ranks trained on disjoint halves of what the single process trained on.
    single = traces(reference / "reference", 0, 2 * STEPS)
    rank0, rank1 = traces(run, 0, STEPS), traces(run, 1, STEPS)
    for step in range(STEPS):
        assert not {str(s) for s in rank0[step]} & {str(s) for s in rank1[step]}
        assert sorted(rank0[step] + rank1[step]) == sorted(single[2 * step] + single[2 * step + 1])


def test_deepspeed_zero2_with_two_processes_matches_too(reference):
    run = reference / "zero2"
    result = launch("deepspeed", run, reference / "cache", 1)
    assert "launch: DeepSpeed ZeRO-2 on 2 process(es)" in result.stdout  # the config's "auto" values were accepted
    assert_same_curves(run, reference / "reference")
    assert (run / "model.safetensors").is_file()  # the final save gathers the model out of DeepSpeed
    # Its partitioned optimizer state cannot be resumed by another number of processes: one line says what to do.
    refused = launch("deepspeed1", run, reference / "cache", 2, "--resume_from_checkpoint", str(run / "checkpoint-3"),
                     trace=False, check=False)
    assert refused.returncode != 0
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert "ZeRO-2 checkpoint of 2 processes" in line and "ds_to_universal" in refused.stderr
    assert "site-packages/deepspeed" not in refused.stderr  # no traceback from inside DeepSpeed


def test_muon_under_ddp_and_under_deepspeed_zero2_trains_the_same(reference):
    """torch's Muon beside AdamW (utils/muon.py) on two DDP ranks, and DeepSpeed's own Muon on two ZeRO-2 ranks (the
    matrices split across the ranks' partitions): the same update rule and rates, so the same losses."""
    muon = ("--use_muon", "true", "--max_grad_norm", "0")
    ddp = launch("torchrun", reference / "muon_ddp", reference / "cache", 1, *muon)
    zero2 = launch("zero2_muon", reference / "muon_zero2", reference / "cache", 1, *muon)
    assert "launch: DeepSpeed ZeRO-2 on 2 process(es)" in zero2.stdout and "launch: 2 process(es)" in ddp.stdout
    ddp_losses, zero2_losses = curves(reference / "muon_ddp")[0], curves(reference / "muon_zero2")[0]
    assert len(ddp_losses) == STEPS and zero2_losses == pytest.approx(ddp_losses, rel=1e-4)
    adamw_losses = curves(reference / "reference")[0]  # the same data and recipe with AdamW: Muon changed the run
    assert ddp_losses[-1] != pytest.approx(adamw_losses[-1], rel=1e-4)


def test_a_checkpoint_resumes_on_another_process_count_with_the_same_global_batch(reference, ddp_run):
    # 2 ranks x accumulation 1 -> 1 process x accumulation 2, and the reverse: the same data position, so the
    # resumed curve (steps 1-3 come from the checkpoint's history, 4-6 are new) is the uninterrupted one.
    for source, target, launcher, accumulation in ((ddp_run[0], "two_to_one", "python", 2),
                                                   (reference / "reference", "one_to_two", "torchrun", 1)):
        launch(launcher, reference / target, reference / "cache", accumulation, "--resume_from_checkpoint",
               str(source / "checkpoint-3"), trace=False)
        assert len(curves(reference / target)[0]) == STEPS
        assert_same_curves(reference / target, reference / "reference")


def test_another_global_batch_is_refused_at_start_up_with_the_flag_that_fits(reference, capsys):
    from mini_qwen_pt import main

    checkpoint = reference / "reference" / "checkpoint-3"
    with pytest.raises(SystemExit) as stopped:  # the script's own entry point, in this process (no launch to pay)
        run_main(main, stage_flags(reference / "wrong_batch", reference / "cache", 1, "--resume_from_checkpoint",
                                   str(checkpoint)))
    stderr = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines() == [
        f"error: {checkpoint}: written with 1 process(es) x micro-batch 2 x accumulation 2 = 4 samples per step; "
        "this run has 1 process(es) x micro-batch 2 x accumulation 1 = 2 samples per step. The step count, data "
        "position and learning-rate schedule are in steps of 4 samples. Resume with --gradient_accumulation_steps 2 "
        "to keep it."]


def test_deepspeed_and_plain_checkpoints_are_not_mixed(tmp_path):
    class Args:
        world_size, per_device_train_batch_size, gradient_accumulation_steps = 2, 2, 1

    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"step": 3, "world_size": 2, "per_device_train_batch_size": 2,
                                                          "gradient_accumulation_steps": 1, "global_batch": 4}))
    check_resumable(str(checkpoint), Args, deepspeed=False)
    with pytest.raises(CheckpointError, match="plain PyTorch .* under DeepSpeed"):
        check_resumable(str(checkpoint), Args, deepspeed=True)
    (checkpoint / "global_step3").mkdir()
    check_resumable(str(checkpoint), Args, deepspeed=True)
    with pytest.raises(CheckpointError, match="DeepSpeed run, and this run is without it"):
        check_resumable(str(checkpoint), Args, deepspeed=False)


def test_sigterm_to_the_launcher_stops_every_rank_at_one_checkpoint_and_resume_finishes_the_curve(reference):
    run = reference / "sigterm"
    process = launch("torchrun", run, reference / "cache", 1, "--save_steps", "1000", trace=False, wait=False)
    seen = []
    for line in process.stdout:  # wait until training is under way
        seen.append(line)
        if "'loss'" in line:
            break
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert ("".join(seen) + stdout).count("SIGTERM received") == 2  # both ranks got it from the launcher
    assert "stopped by SIGTERM" in stderr
    (marker,) = run.glob(f"checkpoint-*/{COMPLETE_MARKER}")  # save_steps 1000: only the SIGTERM save
    stopped_at = json.loads(marker.read_text())["step"]
    assert 0 < stopped_at < STEPS and not (run / "model.safetensors").exists()
    launch("torchrun", run, reference / "cache", 1, "--save_steps", "1000", "--resume_from_checkpoint", "auto",
           trace=False)
    assert_same_curves(run, reference / "reference")


def test_a_launch_without_prepared_data_stops_with_the_command_that_prepares_it(tmp_path):
    started = time.monotonic()
    result = launch("torchrun", tmp_path / "out", tmp_path / "empty_cache", 1, trace=False, check=False)
    assert result.returncode != 0
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "no prepared pt data" in line and "launch with 2 processes does not prepare it" in line
    assert "--prepare_only" in result.stderr and "mini_qwen_pt.py" in result.stderr
    assert not list((tmp_path / "empty_cache").glob("pt-*"))  # nothing was built under the launcher
    assert time.monotonic() - started < 120
