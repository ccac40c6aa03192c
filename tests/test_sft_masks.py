"""SFT trains exactly the assistant tokens (the original trained only what followed the answer's last newline),
and over-long conversations are fitted without losing their answer."""

import random
from types import SimpleNamespace

import pytest
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from conftest import REFERENCE, REPO, TINY_CONFIG
from utils.chat import ChatTokens, add_system_prompt, check_template_matches, select_turns
from utils.errors import ConfigError
from utils.files import SkipRecord
from utils.formats import load_records
from utils.modeling import build_model
from utils.prepare import UnitStats
from utils.tokenizer import CHAT_TEMPLATE

SYSTEM = {"role": "system", "content": "你是一个乐于助人的助手。"}
CASES = {
    "single turn": [{"role": "user", "content": "李白是谁？"},
                    {"role": "assistant", "content": "李白是唐代诗人。\n他被称为诗仙。"}],
    "multi turn": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4.\nIt is four."},
                   {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6.\nSix."},
                   {"role": "user", "content": "再加一?"}, {"role": "assistant", "content": "7。"}],
    "with system prompt": [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}],
    "answer starts with a newline": [{"role": "user", "content": "code?"},
                                     {"role": "assistant", "content": "\n```python\nprint(1)\n```"}],
}


def stage_args(tmp_path, **overrides) -> SFTConfig:
    settings = dict(output_dir=str(tmp_path), assistant_only_loss=True, max_length=512, use_cpu=True, bf16=False,
                    report_to="none", per_device_train_batch_size=1, activation_checkpointing=False)
    return SFTConfig(**(settings | overrides))


def stage_rows(tokenizer, conversations, training_args, category="", **script_overrides) -> list[dict]:
    """Rows as the SFT stage's preparation workers make them."""
    from mini_qwen_sft import conversation_preparation

    script_args = SimpleNamespace(**({"turns": "all", "system_prompt_strategy": "none", "system_prompt": "",
                                      "identity_file": None, "train_on_reasoning": True} | script_overrides))
    preparation = conversation_preparation([], tokenizer, script_args, training_args, {})
    return [preparation.shape({"messages": c, "category": category}, UnitStats()) for c in conversations]


def trained_batch(tokenizer, conversations, tmp_path):
    """The batch the SFT stage really feeds the model: its prepared rows through SFTTrainer as the stage sets it up
    (its own labels, TRL's preparation skipped)."""
    args = stage_args(tmp_path, per_device_train_batch_size=len(conversations))
    rows = stage_rows(tokenizer, conversations, args)
    args.assistant_only_loss, args.dataset_kwargs = False, {"skip_prepare_dataset": True}
    trainer = SFTTrainer(model=build_model(str(TINY_CONFIG), None, "sdpa"), args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(rows))
    return next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("name", list(CASES))
def test_every_assistant_token_is_trained_and_nothing_else(tokenizer, tmp_path, name):
    messages = CASES[name]
    batch = trained_batch(tokenizer, [messages], tmp_path)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    trained = tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    untrained = tokenizer.decode([i for i, label in zip(ids, labels) if label == -100])
    answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    # A reply that starts with "\n" merges with the template's newline into one token ("\n\n"), which is trained.
    assert trained.replace("\n\n```", "\n```") == "".join(answers)
    for message in messages:
        if message["role"] != "assistant":
            assert message["content"] in untrained and message["content"] not in trained
    # labels are the input ids themselves where trained (the model shifts them), not ids moved by one
    assert len(labels) == len(ids) and all(label in (-100, token) for label, token in zip(labels, ids))
    assert ids.count(tokenizer.eos_token_id) == sum(label == tokenizer.eos_token_id for label in labels) + sum(
        m["role"] != "assistant" for m in messages)  # every assistant <|im_end|> trained, no other


def test_turns_first_keeps_the_first_exchange():
    messages = [SYSTEM] + CASES["multi turn"]
    assert select_turns(messages, "first") == messages[:3]
    assert select_turns(messages, "all") == messages


def test_mixed_system_prompts_are_half_default_half_by_category():
    rng = random.Random(42)
    chosen = [add_system_prompt(CASES["single turn"], "mathematical ability", "mixed", rng, "DEFAULT")[0]["content"]
              for _ in range(400)]
    share_default = chosen.count("DEFAULT") / len(chosen)
    assert 0.4 < share_default < 0.6
    assert all(c == "DEFAULT" or "mathematics" in c for c in chosen)
    assert add_system_prompt([SYSTEM] + CASES["single turn"], "x", "uniform", rng, "DEFAULT")[0] == SYSTEM


def test_chat_tokens_equal_the_chat_template_ids_and_assistant_mask(tokenizer):
    """The stage tokenizes message by message; it must give exactly what rendering the template and tokenizing
    the text gives, ids and assistant mask, on real conversations and on whitespace that merges across pieces."""
    sources = [REPO / "mini_data" / "sft", REPO / "mini_data" / "identity"]
    sources += [REFERENCE / "mini_data" / "sft"] if REFERENCE.is_dir() else []
    conversations = [r["messages"] for r in load_records([str(p) for p in sources], "sft")[0]]
    conversations += [CASES["answer starts with a newline"],
                      [{"role": "user", "content": "\n\n hi"}, {"role": "assistant", "content": "  spaced\n"}],
                      [{"role": "system", "content": " s"}, {"role": "user", "content": "\tq"},
                       {"role": "assistant", "content": "\r\nA"}]]
    assert len(conversations) > 100
    chat = ChatTokens(tokenizer)
    for messages in conversations:
        expected = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        ids, labels = chat.encode_bodies(messages, [chat.body(m) for m in messages])
        assert ids == expected["input_ids"]
        assert labels == [i if m else -100 for i, m in zip(expected["input_ids"], expected["assistant_masks"])]


# Edits of the template that ChatTokens would not follow: (text, its replacement).
TEMPLATE_EDITS = {
    "generation block moved over the role": (
        "{{- '<|im_start|>assistant\\n' }}\n        {%- generation %}",
        "{%- generation %}\n        {{- '<|im_start|>assistant\\n' }}"),
    "newline dropped before </tool_response>": ("'\\n</tool_response>'", "'</tool_response>'"),
    "tools header reworded": ("You may call one or more functions", "You may call functions"),
    "template broken": ("{%- if tools %}", "{%- if tools %"),
}


def test_the_start_up_probe_passes_on_the_real_template(tokenizer):
    check_template_matches(tokenizer)


@pytest.mark.parametrize("edit", list(TEMPLATE_EDITS))
def test_the_start_up_probe_names_both_files_when_the_template_drifts(tokenizer, monkeypatch, edit):
    old, new = TEMPLATE_EDITS[edit]
    assert CHAT_TEMPLATE.count(old) == 1
    monkeypatch.setattr(tokenizer, "chat_template", CHAT_TEMPLATE.replace(old, new))
    with pytest.raises(ConfigError) as error:
        check_template_matches(tokenizer)
    message = str(error.value)
    assert "utils/chat_template.jinja" in message and "utils/chat.py" in message and "\n" not in message


def test_overlong_history_loses_oldest_turns_first(tokenizer):
    long_turn = "很长的历史对话。" * 40
    messages = [{"role": "user", "content": long_turn}, {"role": "assistant", "content": long_turn},
                {"role": "user", "content": "最后的问题？"}, {"role": "assistant", "content": "最后的回答。"}]
    fitted, bodies, action = ChatTokens(tokenizer).fit(messages, 128)
    assert action == "dropped oldest turns" and fitted == messages[2:]


def test_overlong_prompt_is_shortened_in_the_middle_to_exactly_max_length_never_the_answer(tokenizer):
    answer = "The answer keeps every one of its words."
    messages = [{"role": "user", "content": "Summarise this. " + "word " * 600 + "What is the gist?"},
                {"role": "assistant", "content": answer}]
    chat = ChatTokens(tokenizer)
    fitted, bodies, action = chat.fit(messages, 128)
    ids, labels = chat.encode_bodies(fitted, bodies)
    assert action == "prompt shortened" and len(ids) == 128
    assert tokenizer.decode([i for i in labels if i != -100]) == answer + "<|im_end|>"
    prompt = tokenizer.decode(ids[: ids.index(tokenizer.convert_tokens_to_ids("<|im_end|>"))])
    assert prompt.startswith("<|im_start|>user\nSummarise this.") and prompt.endswith("What is the gist?")
    assert "\n…\n" in prompt


def test_answer_longer_than_max_length_is_skipped_with_a_reason(tokenizer):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "long answer " * 200}]
    with pytest.raises(SkipRecord, match="answer alone is longer than max_length"):
        ChatTokens(tokenizer).fit(messages, 128)


def test_mixed_system_prompts_are_drawn_per_conversation_the_same_in_any_worker(tokenizer, tmp_path):
    conversations = [[{"role": "user", "content": f"问题 {i}"}, {"role": "assistant", "content": f"回答 {i}"}]
                     for i in range(200)]
    args = stage_args(tmp_path)
    settings = dict(category="mathematical ability", system_prompt_strategy="mixed", system_prompt="DEFAULT")
    first = stage_rows(tokenizer, conversations, args, **settings)
    again = stage_rows(tokenizer, list(reversed(conversations)), args, **settings)
    assert first == list(reversed(again))  # a conversation's draw depends on itself, not on what came before
    prompts = [tokenizer.decode(row["input_ids"]).split("<|im_end|>")[0] for row in first]
    default = sum(p == "<|im_start|>system\nDEFAULT" for p in prompts)
    by_category = sum("mathematics tutor" in p for p in prompts)
    assert 60 < default < 140 and default + by_category == 200


def test_a_padded_batch_of_several_conversations_trains_each_as_alone(tokenizer, tmp_path):
    """Conversations of different lengths in one batch: the shorter ones are padded on the right with untrained
    positions, and each row's ids and labels are those of the conversation in a batch of its own."""
    conversations = [CASES["single turn"], CASES["multi turn"], CASES["with system prompt"]]
    batch = trained_batch(tokenizer, conversations, tmp_path)
    alone = [trained_batch(tokenizer, [conversation], tmp_path) for conversation in conversations]
    rows = []
    for single in alone:  # the sampler shuffles: find each conversation's row by its ids
        length = single["input_ids"].shape[1]
        (row,) = [r for r in range(len(conversations))
                  if batch["input_ids"][r, :length].tolist() == single["input_ids"][0].tolist()]
        assert batch["labels"][row, :length].tolist() == single["labels"][0].tolist()
        assert (batch["labels"][row, length:] == -100).all() and (batch["attention_mask"][row, length:] == 0).all()
        rows.append(row)
    assert sorted(rows) == [0, 1, 2]
    assert batch["input_ids"].shape[1] == max(single["input_ids"].shape[1] for single in alone)


def test_identity_data_is_mixed_in_with_its_placeholders_filled(tokenizer, tmp_path):
    from mini_qwen_sft import conversation_preparation
    from utils.prepare import prepare_or_load

    script_args = SimpleNamespace(turns="all", system_prompt_strategy="none", system_prompt="", identity_repeat=2,
                                  train_on_reasoning=True,
                                  identity_file=str(REPO / "mini_data" / "identity" / "identity.jsonl"),
                                  identity_name="小Q", identity_author="Ada Lovelace")
    preparation = conversation_preparation([str(REPO / "mini_data" / "sft" / "Gen" / "train-00000-of-00001.parquet")],
                                           tokenizer, script_args, stage_args(tmp_path, max_length=1024), {"t": 1})
    dataset, report = prepare_or_load(preparation, str(tmp_path / "cache"), 1, world_size=1)
    answers = [tokenizer.decode([i for i in row["labels"] if i != -100]) for row in dataset]
    assert report["identity"]["kept"] == 2 * 16 and len(dataset) == report["records"]["kept"] + 32
    assert sum("Ada Lovelace" in answer for answer in answers) >= 2 * 6
    assert not any("{{" in tokenizer.decode(row["input_ids"]) for row in dataset)
