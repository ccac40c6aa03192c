"""Reasoning and tool use in SFT: each record shape renders as Qwen2.5's own chat template renders the same
conversation, the loss covers exactly the assistant turns (tool calls included, tool results not) and
--train_on_reasoning decides the <think> blocks; the stage trains on mini_data/sft_tools with nothing skipped.
At inference the way runs back: the checkpoint's template renders OpenAI-shaped requests (tools, tool_calls, tool
results, reasoning_content) as their training text, and a reply parses into reasoning, content and tool calls."""

import json
import re
from types import SimpleNamespace

import pytest
from trl import SFTConfig

from conftest import REFERENCE_TOKENIZER, REPO, chatml, cpu_flags, needs_shared, openai_shaped, sft_tools_records
from utils.chat import AssistantStream, parse_assistant_output
from utils.formats import load_records
from utils.prepare import UnitStats

SYSTEM = "You are a helpful travel assistant."
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CURRENCY = {"name": "convert_currency", "description": "Convert an amount between currencies",
            "parameters": {"type": "object", "properties": {"amount": {"type": "number"}, "to": {"type": "string"}},
                           "required": ["amount", "to"]}}
QWEN_IDENTITY = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# One conversation as (role, reasoning, text, calls) turns, written below in each record shape. It has reasoning
# before parallel calls with no text, reasoning before an answer, text before a call, and a tool-less answer.
TOOL_TURNS = [
    ("user", None, "Coat or umbrella for Oslo and Bergen today?", []),
    ("assistant", "It depends on the weather in both cities: check each.", "",
     [("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Bergen"})]),
    ("tool", None, '{"city": "Oslo", "temperature": -3}', []),
    ("tool", None, '{"city": "Bergen", "temperature": 8, "condition": "rain"}', []),
    ("assistant", "Oslo is below freezing; Bergen is mild but wet.", "A coat for Oslo, an umbrella for Bergen.", []),
    ("user", None, "在卑尔根买伞要多少欧元？伞价 200 挪威克朗。", []),
    ("assistant", None, "我来换算一下。", [("convert_currency", {"amount": 200, "to": "EUR"})]),
    ("tool", None, "17.2", []),
    ("assistant", None, "大约 17.2 欧元。", []),
]
# LLaMA-Factory's sharegpt turns carry reasoning only inside a gpt answer, and one call per function_call turn.
SHAREGPT_TURNS = [
    ("user", None, "How many euros is 200 NOK?", []),
    ("assistant", None, "", [("convert_currency", {"amount": 200, "to": "EUR"})]),
    ("tool", None, "17.2", []),
    ("assistant", "The tool says 17.2; round to cents.", "200 NOK is about 17.20 euros.", []),
    ("user", None, "谢谢！", []),
    ("assistant", "用户在道谢，礼貌回应即可。", "不客气！", []),
]


def openai_record(turns, tools):
    """OpenAI chat format: `reasoning_content`, `tool_calls` with arguments as JSON text, `tool` messages."""
    messages = [{"role": "system", "content": SYSTEM}]
    for role, reasoning, text, calls in turns:
        message = {"role": role, "content": text or None}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [{"id": f"call_{i}", "type": "function", "function": {
                "name": name, "arguments": json.dumps(arguments)}} for i, (name, arguments) in enumerate(calls)]
        messages.append(message)
    return {"messages": messages, "tools": [{"type": "function", "function": tool} for tool in tools]}


def llamafactory_parts_record(turns, tools):
    """LLaMA-Factory's messages: typed parts text / reasoning / tool_call, `tool` messages, tools as JSON text."""
    messages = [{"role": "system", "content": [{"type": "text", "value": SYSTEM}]}]
    for role, reasoning, text, calls in turns:
        parts = [("reasoning", reasoning)] if reasoning else []
        parts += [("text", text)] if text else []
        parts += [("tool_call", json.dumps({"name": name, "arguments": arguments})) for name, arguments in calls]
        messages.append({"role": role, "content": [{"type": kind, "value": value} for kind, value in parts]})
    return {"messages": messages, "tools": json.dumps(tools)}


def sharegpt_record(turns, tools):
    """LLaMA-Factory's sharegpt: human / function_call / observation / gpt, reasoning as a <think> block opening
    the answer, bare tool specs as JSON text."""
    conversation = []
    for role, reasoning, text, calls in turns:
        if calls:
            (name, arguments), = calls
            conversation.append({"from": "function_call", "value": json.dumps({"name": name, "arguments": arguments})})
            continue
        value = f"<think>\n{reasoning}\n</think>\n\n{text}" if reasoning else text
        conversation.append({"from": {"user": "human", "assistant": "gpt", "tool": "observation"}[role],
                             "value": value})
    return {"conversations": conversation, "system": SYSTEM, "tools": json.dumps(tools)}


def qwen25_conversation(turns):
    """The conversation as Qwen2.5's template takes it (calls with object arguments). That template has no
    reasoning, so an answer's thinking is written at the start of its content, as Qwen3's template writes it: a
    <think> block and a blank line. Before calls with no text, the newline Qwen2.5 puts ahead of <tool_call>
    finishes that blank line (Qwen3 and LLaMA-Factory write it so)."""
    messages = [{"role": "system", "content": SYSTEM}]
    for role, reasoning, text, calls in turns:
        if reasoning:
            text = f"<think>\n{reasoning}\n</think>\n" + ("\n" + text if text or not calls else "")
        messages.append({"role": role, "content": text, **({"tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": arguments}} for name, arguments in calls]}
            if calls else {})})
    return messages


SHAPES = {
    "openai": (openai_record, TOOL_TURNS),
    "llamafactory parts": (llamafactory_parts_record, TOOL_TURNS),
    "llamafactory sharegpt": (sharegpt_record, SHAREGPT_TURNS),
}


@pytest.fixture(scope="module")
def qwen25(tokenizer):
    """Qwen2.5-0.5B-Instruct's own chat template, rendering through the real tokenizer."""
    template = json.loads((REFERENCE_TOKENIZER / "tokenizer_config.json").read_text())["chat_template"]
    return lambda messages, tools: tokenizer.apply_chat_template(messages, tools=tools, chat_template=template,
                                                                 tokenize=False)


def normalized(tmp_path, record) -> list[dict]:
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    records, counts = load_records(str(path), "sft")
    assert counts.kept == 1 and not counts.skipped
    return records[0]["messages"]


def stage_row(tokenizer, tmp_path, messages, train_on_reasoning: bool) -> dict:
    """input_ids and labels as the SFT stage's preparation makes them."""
    from mini_qwen_sft import conversation_preparation

    script_args = SimpleNamespace(turns="all", system_prompt_strategy="none", system_prompt="", identity_file=None,
                                  train_on_reasoning=train_on_reasoning)
    training_args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, max_length=1024, use_cpu=True,
                              bf16=False, report_to="none", activation_checkpointing=False)
    preparation = conversation_preparation([], tokenizer, script_args, training_args, {})
    return preparation.shape({"messages": messages, "category": ""}, UnitStats())


def trained_runs(tokenizer, labels: list[int]) -> list[str]:
    """The text of each maximal run of trained tokens."""
    runs, current = [], []
    for label in labels + [-100]:
        if label != -100:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


@needs_shared
@pytest.mark.parametrize("train_on_reasoning", [True, False], ids=["reasoning trained", "reasoning read only"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_shape_renders_as_qwen25_and_trains_exactly_the_assistant_turns(tokenizer, qwen25, tmp_path, shape,
                                                                           train_on_reasoning):
    make_record, turns = SHAPES[shape]
    tools = [WEATHER, CURRENCY]
    messages = normalized(tmp_path, make_record(turns, tools))
    official = qwen25(qwen25_conversation(turns), [{"type": "function", "function": tool} for tool in tools])
    assert "<think>" in official and official.count("<tool_response>") == sum(role == "tool" for role, *_ in turns)
    assert tokenizer.apply_chat_template(messages, tokenize=False) == official

    row = stage_row(tokenizer, tmp_path, messages, train_on_reasoning)
    assert row["input_ids"] == tokenizer(official, add_special_tokens=False)["input_ids"]
    # Trained: each assistant turn from its first character through <|im_end|>, calls included; nothing else.
    answers = re.findall(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", official, re.DOTALL)
    assert len(answers) == sum(role == "assistant" for role, *_ in turns)
    if not train_on_reasoning:
        answers = [re.sub(r"^<think>\n.*?\n</think>\n\n", "", answer, flags=re.DOTALL) for answer in answers]
        assert not any("<think>" in answer for answer in answers)
    assert trained_runs(tokenizer, row["labels"]) == answers


@needs_shared
def test_without_a_system_prompt_the_tools_block_opens_the_system_turn(tokenizer, qwen25, tmp_path):
    """The one deliberate difference from Qwen2.5's template: no "You are Qwen" identity where the data has no
    system prompt (this repo trains without a default one; Qwen3's template does the same with tools)."""
    record = openai_record(TOOL_TURNS[:5], [WEATHER])
    record["messages"] = record["messages"][1:]
    official = qwen25(qwen25_conversation(TOOL_TURNS[:5])[1:], record["tools"])
    assert official.startswith(f"<|im_start|>system\n{QWEN_IDENTITY}\n\n# Tools\n\n")
    assert tokenizer.apply_chat_template(normalized(tmp_path, record), tokenize=False) == official.replace(
        f"{QWEN_IDENTITY}\n\n", "", 1)


def test_reasoning_given_twice_or_alone_is_counted_not_guessed(tmp_path):
    def answer(**fields):
        return {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", **fields}]}
    path = tmp_path / "reasoning.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [
        answer(content="<think>\nTwo and two.\n</think>\n\n4"),
        answer(content="  <think>Two and two.</think>4"),  # normalised to the one way it is written
        answer(content="<think>\n\n</think>\n\n4"),  # an empty block is no reasoning
        answer(content=[{"type": "reasoning", "value": "Two "}, {"type": "reasoning", "value": "and two."},
                        {"type": "text", "value": "4"}]),
        answer(content="<think>\nTwo and two.\n</think>\n\n4", reasoning_content="Two and two."),
        answer(content=[{"type": "reasoning", "value": "Two and two."}]),
    ]), encoding="utf-8")
    records, counts = load_records(str(path), "sft")
    assert [r["messages"][1]["content"] for r in records] == [
        "<think>\nTwo and two.\n</think>\n\n4", "<think>\nTwo and two.\n</think>\n\n4", "4",
        "<think>\nTwo and two.\n</think>\n\n4"]
    assert counts.skipped == {"assistant reasoning given twice": 1, "empty assistant message": 1}


def test_sft_stage_trains_on_the_reasoning_and_tool_use_mini_data(tmp_path, tokenizer, pt_checkpoint):
    from datasets import Dataset

    from mini_qwen_sft import main

    files = sorted((REPO / "mini_data" / "sft_tools").iterdir())
    assert {f.name for f in files} == {"openai_messages.jsonl", "llamafactory_sharegpt.json",
                                       "llamafactory_messages.jsonl"}
    main(["--config", str(REPO / "configs" / "demo_sft.yaml"), *cpu_flags(tmp_path / "out", tmp_path / "cache"),
          "--init_from", str(pt_checkpoint), "--data_files", str(REPO / "mini_data" / "sft_tools"),
          # the longest record (tools block included) is 404 tokens: none is fitted or skipped
          "--max_length", "512", "--train_on_reasoning", "false",
          "--per_device_train_batch_size", "2", "--max_steps", "3", "--save_strategy", "no"])
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["records"]["kept"] == 20 and report["records"]["skipped"] == {}
    assert report["counts"] == {"fits": 20}
    (prepared,) = (tmp_path / "cache").glob("sft-*/data.arrow")
    rows = Dataset.from_file(str(prepared))
    inputs = [tokenizer.decode(row["input_ids"]) for row in rows]
    trained = [tokenizer.decode([i for i in row["labels"] if i != -100]) for row in rows]
    assert sum("<think>" in text for text in inputs) == 14 and not any("<think>" in text for text in trained)
    assert sum("<tool_call>\n{" in text for text in trained) == 12  # the calls, not the system prompt's example
    assert not any("<tool_response>" in text for text in trained)
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert len([entry["loss"] for entry in history if "loss" in entry]) == 3


# Every record of mini_data/sft_tools, and the conversation above in each shape.
TEMPLATE_CASES = dict(sft_tools_records()) | {
    f"{shape} (above)": make_record(turns, [WEATHER, CURRENCY]) for shape, (make_record, turns) in SHAPES.items()}


@pytest.mark.parametrize("name", list(TEMPLATE_CASES))
def test_the_chat_template_renders_openai_messages_as_their_training_text(tokenizer, tmp_path, name):
    """What the server (or llama.cpp) renders for an OpenAI request with tools, tool_calls, tool results and
    reasoning_content is the text, the ids and the trained tokens that SFT made of the same conversation."""
    record = TEMPLATE_CASES[name]
    training = normalized(tmp_path, record)
    messages, tools = openai_shaped(record)
    assert tokenizer.apply_chat_template(messages, tools=tools, tokenize=False) == chatml(training)
    rendered = tokenizer.apply_chat_template(messages, tools=tools, return_dict=True, return_assistant_tokens_mask=True)
    row = stage_row(tokenizer, tmp_path, training, train_on_reasoning=True)
    assert rendered["input_ids"] == row["input_ids"]
    assert row["labels"] == [i if trained else -100 for i, trained in zip(rendered["input_ids"],
                                                                          rendered["assistant_masks"])]


def calls_of(message: dict) -> list[tuple[str, dict]]:
    """(name, arguments as an object) of each OpenAI tool call of a message."""
    calls = [call["function"] for call in message.get("tool_calls") or []]
    return [(call["name"], json.loads(call["arguments"]) if isinstance(call["arguments"], str) else call["arguments"])
            for call in calls]


@pytest.mark.parametrize("name", [name for name, _ in sft_tools_records()])
def test_every_trained_answer_parses_back_into_its_message(tokenizer, tmp_path, name):
    """A reply written as the model learnt to write it gives back the reasoning, text and calls it was made from,
    which the template renders as that reply again (what a client sends back as history)."""
    record = TEMPLATE_CASES[name]
    messages, _ = openai_shaped(record)
    answers = [m for m in messages if m["role"] == "assistant"]
    trained = [m["content"] for m in normalized(tmp_path, record) if m["role"] == "assistant"]
    assert len(answers) == len(trained)
    for answer, text in zip(answers, trained):
        reasoning, content, calls = parse_assistant_output(text)
        assert calls_of({"tool_calls": calls}) == calls_of(answer)
        assert all(call["type"] == "function" and call["id"].startswith("call_") for call in calls)
        assert bool(reasoning) == text.startswith("<think>") and "<think>" not in content
        parsed = {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": calls}
        assert tokenizer.apply_chat_template([parsed], tokenize=False) == chatml([{"role": "assistant",
                                                                                   "content": text}])


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
# reply -> (reasoning, content, calls)
REPLIES = {
    "plain text, kept as written": ("  Paris.\n\n", "", "  Paris.\n\n", []),
    "reasoning and an answer": ("<think>\nCapital of France.\n</think>\n\nParis.", "Capital of France.", "Paris.", []),
    "reasoning written tight": ("<think>Capital?</think>Paris.", "Capital?", "Paris.", []),
    "reasoning then a call": (f"<think>\nCheck it.\n</think>\n\n{CALL}", "Check it.", "",
                              [("get_weather", {"city": "北京"})]),
    "text and two calls": (f"Let me look.\n{CALL}\n{CALL.replace('北京', 'Oslo')}", "", "Let me look.",
                           [("get_weather", {"city": "北京"}), ("get_weather", {"city": "Oslo"})]),
    "a call that is not JSON stays text": ("<tool_call>\n{get_weather: Oslo}\n</tool_call>", "",
                                           "<tool_call>\n{get_weather: Oslo}\n</tool_call>", []),
    "arguments that are not an object stay text": ('<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', "",
                                                   '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', []),
    "a call cut short stays text": ('x <tool_call>\n{"name": "get_w', "", 'x <tool_call>\n{"name": "get_w', []),
    "cut short while thinking": ("<think>\nStill thinking  \n", "Still thinking  ", "", []),
    "blank reasoning is none": ("<think>\n \n</think>\n\n4", "", "4", []),
    "tags that only start like ours": ("<thinking> is a word; a < b <tool", "", "<thinking> is a word; a < b <tool",
                                       []),
}


@pytest.mark.parametrize("name", list(REPLIES))
def test_a_reply_parses_the_same_whole_and_streamed(name):
    """Streamed one character at a time (the worst split), every piece sent is part of the final parse, and all
    of it together is the parse of the whole reply: a client never sees text it must take back."""
    reply, reasoning, content, calls = REPLIES[name]
    whole = parse_assistant_output(reply)
    assert whole[:2] == (reasoning, content) and calls_of({"tool_calls": whole[2]}) == calls
    stream, sent = AssistantStream(), ["", ""]
    for character in reply:
        for index, delta in enumerate(stream.feed(character)):
            sent[index] += delta
            assert whole[index].startswith(sent[index])
    *rest, streamed_calls = stream.finish()
    assert [a + b for a, b in zip(sent, rest)] == [reasoning, content]
    assert calls_of({"tool_calls": streamed_calls}) == calls
