"""--use_muon: Muon for the decoder's 2-D weights, AdamW for the embedding, norms and biases (utils/muon.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import REPO, TINY_CONFIG, cpu_flags
from utils.muon import MuonWithAdamW


def test_parameter_groups_and_a_checkpoint_round_trip():
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CONFIG))
    optimizer = MuonWithAdamW(model, lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = [(group["optimizer"], group["weight_decay"], sorted(names[id(p)] for p in group["params"]))
                for group in optimizer.param_groups]
    muon, embedding, no_decay = by_group
    layer_matrices = [n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("model.layers.")]
    assert muon[:2] == ("muon", 0.1) and muon[2] == sorted(layer_matrices) and len(layer_matrices) == 2 * 7
    assert embedding == ("adamw", 0.1, ["model.embed_tokens.weight"])  # the LM head is tied to it
    assert no_decay[:2] == ("adamw", 0.0) and all(n.endswith(("norm.weight", ".bias")) for n in no_decay[2])
    assert len(muon[2]) + 1 + len(no_decay[2]) == len(list(model.parameters()))
    assert [group["lr"] for group in optimizer.param_groups] == [0.02, 1e-3, 1e-3]  # a scheduler scales each from its own

    ids = torch.randint(0, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    optimizer.param_groups[0]["lr"] = 2e-3  # a scheduler's change reaches the inner Muon
    optimizer.step()
    assert optimizer.muon.param_groups[0]["lr"] == 2e-3
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)
    restored = MuonWithAdamW(model, lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    restored.load_state_dict(optimizer.state_dict())
    restored.param_groups[0]["lr"] = 3e-3  # after a resume too, the scheduler's rate reaches Muon
    assert restored.muon.param_groups[0]["lr"] == 3e-3
    assert torch.equal(restored.state[model.lm_head.weight]["exp_avg"], optimizer.state[model.lm_head.weight]["exp_avg"])
    assert torch.equal(restored.state[model.model.layers[0].mlp.up_proj.weight]["momentum_buffer"],
                       optimizer.state[model.model.layers[0].mlp.up_proj.weight]["momentum_buffer"])


def test_the_demo_pretrains_with_muon(tmp_path):
    from mini_qwen_pt import main

    out = tmp_path / "out"
    main(["--config", str(REPO / "configs" / "demo_pt.yaml"), *cpu_flags(out, tmp_path / "cache"), "--use_muon", "true",
          "--data_files", str(REPO / "mini_data" / "pt"), "--block_size", "64", "--per_device_train_batch_size", "4",
          "--max_steps", "20", "--save_strategy", "no", "--learning_rate", "2e-3"])
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.15, losses  # 11.93 -> 11.69 here


@pytest.mark.parametrize("stage, flags, reason", [
    (0, ["--max_grad_norm", "0"], "ZeRO stage 0"),  # DeepSpeed would run it without orthogonalisation
    (2, ["--max_grad_norm", "1.0"], "--max_grad_norm 1.0 with DeepSpeed's Muon"),  # the clip would shrink each step
], ids=["stage0", "clipping"])
def test_deepspeed_muon_where_it_would_not_be_muon_is_refused_with_one_line(tmp_path, stage, flags, reason):
    deepspeed = json.loads((REPO / "configs" / "ds_zero2_muon.json").read_text())
    deepspeed["zero_optimization"]["stage"] = stage
    (tmp_path / "ds.json").write_text(json.dumps(deepspeed))
    launcher = (REPO / "accelerate_config.yaml").read_text().replace("configs/ds_zero2.json", str(tmp_path / "ds.json"))
    (tmp_path / "accelerate.yaml").write_text(launcher)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "accelerate.yaml"),
         "--num_processes", "1", str(REPO / "mini_qwen_pt.py"), "--config", str(REPO / "configs" / "demo_pt.yaml"),
         *cpu_flags(tmp_path / "out", tmp_path / "cache"), "--use_muon", "true", "--max_steps", "2",
         "--data_files", str(REPO / "mini_data" / "pt"), "--block_size", "32", *flags],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode != 0
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert reason in line
