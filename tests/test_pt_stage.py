"""The pretraining stage end to end on the tiny config: loss falls, data is tokenized once, a killed run resumes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open

from conftest import REPO, cpu_flags
from utils.checkpoint import COMPLETE_MARKER, STAGE_FILE


def losses(run_dir) -> list[float]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_tiny_pretraining_loss_falls_and_outputs_load_anywhere(pt_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    curve = losses(pt_checkpoint)
    assert len(curve) == 20
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.5  # from ~11.9 (ln 151936) down
    assert (pt_checkpoint / "loss.png").stat().st_size > 10_000
    assert json.loads((pt_checkpoint / STAGE_FILE).read_text()) == {"stage": "pt"}
    model = AutoModelForCausalLM.from_pretrained(pt_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(pt_checkpoint)
    assert model.generation_config.do_sample and model.generation_config.top_p == 0.8
    assert tokenizer.eos_token == "<|im_end|>"


def pt_command(output_dir, cache_dir, *extra) -> list[str]:
    return [sys.executable, str(REPO / "mini_qwen_pt.py"), "--config", str(REPO / "configs" / "demo_pt.yaml"),
            *cpu_flags(output_dir, cache_dir), "--data_files", str(REPO / "mini_data" / "pt"),
            "--block_size", "64", "--per_device_train_batch_size", "4", "--max_steps", "12",
            "--save_strategy", "steps", "--save_steps", "4", "--save_total_limit", "2", *extra]


def test_run_killed_after_a_checkpoint_resumes_to_the_same_result(tmp_path):
    cache = tmp_path / "cache"
    reference_run = subprocess.run(pt_command(tmp_path / "full", cache), capture_output=True, text=True)
    assert reference_run.returncode == 0, reference_run.stderr[-3000:]
    assert "[cache] prepared pt data written" in reference_run.stdout

    interrupted = subprocess.Popen(pt_command(tmp_path / "killed", cache), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((tmp_path / "killed").glob(f"checkpoint-*/{COMPLETE_MARKER}")):
        assert interrupted.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    os.kill(interrupted.pid, signal.SIGKILL)
    interrupted.wait()
    assert not (tmp_path / "killed" / "trainer_state.json").exists()  # it really died mid-run

    resumed = subprocess.run(pt_command(tmp_path / "killed", cache, "--resume_from_checkpoint", "auto"),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume=auto: resuming from" in resumed.stdout
    assert "[cache] reusing prepared pt data" in resumed.stdout  # no second tokenization
    (cached,) = cache.glob("pt-*/data.arrow")
    assert str(Dataset.from_file(str(cached)).features["input_ids"].feature.dtype) == "int32"  # half of int64 on disk
    full_state = json.loads((tmp_path / "full" / "trainer_state.json").read_text())
    resumed_state = json.loads((tmp_path / "killed" / "trainer_state.json").read_text())
    assert resumed_state["global_step"] == full_state["global_step"] == 12
    # the steps lost after the checkpoint are redone on the same batches: the whole curve and the weights agree
    assert losses(tmp_path / "killed") == pytest.approx(losses(tmp_path / "full"), abs=1e-4)
    with safe_open(str(tmp_path / "full" / "model.safetensors"), "pt") as full, \
            safe_open(str(tmp_path / "killed" / "model.safetensors"), "pt") as resumed_weights:
        for name in full.keys():
            assert torch.allclose(full.get_tensor(name), resumed_weights.get_tensor(name), atol=1e-5), name


def test_sigterm_saves_a_checkpoint_and_exits_without_a_final_model(tmp_path):
    process = subprocess.Popen(pt_command(tmp_path / "run", tmp_path / "cache", "--max_steps", "500",
                                          "--save_steps", "1000"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # wait until training is under way
        if "'loss'" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1 and "stopped by SIGTERM" in stderr
    (marker,) = (tmp_path / "run").glob(f"checkpoint-*/{COMPLETE_MARKER}")  # save_steps 1000: only SIGTERM saved
    assert 0 < int(marker.parent.name.split("-")[1]) < 500
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_warmup_stable_decay_with_a_decay_fraction(tmp_path):
    """`lr_scheduler_type: warmup_stable_decay` + `decay_fraction`: warmup, a flat peak, then the last half of
    the steps down to min_lr_ratio (nanochat's long-stable schedule). The logged rate is the one each step used."""
    from mini_qwen_pt import main

    out = tmp_path / "out"
    main(["--config", str(REPO / "configs" / "demo_pt.yaml"), *cpu_flags(out, tmp_path / "cache"),
          "--data_files", str(REPO / "mini_data" / "pt"), "--block_size", "32", "--per_device_train_batch_size", "2",
          "--max_steps", "8", "--save_strategy", "no", "--learning_rate", "1e-3", "--warmup_steps", "2",
          "--lr_scheduler_type", "warmup_stable_decay",
          "--lr_scheduler_kwargs", '{"decay_fraction": 0.5, "min_lr_ratio": 0.1, "decay_type": "linear"}'])
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    assert len(rates) == 8
    assert rates[0] < rates[1] < 1e-3  # warmup
    assert rates[2:4] == pytest.approx([1e-3] * 2)  # stable at the peak
    assert rates[4] >= rates[5] > rates[6] > rates[7] > 1e-4  # the last 4 of 8 steps decay towards 1e-4
