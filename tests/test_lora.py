"""Continued pretraining with LoRA (seed 004): only adapters train, and one command merges them back."""

import json

import torch
from transformers import AutoModelForCausalLM

from conftest import REPO, cpu_flags
from utils.lora import main as peft_main


def test_lora_continued_pretraining_then_merge(pt_checkpoint, tmp_path):
    from mini_qwen_pt import main

    main(["--config", str(REPO / "configs" / "demo_pt.yaml"), *cpu_flags(tmp_path / "lora", tmp_path / "cache"),
          "--init_from", str(pt_checkpoint), "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8",
          "--data_files", str(REPO / "mini_data" / "pt" / "accommodation_catering_hotel" / "english"),
          "--block_size", "64", "--per_device_train_batch_size", "2", "--max_steps", "4", "--save_strategy", "no"])
    adapter_config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and "q_proj" in adapter_config["target_modules"]
    assert not (tmp_path / "lora" / "model.safetensors").exists()  # adapters only

    peft_main(["merge", str(tmp_path / "lora"), str(tmp_path / "merged")])
    base = AutoModelForCausalLM.from_pretrained(pt_checkpoint)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base_weights, merged_weights = base.state_dict(), merged.state_dict()
    assert torch.equal(base_weights["model.embed_tokens.weight"], merged_weights["model.embed_tokens.weight"])
    assert not torch.equal(base_weights["model.layers.0.self_attn.q_proj.weight"],
                           merged_weights["model.layers.0.self_attn.q_proj.weight"])
    ids = torch.tensor([[1, 2, 3]])
    assert merged(input_ids=ids).logits.shape == (1, 3, 151936)
