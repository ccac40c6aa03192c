"""`python -m tools.export_gguf` through llama.cpp's own converter: the GGUF loads back in transformers with the same
logits, llama.cpp (llama-cpp-python, where installed) continues a prompt greedily as transformers does, and the
ollama Modelfile carries the checkpoint's sampling defaults and chat template. Both templates, the GGUF's jinja one
(as llama-cpp-python renders it) and the Modelfile's Go one (as Go's text/template renders it), write a tool-use
conversation as the SFT data wrote it."""

import importlib.util
import json
import os
import shutil
import subprocess

import pytest
import torch

from conftest import chatml, openai_shaped, sft_tools_records, skip_without
from utils.chat import parse_assistant_output
from utils.formats import normalize_sft

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
    assert "<|im_start|>user\n{{ .Content }}" in template and "<|im_start|>assistant" in template


def test_modelfile_template_has_the_tool_and_thinking_branches():
    from tools.export_gguf import OLLAMA_CHAT_TEMPLATE as template
    from utils.formats import TOOLS_FOOTER, TOOLS_HEADER

    assert TOOLS_HEADER in template and TOOLS_FOOTER in template and "You are Qwen" not in template
    for branch in ("{{ range .Tools }}", "{{ range .ToolCalls }}", 'eq .Role "tool"', "<tool_response>",
                   "{{ .Function.Arguments }}", "{{ if .Thinking }}<think>"):
        assert branch in template, branch


# Go's text/template with stand-ins for ollama's types: a tool's spec and a call's arguments print as the JSON text
# given (ollama prints its own, compact JSON there), the rest is what ollama hands its templates.
OLLAMA_STAND_IN = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type JSON string

func (j JSON) String() string { return string(j) }

type Call struct{ Function struct{ Name string; Arguments JSON } }
type Message struct {
	Role, Content, Thinking string
	ToolCalls               []Call
}
type Tool struct{ Type string; Function JSON }

func main() {
	var in struct {
		Template, System string
		Messages         []*Message
		Tools            []Tool
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	values := map[string]any{"System": in.System, "Messages": in.Messages, "Tools": in.Tools}
	if err := template.Must(template.New("").Parse(in.Template)).Execute(os.Stdout, values); err != nil {
		panic(err)
	}
}
"""


@pytest.fixture(scope="module")
def ollama_render(tmp_path_factory):
    """A function from (system, messages, tools) to the Modelfile template's text, rendered by Go's text/template."""
    from tools.export_gguf import OLLAMA_CHAT_TEMPLATE

    if shutil.which("go") is None:
        skip_without("no Go toolchain (apt-get install golang-go): ollama's templates are Go's text/template")
    folder = tmp_path_factory.mktemp("ollama")
    (folder / "main.go").write_text(OLLAMA_STAND_IN)
    (folder / "go.mod").write_text("module render\n\ngo 1.19\n")
    subprocess.run(["go", "build", "-o", "render", "."], cwd=folder, check=True, capture_output=True,
                   env={**os.environ, "GOCACHE": str(folder / "cache"), "GOFLAGS": "-mod=mod"})
    return lambda system, messages, tools: subprocess.run(
        [str(folder / "render")], input=json.dumps({"Template": OLLAMA_CHAT_TEMPLATE, "System": system,
                                                    "Messages": messages, "Tools": tools}),
        capture_output=True, text=True, check=True).stdout


def ollama_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as ollama gives them to its template: the thinking apart, arguments as JSON text."""
    shaped = []
    for message in messages:
        thinking, content = message.get("reasoning_content") or "", message.get("content") or ""
        if message["role"] == "assistant" and not thinking:
            thinking, content, _ = parse_assistant_output(content)
        calls = [call["function"] for call in message.get("tool_calls") or []]
        shaped.append({"Role": message["role"], "Content": content, "Thinking": thinking, "ToolCalls": [
            {"Function": {"Name": call["name"], "Arguments": json.dumps(
                json.loads(call["arguments"]) if isinstance(call["arguments"], str) else call["arguments"],
                ensure_ascii=False)}} for call in calls]})
    return shaped


RECORDS = dict(sft_tools_records())


@pytest.mark.parametrize("name", list(RECORDS))
def test_modelfile_template_writes_a_tool_conversation_as_trained(ollama_render, name):
    """Whole (the last reply left open, as ollama continues it) and up to the last reply (the assistant's turn
    opened)."""
    record = RECORDS[name]
    messages, tools = openai_shaped(record)
    training = normalize_sft(record)["messages"]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")  # ollama's .System
    specs = [{"Type": "function", "Function": json.dumps(tool.get("function", tool), ensure_ascii=False)}
             for tool in tools or []]
    assert ollama_render(system, ollama_messages(messages), specs) == chatml(training).removesuffix("<|im_end|>\n")
    assert ollama_render(system, ollama_messages(messages[:-1]), specs) == chatml(training[:-1]) + \
        "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def gguf_chat_formatter(exported):
    """The chat template the converter copied into the GGUF, as llama-cpp-python renders it (jinja2) in
    Llama.create_chat_completion."""
    if importlib.util.find_spec("llama_cpp") is None:
        skip_without("llama-cpp-python is not installed (it compiles llama.cpp: pip install llama-cpp-python==0.3.36)")
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(str(exported), vocab_only=True, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    llm.close()
    return Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="")


@pytest.mark.parametrize("name", list(RECORDS))
def test_the_ggufs_own_template_writes_a_tool_conversation_as_trained(gguf_chat_formatter, name):
    messages, tools = openai_shaped(RECORDS[name])
    prompt = gguf_chat_formatter(messages=messages[:-1], tools=tools)
    assert prompt.prompt == chatml(normalize_sft(RECORDS[name])["messages"][:-1]) + "<|im_start|>assistant\n"


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
