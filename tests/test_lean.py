"""The memory-lean pretraining preset: bf16 weights only with stochastic rounding, and the preset really trains."""

import json
import logging

import pytest
import torch

from conftest import REPO, cpu_flags


@pytest.mark.parametrize("flags, error", [
    (["--weights_dtype", "bfloat16"], "round small updates away"),
    (["--weights_dtype", "bfloat16", "--optim", "adamw_torch_8bit"], "round small updates away"),
    (["--stochastic_rounding", "true"], "rounds onto bf16 weights; weights_dtype is float32"),
    (["--weights_dtype", "bfloat16", "--stochastic_rounding", "true", "--deepspeed", "configs/ds_zero2.json"],
     "for one process without DeepSpeed"),
])
def test_unsound_precision_settings_fail_before_any_work(flags, error, tmp_path):
    from mini_qwen_pt import main

    with pytest.raises(ValueError, match=error):
        main(["--config", str(REPO / "configs" / "demo_pt.yaml"), *cpu_flags(tmp_path / "out", tmp_path / "cache"),
              *flags])
    assert not (tmp_path / "cache").exists()  # nothing was tokenized


def test_stochastic_rounding_keeps_updates_that_plain_bf16_adamw_loses():
    """Weights at 1.0 (bf16 step 2^-7) and a constant gradient: every AdamW update is lr = 1e-5 down. Round to
    nearest never moves a weight; the lean preset's optimizer moves the mean by the full amount."""
    from types import SimpleNamespace

    from utils.modeling import stochastic_rounding_adamw

    steps, lr = 30, 1e-5
    plain = torch.nn.Parameter(torch.ones(64, 1024, dtype=torch.bfloat16))
    rounded = torch.nn.Parameter(torch.ones(64, 1024, dtype=torch.bfloat16))
    lean_cls, lean_kwargs = stochastic_rounding_adamw(SimpleNamespace(
        learning_rate=lr, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0))
    optimizers = [torch.optim.AdamW([plain], lr=lr, weight_decay=0.0), lean_cls([rounded], **lean_kwargs)]
    torch.manual_seed(0)
    for _ in range(steps):
        for parameter, optimizer in zip((plain, rounded), optimizers):
            parameter.grad = torch.ones_like(parameter)
            optimizer.step()
    assert bool((plain == 1).all())
    drift = 1 - rounded.float().mean().item()
    assert drift == pytest.approx(steps * lr, rel=0.15)


def test_lean_preset_trains_with_bf16_weights(tmp_path, caplog):
    """configs/pt_lean.yaml as shipped (its 8-bit variant: tests/test_benchmark.py's lean curve)."""
    from safetensors import safe_open

    from mini_qwen_pt import main

    out = tmp_path / "out"
    logging.getLogger("mini_qwen").addHandler(caplog.handler)  # the stage's logger does not propagate
    try:
        main(["--config", str(REPO / "configs" / "pt_lean.yaml"), *cpu_flags(out, tmp_path / "cache"),
              "--model_config", "models/mini_qwen_tiny", "--data_files", str(REPO / "mini_data" / "pt"),
              # 64 tokens a step: a bf16 matmul on a CPU without bf16 units is slow (~4 s a step for the LM head's
              # input gradient here, a sum over 151,936 vocabulary rows), and the preset's claim does not need more
              "--block_size", "32", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
              "--learning_rate", "1e-2", "--max_steps", "6", "--save_strategy", "no", "--attn_implementation", "sdpa"])
    finally:
        logging.getLogger("mini_qwen").removeHandler(caplog.handler)
    launch = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("launch:"))
    assert "bfloat16 weights" in launch
    assert "optimizer _AdamW" in launch
    state = json.loads((out / "trainer_state.json").read_text())
    curve = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(curve) == 6 and all(loss == loss for loss in curve)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.15  # batch-to-batch noise is ~0.05 here
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert weights.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
