"""Shared test fixtures: the real tokenizer, tiny trained checkpoints (PT -> SFT) made once per session through the
real stage code on the repo's own mini_data, and the paths to the reference data in ../shared.

A plain clone has no ../shared: the tests that need it are marked `needs_shared` and skip, saying so in the summary.
CI has it, and runs with MINI_QWEN_REQUIRE_SHARED=1 (.ci/run), which turns its absence into an error instead.
Likewise the tests that need an optional tool (a browser, llama-cpp-python, shellcheck) skip without it, and fail
instead under MINI_QWEN_REQUIRE_OPTIONAL=1, which .ci/run sets after installing them."""

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("MINI_QWEN_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference" / "mini_qwen"
REFERENCE_TOKENIZER = REFERENCE / "models" / "Qwen2.5-0.5B-Instruct"
TINY_CONFIG = REPO / "models" / "mini_qwen_tiny"

# The allocator settings run.sh gives CPU demo runs (see there): the stage processes that tests start run twice as
# fast with them.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4294967296:"
                                        "glibc.malloc.trim_threshold=4294967296")

needs_shared = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"needs the reference data in {SHARED} (CI has it)")


def pytest_configure(config):
    if os.environ.get("MINI_QWEN_REQUIRE_SHARED") and not REFERENCE.is_dir():
        raise pytest.UsageError(f"MINI_QWEN_REQUIRE_SHARED is set but {REFERENCE} is missing: the tests that read "
                                "the reference data would all be skipped")


def skip_without(tool_missing: str):
    """Skip a test whose optional tool is missing, saying which; under MINI_QWEN_REQUIRE_OPTIONAL=1 (CI installed
    the tools) a missing one is a failure, so a broken install cannot turn into a quietly skipped test."""
    if os.environ.get("MINI_QWEN_REQUIRE_OPTIONAL"):
        pytest.fail(f"{tool_missing}, and MINI_QWEN_REQUIRE_OPTIONAL is set (.ci/run installs it)")
    pytest.skip(tool_missing)


def cpu_flags(output_dir, cache_dir) -> list[str]:
    """Flags every tiny test run shares: CPU, fp32, no reporting, quiet."""
    return ["--output_dir", str(output_dir), "--cache_dir", str(cache_dir), "--use_cpu", "true", "--bf16", "false",
            "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--logging_steps", "1"]


@pytest.fixture(scope="session")
def tokenizer():
    from utils.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def pt_checkpoint(tmp_path_factory):
    """A tiny model pretrained for a few steps on the repo's IndustryCorpus2-shaped mini data."""
    from mini_qwen_pt import main

    root = tmp_path_factory.mktemp("pt")
    main(["--config", str(REPO / "configs" / "demo_pt.yaml"), *cpu_flags(root / "out", root / "cache"),
          "--data_files", str(REPO / "mini_data" / "pt"), "--block_size", "64",
          "--per_device_train_batch_size", "4", "--max_steps", "20", "--save_strategy", "no"])
    return root / "out"


@pytest.fixture(scope="session")
def sft_checkpoint(tmp_path_factory, pt_checkpoint):
    """A tiny model fine-tuned for a few steps on the repo's Infinity-Instruct-shaped mini data (7M + Gen)."""
    from mini_qwen_sft import main

    root = tmp_path_factory.mktemp("sft")
    main(["--config", str(REPO / "configs" / "demo_sft.yaml"), *cpu_flags(root / "out", root / "cache"),
          "--init_from", str(pt_checkpoint), "--data_files", str(REPO / "mini_data" / "sft"),
          # TRL's LM-head loss is slow on a CPU (it scores every position): few rows keep this fixture quick
          "--per_device_train_batch_size", "2", "--max_steps", "6", "--save_strategy", "no"])
    return root / "out"


def chatml(messages: list[dict]) -> str:
    """ChatML text of normalised messages, written out by hand: what the chat template must render."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def openai_shaped(record: dict) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) of a tool-use record in any shape utils/formats.py reads, as an OpenAI client would send
    the same conversation: LLaMA-Factory's function_call / observation turns and typed parts become `tool_calls` (with
    object arguments), `tool` messages and `reasoning_content`; the `system` and `tools` columns become a system
    message and the request's tools. A <think> block written into an answer stays in its content."""
    roles = {"human": "user", "gpt": "assistant", "observation": "tool", "function_call": "assistant"}
    messages = []
    for item in record.get("messages") or record["conversations"]:
        role, value = item.get("role", item.get("from")), item.get("content", item.get("value"))
        message = {k: v for k, v in item.items() if k not in ("from", "value")} | {"role": roles.get(role, role)}
        if role == "function_call":
            calls = json.loads(value)
            message.update(content=None, tool_calls=[{"type": "function", "function": call}
                                                     for call in (calls if isinstance(calls, list) else [calls])])
        elif isinstance(value, list):
            parts = {kind: [part["value"] for part in value if part["type"] == kind]
                     for kind in ("text", "reasoning", "tool_call")}
            message["content"] = "".join(parts["text"]) or None
            if parts["reasoning"]:
                message["reasoning_content"] = "".join(parts["reasoning"])
            if parts["tool_call"]:
                message["tool_calls"] = [{"type": "function", "function": json.loads(call)}
                                         for call in parts["tool_call"]]
        else:
            message["content"] = value
        messages.append(message)
    if record.get("system") and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": record["system"]})
    tools = json.loads(record["tools"]) if isinstance(record.get("tools"), str) else record.get("tools")
    return messages, tools or None


def sft_tools_records() -> list[tuple[str, dict]]:
    """(file:number, record) for every record of mini_data/sft_tools, as the files hold them."""
    records = []
    for path in sorted((REPO / "mini_data" / "sft_tools").iterdir()):
        text = path.read_text(encoding="utf-8")
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line]
        records += [(f"{path.name}:{number}", row) for number, row in enumerate(rows, 1)]
    return records


class ScriptedModel:
    """Stands in for a checkpoint's model where a test needs replies no tiny model writes (reasoning, tool calls):
    `generate` answers each prompt with the next of `replies` and <|im_end|>, streamed token by token as
    model.generate streams, and keeps the prompt ids it was given."""

    def __init__(self, model, tokenizer, replies: list[str] = ()):
        self.config, self.generation_config, self.device = model.config, model.generation_config, model.device
        self.tokenizer, self.replies, self.prompts = tokenizer, list(replies), []

    def generate(self, input_ids, streamer=None, **settings):
        import torch

        self.prompts.append(input_ids[0].tolist())
        new = self.tokenizer(self.replies.pop(0), add_special_tokens=False)["input_ids"] + [
            self.tokenizer.convert_tokens_to_ids("<|im_end|>")]
        if streamer is not None:
            streamer.put(input_ids)  # the prompt first, which the streamer skips
            for token in new:
                streamer.put(torch.tensor([token]))
            streamer.end()
        return torch.cat([input_ids, torch.tensor([new])], dim=1)
