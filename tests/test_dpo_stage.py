"""DPO really moves float32 weights at the original's lr 5e-7, on the repo's Infinity-Preference pairs."""

import json
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, cpu_flags
from utils.formats import load_records


def test_lr_5e7_moves_the_weights_and_the_reward_margin(sft_checkpoint, tmp_path):
    from mini_qwen_dpo import main

    main(["--config", str(REPO / "configs" / "demo_dpo.yaml"), *cpu_flags(tmp_path / "out", tmp_path / "cache"),
          "--init_from", str(sft_checkpoint), "--data_files", str(REPO / "mini_data" / "dpo"),
          "--learning_rate", "5e-7", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
          "--per_device_train_batch_size", "2", "--max_length", "128", "--max_steps", "4", "--save_strategy", "no"])

    before = load_file(sft_checkpoint / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    changed = sum(int((before[k] != after[k]).sum()) for k in before)
    total = sum(t.numel() for t in before.values())
    assert changed / total > 0.9, f"only {changed / total:.1%} of the weights moved"

    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "rewards/margins" in entry]
    assert len(logged) == 4 and "rewards/accuracies" in logged[-1]
    assert any(abs(entry["rewards/margins"]) > 0 for entry in logged[1:])
    (report_file,) = (tmp_path / "cache").glob("dpo-*/report.json")
    pairs, _ = load_records(str(REPO / "mini_data" / "dpo"), "dpo")
    train_split, _ = load_records(str(REPO / "mini_data" / "dpo" / "train-00000-of-00001.parquet"), "dpo")
    assert json.loads(report_file.read_text())["records"]["kept"] == len(pairs) > len(train_split)  # both splits

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.generation_config.repetition_penalty == 1.1
    assert all(p.dtype == torch.float32 for p in reloaded.parameters())


def test_deepspeed_zero2_bf16_saves_the_fp32_master(sft_checkpoint, tmp_path):
    """Two ranks under the default launcher (accelerate_config.yaml: DeepSpeed ZeRO-2) with bf16: DeepSpeed trains a
    bf16 module against an fp32 master. The saved model must be that master: at lr 5e-7 nearly every weight moves
    in fp32 while the bf16 module barely changes; and one tied embedding, not a second lm_head copy."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_config.yaml"),
               "--num_processes", "2", "--main_process_port", str(port), str(REPO / "mini_qwen_dpo.py"),
               "--config", str(REPO / "configs" / "demo_dpo.yaml"), *cpu_flags(out, tmp_path / "cache"),
               "--bf16", "true", "--init_from", str(sft_checkpoint), "--data_files", str(REPO / "mini_data" / "dpo"),
               "--learning_rate", "5e-7", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
               "--per_device_train_batch_size", "1", "--max_length", "96", "--max_steps", "3",
               "--save_strategy", "no"]
    prepared = subprocess.run([sys.executable, *command[9:], "--prepare_only"], capture_output=True, text=True)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    log = result.stdout + result.stderr
    assert "precision held: module weights bfloat16, master weights float32, optimizer moments float32" in log

    before = load_file(sft_checkpoint / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert set(after) == set(before) and "lm_head.weight" not in after  # tied: saved once
    assert {tensor.dtype for tensor in after.values()} == {torch.float32}
    changed = sum(int((before[k] != after[k]).sum()) for k in before)
    total = sum(t.numel() for t in before.values())
    assert changed / total >= 0.99, f"only {changed / total:.1%} of the weights moved"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
