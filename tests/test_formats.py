"""Richer record conventions (typed parts, tool use, reasoning, more shapes) become plain ChatML messages, each test
reading small files through the real loader; what cannot be used is counted under a reason that says why."""

import json

import pytest

from conftest import REFERENCE_TOKENIZER, needs_shared
from utils.formats import load_records

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Today's weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# Qwen2.5's tools block, written out here rather than imported, so that a change to the wording is caught.
TOOLS_BLOCK = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(WEATHER_TOOL, ensure_ascii=False)
    + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
    "</tool_call>"
)
KTO_REASON = ("labelled (KTO-style) record: label true/false marks desirable/undesirable replies; SFT would train on "
              "the undesirable ones, and DPO needs chosen/rejected pairs")


def write_jsonl(tmp_path, name: str, rows: list[dict]) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def split_by_assistant_mask(tokenizer, messages) -> tuple[list[int], list[int], str, str]:
    """(input ids, assistant mask, the text trained on, the text not trained on) of messages under our template."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    ids, mask = rendered["input_ids"], rendered["assistant_masks"]
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    untrained = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    return ids, mask, trained, untrained


def test_json_looking_message_text_is_kept_verbatim(tmp_path):
    pairs = write_jsonl(tmp_path, "pairs.jsonl", [
        {"prompt": "First three ids?", "chosen": "[71, 269, 3]", "rejected": "[1, 2]"},
        {"prompt": '{"k": 1}', "chosen": '{"k": 1} is an object', "rejected": '{"k": 2}'},
    ])
    records, counts = load_records(pairs, "dpo")
    assert counts.kept == 2 and not counts.skipped
    assert records[0] == {"prompt": [user("First three ids?")], "chosen": [assistant("[71, 269, 3]")],
                          "rejected": [assistant("[1, 2]")]}
    assert records[1]["prompt"] == [user('{"k": 1}')] and records[1]["rejected"] == [assistant('{"k": 2}')]

    chats = write_jsonl(tmp_path, "chats.jsonl", [
        {"messages": [user("ids?"), assistant("[71, 269, 3]")]},
        {"messages": [user('{"k": 1}'), assistant("{'k': 1}")]},
    ])
    records, counts = load_records(chats, "sft")
    assert counts.kept == 2 and not counts.skipped
    assert [r["messages"] for r in records] == [[user("ids?"), assistant("[71, 269, 3]")],
                                                [user('{"k": 1}'), assistant("{'k': 1}")]]


def test_structure_columns_stored_as_their_text_still_parse(tmp_path):
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "[1, 2]"}]
    chats = write_jsonl(tmp_path, "chats.jsonl", [
        {"conversations": json.dumps(turns), "label": None},
        # Infinity-Instruct exports: Python text of the list and of the label struct
        {"conversations": repr(turns), "label": repr({"cate_ability_en": ["mathematical ability"]})},
    ])
    records, counts = load_records(chats, "sft")
    assert counts.kept == 2 and not counts.skipped
    assert [r["messages"] for r in records] == [[user("hi"), assistant("[1, 2]")]] * 2
    assert [r["category"] for r in records] == ["", "mathematical ability"]

    pairs = write_jsonl(tmp_path, "pairs.jsonl", [  # Infinity-Preference with its message lists as Python text
        {"prompt": "2+2?", "chosen": repr([user("2+2?"), assistant("4")]),
         "rejected": json.dumps([user("2+2?"), assistant("5")])},
    ])
    records, counts = load_records(pairs, "dpo")
    assert records == [{"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}]


def test_typed_text_parts_are_joined_and_other_parts_skip_the_record(tmp_path):
    path = write_jsonl(tmp_path, "parts.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe "},
                                                   {"type": "text", "text": "this."}]},
                      {"role": "assistant", "content": [{"type": "text", "value": "A cat."}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                                   {"type": "text", "text": "Describe this."}]},
                      assistant("A cat.")]},
        {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}, assistant("Noise.")]},
    ])
    records, counts = load_records(path, "sft")
    assert [r["messages"] for r in records] == [[user("Describe this."), assistant("A cat.")]]
    assert counts.skipped == {"non-text content part 'image'": 1, "non-text content part 'audio'": 1}


def openai_weather_conversation(arguments_as_text: bool) -> list[dict]:
    def call(city):
        arguments = {"city": city}
        return {"id": f"call_{city}", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps(arguments) if arguments_as_text else arguments}}
    return [
        {"role": "system", "content": "You are a weather bot."},
        user("Weather in Paris and Rome?"),
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call("Paris"), call("Rome")]},
        {"role": "tool", "tool_call_id": "call_Paris", "content": "18°C"},
        {"role": "tool", "tool_call_id": "call_Rome", "content": "21°C"},
        assistant("Paris has 18°C, Rome 21°C."),
    ]


@needs_shared
def test_openai_tool_use_becomes_qwen25_text_with_calls_trained_and_results_not(tmp_path, tokenizer):
    path = write_jsonl(tmp_path, "tools.jsonl", [
        {"messages": openai_weather_conversation(arguments_as_text=True), "tools": [WEATHER_TOOL]}])
    records, counts = load_records(path, "sft")
    assert counts.kept == 1 and not counts.skipped
    messages = records[0]["messages"]
    assert messages == [
        {"role": "system", "content": "You are a weather bot.\n\n" + TOOLS_BLOCK},
        user("Weather in Paris and Rome?"),
        assistant('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                  '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'),
        user("<tool_response>\n18°C\n</tool_response>\n<tool_response>\n21°C\n</tool_response>"),
        assistant("Paris has 18°C, Rome 21°C."),
    ]

    # Our plain ChatML rendering is, character for character, what Qwen2.5's own template makes of the original.
    qwen25_template = json.loads((REFERENCE_TOKENIZER / "tokenizer_config.json").read_text())["chat_template"]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(
        openai_weather_conversation(arguments_as_text=False), tools=[WEATHER_TOOL], chat_template=qwen25_template,
        tokenize=False)

    ids, mask, trained, untrained = split_by_assistant_mask(tokenizer, messages)
    call_start = tokenizer.convert_tokens_to_ids("<tool_call>")
    call_positions = [index for index, token in enumerate(ids) if token == call_start]
    assert len(call_positions) == 4  # two in the system message's instructions, two calls
    assert [mask[index] for index in call_positions] == [0, 0, 1, 1]
    assert '"arguments": {"city": "Rome"}' in trained
    assert "<tool_response>\n18°C\n</tool_response>" in untrained and "<tool_response>" not in trained


def test_llamafactory_function_call_and_observation_turns(tmp_path, tokenizer):
    bare_spec = WEATHER_TOOL["function"]  # LLaMA-Factory's tools column: bare specs, as JSON text
    path = write_jsonl(tmp_path, "glaive.jsonl", [{"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": '{"temperature": "18°C"}'},
        {"from": "gpt", "value": "It is 18°C in Paris."},
    ], "tools": json.dumps([bare_spec])}])
    records, counts = load_records(path, "sft")
    assert counts.kept == 1 and not counts.skipped
    messages = records[0]["messages"]
    assert messages == [
        {"role": "system", "content": TOOLS_BLOCK},  # bare specs wrapped as {"type": "function", "function": ...}
        user("Weather in Paris?"),
        assistant('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
        user('<tool_response>\n{"temperature": "18°C"}\n</tool_response>'),
        assistant("It is 18°C in Paris."),
    ]
    ids, mask, trained, untrained = split_by_assistant_mask(tokenizer, messages)
    call_start = tokenizer.convert_tokens_to_ids("<tool_call>")
    assert [m for token, m in zip(ids, mask) if token == call_start] == [0, 0, 1]  # system instructions, the call
    assert "<tool_response>" in untrained and "temperature" not in trained


def test_unusable_tool_use_is_counted_by_reason(tmp_path):
    def call(arguments, name="get_weather"):
        return {"role": "assistant", "content": None,
                "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}
    result = {"role": "tool", "content": "18°C"}
    path = write_jsonl(tmp_path, "tools.jsonl", [
        {"messages": [user("Paris?"), result, assistant("18°C.")], "tools": None},
        {"messages": [user("Paris?"), call({"city": "Paris"}), assistant("18°C.")], "tools": None},
        {"messages": [user("Paris?"), call('{"city": "Par'), result, assistant("18°C.")], "tools": None},
        {"messages": [user("Paris?"), call({"city": "Paris"}, name=""), result, assistant("18°C.")], "tools": None},
        {"messages": [user("Paris?"), call({"city": "Paris"}), result, assistant("18°C.")], "tools": "get_weather"},
        {"messages": [user("Paris?"), {"role": "function_call", "content": "get_weather(Paris)"}, result,
                      assistant("18°C.")], "tools": None},
        {"messages": [user("Paris?"), call({"city": "Paris"}), result, assistant("18°C.")], "tools": None},
    ])
    records, counts = load_records(path, "sft")
    assert counts.kept == 1
    assert counts.skipped == {
        "roles do not alternate user/assistant (got user at turn 1)": 1,
        "roles do not alternate user/assistant (got assistant at turn 2)": 1,
        "tool call arguments are not valid JSON": 1,
        "tool call without a function name": 1,
        "tools is not a list of function specs": 1,
        "tool call is not a {name, arguments} object": 1,
    }


def test_reasoning_becomes_a_trained_think_block(tmp_path, tokenizer):
    path = write_jsonl(tmp_path, "reasoning.jsonl", [
        {"messages": [user("2+2?"), {"role": "assistant", "content": "4", "reasoning_content": "\nTwo and two.\n"}]},
        {"messages": [user("3+3?"), {"role": "assistant", "content": "6", "reasoning": "Three and three."}]},
        {"messages": [user("4+4?"), {"role": "assistant", "content": "8", "thinking": "Four and four."}]},
        {"messages": [user("5+5?"), {"role": "assistant", "content": "10", "reasoning_content": ""}]},
    ])
    records, counts = load_records(path, "sft")
    assert counts.kept == 4 and not counts.skipped
    assert [r["messages"][1]["content"] for r in records] == [
        "<think>\nTwo and two.\n</think>\n\n4", "<think>\nThree and three.\n</think>\n\n6",
        "<think>\nFour and four.\n</think>\n\n8", "10"]
    _, _, trained, untrained = split_by_assistant_mask(tokenizer, records[0]["messages"])
    assert trained == "<think>\nTwo and two.\n</think>\n\n4<|im_end|>" and "<think>" not in untrained


def test_kto_labelled_records_are_refused_by_sft_and_dpo(tmp_path):
    chats = write_jsonl(tmp_path, "kto_chats.jsonl", [
        {"messages": [user("hi"), assistant("hello")], "label": True},
        {"messages": [user("hi"), assistant("go away")], "label": False},
        {"messages": [user("hi"), assistant("go away")], "label": "false"},
        # Infinity-Instruct's label is a struct of abilities, or its text: a category, not a verdict
        {"messages": [user("hi"), assistant("hello")], "label": {"cate_ability_en": ["creativity and design"]}},
        {"messages": [user("hi"), assistant("hello")], "label": repr({"cate_ability_en": ["stem knowledge"]})},
    ])
    records, counts = load_records(chats, "sft")
    assert counts.skipped == {KTO_REASON: 3}
    assert [r["category"] for r in records] == ["creativity and design", "stem knowledge"]

    completions = [{"prompt": "hi", "completion": "hello", "label": True},
                   {"prompt": "hi", "completion": "go away", "label": "False"}]
    for kind in ("sft", "dpo"):
        records, counts = load_records(write_jsonl(tmp_path, f"kto_{kind}.jsonl", completions), kind)
        assert records == [] and counts.skipped == {KTO_REASON: 2}
    records, counts = load_records(chats, "dpo")
    assert records == [] and counts.skipped == {
        KTO_REASON: 3, "no chosen/rejected pair: prompt/completion or messages data is not preference data": 2}


def test_firefly_moss_and_xtuner_conversation_shape(tmp_path):
    path = write_jsonl(tmp_path, "firefly.jsonl", [
        {"conversation": [{"human": "hi", "assistant": "hello"}, {"human": "more", "assistant": "answer"}],
         "category": "Brainstorming", "system": None},
        {"conversation": [{"human": "hi", "assistant": "hello"}], "category": "", "system": "Be brief."},
        {"conversation": [{"system": "Be kind.", "input": "q", "output": "a"}], "category": "", "system": None},
        {"conversation": [{"human": "q", "assistant": "a"}, {"human": "unanswered"}], "category": "", "system": None},
        {"conversation": [{"human": "q", "assistant": "  "}], "category": "", "system": None},
    ])
    records, counts = load_records(path, "sft")
    assert records == [
        {"messages": [user("hi"), assistant("hello"), user("more"), assistant("answer")], "category": "Brainstorming"},
        {"messages": [{"role": "system", "content": "Be brief."}, user("hi"), assistant("hello")], "category": ""},
        {"messages": [{"role": "system", "content": "Be kind."}, user("q"), assistant("a")], "category": ""},
        {"messages": [user("q"), assistant("a")], "category": ""},
    ]
    assert counts.skipped == {"empty assistant message": 1}


def test_dpo_chosen_messages_and_rejected_messages(tmp_path):
    history = [user("hi"), assistant("hello"), user("2+2?")]
    path = write_jsonl(tmp_path, "pairs.jsonl", [
        {"chosen_messages": history + [assistant("4")], "rejected_messages": history + [assistant("5")]},
        {"chosen_messages": history + [assistant("4")], "rejected_messages": [user("3+3?"), assistant("5")]},
        {"chosen_messages": history, "rejected_messages": history + [assistant("5")]},
    ])
    records, counts = load_records(path, "dpo")
    assert records == [{"prompt": history, "chosen": [assistant("4")], "rejected": [assistant("5")]}]
    assert counts.skipped == {"chosen and rejected answer different prompts": 1,
                              "chosen answer does not end with an assistant message": 1}


def test_hh_rlhf_transcripts_split_at_the_last_assistant_turn(tmp_path):
    dialogue = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more please"
    path = write_jsonl(tmp_path, "hh.jsonl", [
        {"chosen": dialogue + "\n\nAssistant: a good answer", "rejected": dialogue + "\n\nAssistant: a bad one"},
        {"chosen": dialogue + "\n\nAssistant: a good answer",
         "rejected": "\n\nHuman: hi\n\nAssistant: hey\n\nHuman: more please\n\nAssistant: a bad one"},
        {"chosen": "a good answer", "rejected": "a bad one"},
        {"chosen": "Human: hi\n\nAssistant: yes", "rejected": "Human: hi\n\nAssistant: no"},  # stripped variant
        {"chosen": "Intro\n\nHuman: hi\n\nAssistant: yes", "rejected": "Intro\n\nHuman: hi\n\nAssistant: no"},
    ])
    records, counts = load_records(path, "dpo")
    assert records == [
        {"prompt": [user("hi"), assistant("hello"), user("more please")],
         "chosen": [assistant("a good answer")], "rejected": [assistant("a bad one")]},
        {"prompt": [user("hi")], "chosen": [assistant("yes")], "rejected": [assistant("no")]},
    ]
    assert counts.skipped == {
        "chosen and rejected answer different prompts": 1,
        "no prompt: no prompt column, and chosen is not a Human:/Assistant: transcript": 1,
        "chosen transcript does not start with a Human: turn": 1}


def test_a_prompt_field_that_disagrees_with_the_embedded_prompt_is_skipped(tmp_path):
    def pair(prompt, embedded="What is 2+2?"):  # whitespace at the ends is no disagreement, here or below
        return {"prompt": prompt, "chosen": [user(embedded), assistant("4")],
                "rejected": [user(embedded + " "), assistant("5")]}
    path = write_jsonl(tmp_path, "pairs.jsonl", [
        pair("What is 2+2?"),
        pair(" What is 2+2?\n"),
        pair("What is 2+2?", embedded="What is 2+2?\n"),
        pair("What is 3+3?"),
        pair([user("What is 2+2?")]),  # TRL's conversational prompt
        pair([user("What is 3+3?")]),
    ])
    records, counts = load_records(path, "dpo")
    expected = {"prompt": [user("What is 2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}
    assert records == [expected] * 2 + [{**expected, "prompt": [user("What is 2+2?\n")]}] + [expected]
    assert counts.skipped == {"prompt field disagrees with the prompt inside chosen/rejected": 2}

    conversational = write_jsonl(tmp_path, "trl.jsonl", [
        {"prompt": [user("What is 2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}])
    assert load_records(conversational, "dpo")[0] == [expected]


@pytest.mark.parametrize("messages, reason", [
    ([user("hi"), {"role": "assistant", "content": "x", "tool_calls": "call it"}], "tool_calls is not a list"),
    ([{"role": "user", "content": "hi", "tool_calls": [{"name": "f", "arguments": {}}]}, assistant("x")],
     "tool_calls on a user message"),
    ([user("hi"), {"role": "assistant", "content": "x", "reasoning_content": ["step"]}],
     "assistant reasoning is not a string"),
], ids=["tool_calls text", "tool_calls on user", "reasoning list"])
def test_malformed_assistant_fields_are_counted(tmp_path, messages, reason):
    records, counts = load_records(write_jsonl(tmp_path, "bad.jsonl", [{"messages": messages}]), "sft")
    assert records == [] and counts.skipped == {reason: 1}
