"""`python -m tools.export_gguf` through llama.cpp's own converter: the GGUF loads back in transformers with the same
logits, llama.cpp (llama-cpp-python, where installed) continues a prompt greedily as transformers does, and the
ollama Modelfile carries the checkpoint's sampling defaults and chat template."""

import importlib.util
import json

import pytest
import torch

from conftest import skip_without

PROMPT = "长城是中国古代的"


@pytest.fixture(scope="module")
def exported(sft_checkpoint, tmp_path_factory):
    from tools.export_gguf import main

    gguf_path = tmp_path_factory.mktemp("gguf") / "sft.gguf"
    main([str(sft_checkpoint), str(gguf_path), "--outtype", "f32"])  # f32: the comparison below is exact-ish
    return gguf_path


def transformers_model(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def prompt_ids(checkpoint) -> torch.Tensor:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)(PROMPT, return_tensors="pt").input_ids


def test_gguf_loads_back_in_transformers_with_the_same_logits(sft_checkpoint, exported):
    ids = prompt_ids(sft_checkpoint)
    with torch.no_grad():
        original = transformers_model(sft_checkpoint)(ids).logits
        from_gguf = transformers_model(exported.parent, gguf_file=exported.name)(ids).logits
    assert original.shape == from_gguf.shape
    torch.testing.assert_close(from_gguf, original, atol=1e-4, rtol=1e-4)


def test_modelfile_has_the_checkpoints_defaults_and_chat_template(sft_checkpoint, exported):
    lines = exported.with_suffix(".Modelfile").read_text().splitlines()
    assert lines[0] == f"FROM ./{exported.name}"
    generation = json.loads((sft_checkpoint / "generation_config.json").read_text())
    parameters = dict(line.split()[1:3] for line in lines if line.startswith("PARAMETER") and "stop" not in line)
    assert float(parameters["temperature"]) == generation["temperature"]
    assert float(parameters["top_p"]) == generation["top_p"]
    assert float(parameters["repeat_penalty"]) == generation["repetition_penalty"]
    assert 'PARAMETER stop "<|im_end|>"' in lines
    template = "\n".join(lines)
    assert "<|im_start|>{{ .Role }}" in template and "<|im_start|>assistant" in template


def test_pt_checkpoint_gets_a_bare_prompt_template(pt_checkpoint, tmp_path):
    from tools.export_gguf import write_modelfile

    modelfile = write_modelfile(pt_checkpoint, tmp_path / "pt.gguf").read_text()
    assert 'TEMPLATE """{{ .Prompt }}"""' in modelfile and "<|im_start|>" not in modelfile


def test_lora_adapter_folder_is_refused_with_the_merge_command(tmp_path):
    from utils.errors import ConfigError
    from tools.export_gguf import main

    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="utils.lora merge"):
        main([str(tmp_path), str(tmp_path / "out.gguf")])


def test_llama_cpp_continues_greedily_like_transformers(sft_checkpoint, exported):
    if importlib.util.find_spec("llama_cpp") is None:
        skip_without("llama-cpp-python is not installed (it compiles llama.cpp: pip install llama-cpp-python==0.3.36)")
    import llama_cpp

    ids = prompt_ids(sft_checkpoint)
    expected = transformers_model(sft_checkpoint).generate(
        ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, repetition_penalty=1.0)[0, ids.shape[1]:].tolist()

    llm = llama_cpp.Llama(str(exported), n_ctx=128, n_threads=2, verbose=False)
    assert llm.tokenize(PROMPT.encode(), add_bos=False) == ids[0].tolist()  # the same tokenizer, from the GGUF
    continuation = []
    for token in llm.generate(ids[0].tolist(), temp=0.0, top_k=1, repeat_penalty=1.0):
        continuation.append(token)
        if len(continuation) == 16:
            break
    llm.close()
    assert continuation == expected
