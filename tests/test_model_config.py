import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REPO
from utils.modeling import build_model, load_model_config


def test_1b_config_has_the_originals_998_810_624_parameters():
    config = load_model_config(REPO / "models" / "mini_qwen_1b")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size, config.vocab_size) == (1024, 48, 16, 4, 4864, 151936)
    assert config.tie_word_embeddings
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 998_810_624


@pytest.mark.parametrize("overrides, message", [
    ({"num_attention_heads": 15}, "not divisible by num_attention_heads"),
    ({"num_key_value_heads": 5}, "not divisible by num_key_value_heads"),
    ({"vocab_size": 32000}, "smaller than the Qwen2.5 tokenizer"),
])
def test_impossible_config_fails_before_anything_loads(tmp_path, overrides, message):
    import json

    config = json.loads((REPO / "models" / "mini_qwen_1b" / "config.json").read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(config | overrides))
    with pytest.raises(ValueError, match=message):
        build_model(str(bad), None)


def test_tiny_model_weights_are_float32_master_weights():
    model = build_model(str(REPO / "models" / "mini_qwen_tiny"), None, "sdpa")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.generation_config.do_sample and model.generation_config.repetition_penalty == 1.1
