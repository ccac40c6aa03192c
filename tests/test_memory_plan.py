"""The memory plan (utils/memory_plan.py) against an independent count of the same training step: torch's
MemTracker under FakeTensorMode (no memory is allocated, so mid-size shapes are cheap), and the plan printed by
every stage script."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

from conftest import REPO, TINY_CONFIG
from utils.memory_plan import GIB, ModelShape, StepShape, plan_parts

MID_SIZE = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
                num_hidden_layers=12, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)


def measured_peak(config, micro_batch: int, seq_len: int, checkpointing: bool) -> float:
    """Peak bytes of the second training step (AdamW's moments exist by then) of an fp32 model under bf16 autocast."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    config._attn_implementation = "sdpa"
    with FakeTensorMode():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, config.vocab_size, (micro_batch, seq_len))

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()

        step()
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            step()
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("name, config, micro_batch, seq_len, checkpointing", [
    ("tiny", AutoConfig.from_pretrained(TINY_CONFIG), 4, 128, False),
    ("mid-size", Qwen2Config(**MID_SIZE), 2, 512, False),
    ("mid-size, activation checkpointing", Qwen2Config(**MID_SIZE), 4, 512, True),
])
def test_plan_is_within_15_percent_of_the_counted_peak(name, config, micro_batch, seq_len, checkpointing):
    step = StepShape(micro_batch=micro_batch, seq_len=seq_len, activation_checkpointing=checkpointing)
    parts = plan_parts(ModelShape.from_config(config), step, "single", 1)
    planned = sum(value for part, value in parts.items() if part != "framework")  # no CUDA context on a CPU
    measured = measured_peak(config, micro_batch, seq_len, checkpointing)
    assert abs(planned - measured) <= 0.15 * measured, f"{name}: plan {planned / GIB:.2f} GiB, counted {measured / GIB:.2f}"


def test_parameter_count_is_the_models():
    config = Qwen2Config(**MID_SIZE)
    model = AutoModelForCausalLM.from_config(config)
    assert ModelShape.from_config(config).parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("stage", ["pt", "sft", "dpo", "grpo"])
def test_every_stage_prints_its_plan_and_builds_nothing(stage, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / f"mini_qwen_{stage}.py"), "--config",
                             str(REPO / "configs" / f"{stage}.yaml"), "--memory_plan", "--gpu", "H100", "--num_gpus",
                             "8", "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "zero2 on 8 x H100" in result.stdout and "fits with 10% headroom" in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("gpu", ["H100", "H800", "A100-40GB", "4090", "T4"])
def test_the_plan_for_each_gpu_class_names_what_fits(gpu, capsys, tmp_path):
    """In-process through the PT entry point: the verdict follows the GPU's memory (the 1B PT recipe at micro-batch
    6 fits an 80 GB GPU and nothing smaller), and the largest micro-batch that fits shrinks with it."""
    from mini_qwen_pt import main

    with pytest.raises(SystemExit) as done:
        main(["--config", str(REPO / "configs" / "pt.yaml"), "--memory_plan", "--gpu", gpu, "--num_gpus", "1",
              "--output_dir", str(tmp_path / "out")])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert f"single on 1 x {gpu}" in out
    fits = gpu in ("H100", "H800")
    assert ("fits with 10% headroom" in out and "NOT" not in out) == fits, out
    largest = int(out.rsplit("the largest micro-batch that fits: ", 1)[1].split()[0])
    assert (largest >= 6) == fits
