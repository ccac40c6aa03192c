"""A checkpoint folder as one GGUF file for llama.cpp, llama-cpp-python, LM Studio and ollama, converted by llama.cpp's
own `convert_hf_to_gguf.py`, with an ollama Modelfile beside it (results/dpo.gguf -> results/dpo.Modelfile).

    python -m tools.export_gguf results/dpo results/dpo.gguf [--outtype f16|bf16|q8_0|f32]
    bash run.sh export results/dpo results/dpo.gguf --outtype q8_0

    llama-cli -m results/dpo.gguf -cnv                 # llama.cpp: chat with the GGUF's own chat template
    ollama create mini_qwen -f results/dpo.Modelfile && ollama run mini_qwen

The converter is not on PyPI as a package of its own; it ships (with the `conversion` package it imports and the
`gguf-py` it was written against) inside the source distribution of llama-cpp-python. The first export downloads that
file from PyPI (LLAMA_CPP_SDIST, pinned and checked against its sha256), keeps only those three parts under
~/.cache/mini_qwen, and runs the script from there; `--llama_cpp DIR` uses a llama.cpp checkout of yours instead
(offline machines, a newer llama.cpp). Converter and gguf-py come from the same llama.cpp revision, so they agree.

The Modelfile carries what ollama cannot read from the GGUF: the checkpoint's sampling defaults
(generation_config.json), the stop token, the default system prompt, and the chat template written in ollama's Go
template language (a PT checkpoint gets the bare prompt: it continues text).
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from utils.chat import DEFAULT_SYSTEM_PROMPT
from utils.checkpoint import STAGE_FILE
from utils.config import repo_path
from utils.formats import TOOLS_FOOTER, TOOLS_HEADER
from utils.errors import ConfigError, MissingInputError, UserError, run_main

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_SDIST = ("https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a"
                   f"59fe7cf3/llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz")
LLAMA_CPP_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
OUTTYPES = ("f16", "bf16", "q8_0", "f32")

# utils/chat_template.jinja in ollama's template language, so that ollama prompts as SFT trained: ollama gathers the
# system messages (or the Modelfile's SYSTEM) into .System, which the tools block follows in one system turn (in the
# words of utils/formats.py, no "You are Qwen" line); calls are <tool_call> blocks after the reply's text,
# consecutive tool results share one user turn of <tool_response> blocks, and an answer's .Thinking opens it as a
# <think> block.
# The reply is left open after "<|im_start|>assistant\n". Where ollama writes JSON itself (a tool's spec, a call's
# arguments) it writes it compactly, without the spaces of the training text: its own Qwen2.5 template does the same.
OLLAMA_CHAT_TEMPLATE = ("""{{- if or .System .Tools }}<|im_start|>system
{{ if .System }}{{ .System }}{{ if .Tools }}

{{ end }}{{ end }}{{ if .Tools }}""" + TOOLS_HEADER + """{{ range .Tools }}
{"type": "function", "function": {{ .Function }}}{{ end }}""" + TOOLS_FOOTER + """{{ end }}<|im_end|>
{{ end }}
{{- $previous := "" }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- $next := "" }}{{ if not $last }}{{ $next = (index (slice $.Messages $i) 1).Role }}{{ end }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if .Thinking }}<think>
{{ .Thinking }}
</think>

{{ end }}{{ .Content }}{{ $apart := .Content }}{{ range .ToolCalls }}{{ if $apart }}
{{ end }}<tool_call>
{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
</tool_call>{{ $apart = true }}{{ end }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}{{ if ne $previous "tool" }}<|im_start|>user{{ end }}
<tool_response>
{{ .Content }}
</tool_response>{{ if ne $next "tool" }}<|im_end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- $previous = .Role }}
{{- end }}""")


class ExportError(UserError):
    """The converter could not be fetched, or refused the checkpoint."""


def cache_dir() -> Path:
    return Path(os.environ.get("MINI_QWEN_CACHE", Path.home() / ".cache" / "mini_qwen"))


def fetch_converter() -> Path:
    """llama.cpp's converter from the pinned llama-cpp-python sdist, downloaded and unpacked once."""
    target = cache_dir() / f"llama.cpp-from-llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    print(f"fetching llama.cpp's converter: {LLAMA_CPP_SDIST} (once, ~77 MB)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        sdist = Path(scratch) / "sdist.tar.gz"
        try:
            with urllib.request.urlopen(LLAMA_CPP_SDIST, timeout=120) as response, open(sdist, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as err:
            raise ExportError(f"could not download {LLAMA_CPP_SDIST} ({err}); on a machine without PyPI, pass "
                              "--llama_cpp DIR (a llama.cpp checkout)") from err
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != LLAMA_CPP_SDIST_SHA256:
            raise ExportError(f"{LLAMA_CPP_SDIST}: sha256 {digest}, expected {LLAMA_CPP_SDIST_SHA256}")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        unpacked = Path(scratch) / "llama.cpp"
        with tarfile.open(sdist) as archive:
            members = [member for member in archive.getmembers() if member.name.startswith(prefix)
                       and member.name[len(prefix):].split("/")[0] in CONVERTER_PARTS]
            for member in members:
                member.name = member.name[len(prefix):]
            archive.extractall(unpacked, members=members, filter="data")
        unpacked.rename(target)  # whole or not at all: a broken download leaves no half-filled cache
    return target


def convert(model_path: Path, gguf_path: Path, outtype: str, llama_cpp: Path) -> None:
    script = llama_cpp / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise MissingInputError(f"{script}: not found (--llama_cpp must be a llama.cpp checkout)")
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(script), str(model_path), "--outfile", str(gguf_path), "--outtype", outtype]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ExportError(f"llama.cpp's converter failed on {model_path} (exit {result.returncode}):\n"
                          + result.stderr[-3000:])


def write_modelfile(model_path: Path, gguf_path: Path) -> Path:
    """An ollama Modelfile beside the GGUF: sampling defaults, stop token, template, system prompt."""
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(model_path)
    stage_file = model_path / STAGE_FILE
    stage = json.loads(stage_file.read_text())["stage"] if stage_file.is_file() else "sft"
    lines = [f"FROM ./{gguf_path.name}", ""]
    if stage == "pt":
        lines += ['TEMPLATE """{{ .Prompt }}"""']
    else:
        lines += [f'TEMPLATE """{OLLAMA_CHAT_TEMPLATE}"""', f'SYSTEM """{DEFAULT_SYSTEM_PROMPT}"""',
                  'PARAMETER stop "<|im_end|>"']
    lines += ['PARAMETER stop "<|endoftext|>"',
              f"PARAMETER temperature {generation.temperature if generation.do_sample else 0}",
              f"PARAMETER top_p {generation.top_p}", f"PARAMETER top_k {generation.top_k}",
              f"PARAMETER repeat_penalty {generation.repetition_penalty}",
              f"PARAMETER num_predict {generation.max_new_tokens}"]
    modelfile = gguf_path.with_suffix(".Modelfile")  # results/dpo.gguf -> results/dpo.Modelfile
    modelfile.write_text("\n".join(lines) + "\n")
    return modelfile


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_path", help="a checkpoint folder (results/sft, results/dpo, ...)")
    parser.add_argument("gguf_path", help="the GGUF file to write; the Modelfile goes beside it")
    parser.add_argument("--outtype", default="f16", choices=OUTTYPES,
                        help="f16 (default; llama.cpp's usual), bf16, q8_0 (half the size, near-lossless), f32")
    parser.add_argument("--llama_cpp", help="a llama.cpp checkout whose convert_hf_to_gguf.py to use "
                                            "(default: the pinned one, fetched once from PyPI)")
    args = parser.parse_args(argv)
    model_path, gguf_path = Path(repo_path(args.model_path)), Path(repo_path(args.gguf_path))
    if (model_path / "adapter_config.json").is_file() and not (model_path / "config.json").is_file():
        raise ConfigError(f"{model_path} holds LoRA adapters: merge them first "
                          f"(python -m utils.lora merge {args.model_path} MERGED_DIR), then export MERGED_DIR")
    if not (model_path / "config.json").is_file():
        raise MissingInputError(f"{model_path}: not a checkpoint folder (no config.json); train a stage first")
    llama_cpp = Path(args.llama_cpp) if args.llama_cpp else fetch_converter()
    convert(model_path, gguf_path, args.outtype, llama_cpp)
    modelfile = write_modelfile(model_path, gguf_path)
    print(f"wrote {gguf_path} ({gguf_path.stat().st_size / 2**20:.1f} MiB, {args.outtype}) and {modelfile}")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
