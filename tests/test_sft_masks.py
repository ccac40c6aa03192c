"""SFT trains exactly the assistant tokens (the original trained only what followed the answer's last newline),
and over-long conversations are fitted without losing their answer."""

import random

import pytest
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from conftest import TINY_CONFIG
from utils.chat import add_system_prompt, count_tokens, fit_to_length, select_turns
from utils.data import SkipRecord
from utils.modeling import build_model

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


def trained_batch(tokenizer, conversations, tmp_path):
    """The batch TRL's SFTTrainer really feeds the model, built through the stage's own settings."""
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, max_length=512, use_cpu=True, bf16=False,
                     report_to="none", per_device_train_batch_size=len(conversations), activation_checkpointing=False)
    trainer = SFTTrainer(model=build_model(str(TINY_CONFIG), None, "sdpa"), args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"messages": c} for c in conversations]))
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
    assert labels.count(-100) + sum(label != -100 for label in labels) == len(ids)
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


def test_overlong_history_loses_oldest_turns_first(tokenizer):
    long_turn = "很长的历史对话。" * 40
    messages = [{"role": "user", "content": long_turn}, {"role": "assistant", "content": long_turn},
                {"role": "user", "content": "最后的问题？"}, {"role": "assistant", "content": "最后的回答。"}]
    fitted, action = fit_to_length(messages, tokenizer, 128)
    assert action == "dropped oldest turns" and fitted == messages[2:]


def test_overlong_prompt_is_shortened_never_the_answer(tokenizer):
    answer = "The answer keeps every one of its words."
    messages = [{"role": "user", "content": "Summarise this. " + "word " * 600 + "What is the gist?"},
                {"role": "assistant", "content": answer}]
    fitted, action = fit_to_length(messages, tokenizer, 128)
    assert action == "prompt shortened"
    assert count_tokens(fitted, tokenizer) <= 128
    assert fitted[-1]["content"] == answer
    assert fitted[0]["content"].startswith("Summarise this.") and fitted[0]["content"].endswith("What is the gist?")


def test_answer_longer_than_max_length_is_skipped_with_a_reason(tokenizer):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "long answer " * 200}]
    with pytest.raises(SkipRecord, match="answer alone is longer than max_length"):
        fit_to_length(messages, tokenizer, 128)


def test_packed_rows_keep_each_sample_to_itself(tokenizer, tmp_path):
    """`packing: true` puts several conversations in one row; with sdpa the stage's DocumentMaskCollator must
    make each one's logits equal to the same conversation alone."""
    import torch

    from utils.packing import DocumentMaskCollator

    conversations = [CASES["single turn"], CASES["with system prompt"], CASES["answer starts with a newline"]]
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, packing=True, max_length=512, use_cpu=True,
                     bf16=False, report_to="none", per_device_train_batch_size=1, activation_checkpointing=False)
    model = build_model(str(TINY_CONFIG), None, "sdpa").eval()
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"messages": c} for c in conversations]))
    row = trainer.train_dataset[0]
    batch = DocumentMaskCollator(trainer.data_collator, "sdpa")([row])
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == 3 and batch["attention_mask"].shape[-2:] == batch["input_ids"].shape[-1:] * 2
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"]).logits[0]
        ends = starts[1:] + [batch["input_ids"].shape[1]]
        for start, end in zip(starts, ends):
            alone = model(input_ids=batch["input_ids"][:, start:end]).logits[0]
            torch.testing.assert_close(packed[start:end], alone, atol=1e-4, rtol=1e-4)


def test_identity_data_is_mixed_in_with_its_placeholders_filled(tokenizer):
    from types import SimpleNamespace

    from conftest import REPO
    from mini_qwen_sft import conversation_rows

    script_args = SimpleNamespace(turns="all", system_prompt_strategy="none", system_prompt="", identity_repeat=2,
                                  identity_file=str(REPO / "mini_data" / "identity" / "identity.jsonl"),
                                  identity_name="小Q", identity_author="Ada Lovelace")
    report = {}
    rows = list(conversation_rows([str(REPO / "mini_data" / "sft" / "Gen" / "train-00000-of-00001.parquet")],
                                  tokenizer, script_args, 1024, 0, report))
    identity_rows = [r for r in rows if "Ada Lovelace" in r["messages"][-1]["content"]]
    assert report["identity"]["kept"] == 2 * 16 and len(rows) == report["records"]["kept"] + 32
    assert len(identity_rows) >= 2 * 6
    assert not any("{{" in m["content"] for r in rows for m in r["messages"])
