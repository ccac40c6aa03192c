"""The offline tokenizer must be Qwen2.5's, id for id."""

import pytest
from transformers import AutoTokenizer

from conftest import REFERENCE, REFERENCE_TOKENIZER, REPO, needs_shared
from utils.tokenizer import ADDED_TOKENS, FIRST_ADDED_ID, build_tokenizer_from_ranks, load_tokenizer

MIXED_TEXT = (
    "李白（701年－762年），字太白，号青莲居士，唐代伟大的浪漫主义诗人。床前明月光，疑是地上霜。\n"
    "Hello, world! It's 2024-11-25; pi ≈ 3.14159265358979 and 1234567890 + 98765 = 1333333.\n"
    "def fibonacci(n: int) -> int:\n\tif n < 2:\n\t\treturn n\n    return fibonacci(n - 1) + fibonacci(n - 2)  # O(2^n)\n"
    "    \n\n\n   \t  trailing spaces   \r\n"
    "Emoji 😀🎉👍🏽🇨🇳 family 👨‍👩‍👧; café naïve résumé Ångström; Ｆｕｌｌｗｉｄｔｈ　全角，标点！？\n"
    "日本語のテキストも少し。한국어 문장도. Привет, мир! العربية\n"
    "I'LL SAY it: you've, they're, we'd, she's. URL https://example.com/a?b=c&d=e#frag\n"
    "Special tokens in text: <|im_start|>user\nhi<|im_end|> <|endoftext|> <tool_call>{\"a\": [1, 2]}</tool_call>\n"
    "Combining: e\u0301 (e + acute) vs é; Hangul jamo \u1100\u1161.\n"
    "      indented code\n\t\ttabs\n" + "数字123456789零一二三四五六七八九十百千万亿。" * 3
)


def real_samples() -> list[str]:
    """Real zh/en prose and code from the original's data files."""
    from utils.formats import load_records

    texts = [r["text"] for r in load_records(str(REFERENCE / "mini_data" / "pt"), "pt")[0][::20]]
    conversations = load_records(str(REFERENCE / "mini_data" / "sft"), "sft")[0][:5]
    return texts + [m["content"] for c in conversations for m in c["messages"]]


@needs_shared
def test_rebuilt_tokenizer_matches_upstream_qwen25_id_for_id():
    reference = AutoTokenizer.from_pretrained(REFERENCE_TOKENIZER)
    ours = load_tokenizer()
    samples = [MIXED_TEXT, " leading space", "\n\nnewlines first", "x" * 300] + real_samples()
    assert sum(map(len, samples)) > 5000
    for text in samples:
        ours_ids = ours(text).input_ids
        assert ours_ids == reference(text).input_ids
        assert ours.decode(ours_ids) == reference.decode(ours_ids)
    assert ours.get_vocab() == reference.get_vocab()


def test_round_trip_is_lossless_after_nfc():
    import unicodedata

    ours = load_tokenizer()
    assert ours.decode(ours(MIXED_TEXT).input_ids) == unicodedata.normalize("NFC", MIXED_TEXT)


def test_special_tokens_sit_at_qwen25_ids():
    tokenizer = build_tokenizer_from_ranks()
    for offset, token in enumerate(ADDED_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == FIRST_ADDED_ID + offset
    assert FIRST_ADDED_ID + len(ADDED_TOKENS) - 1 == 151664
    ours = load_tokenizer()
    assert (ours.eos_token, ours.eos_token_id) == ("<|im_end|>", 151645)
    assert (ours.pad_token, ours.pad_token_id) == ("<|endoftext|>", 151643)
    assert ours("<|im_start|>").input_ids == [151644]


@needs_shared
def test_local_model_folder_is_loaded_when_given(tmp_path):
    from_folder = load_tokenizer(REFERENCE_TOKENIZER)
    assert from_folder("混合 text 123").input_ids == load_tokenizer()("混合 text 123").input_ids
    assert "{% generation %}" in from_folder.chat_template  # our template replaces the upstream one


def test_chat_template_marks_assistant_replies_with_their_end_token():
    tokenizer = load_tokenizer()
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"}]
    encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    marked = [i for i, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert tokenizer.decode(marked) == "A1<|im_end|>A2<|im_end|>"
    text = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n"


@needs_shared
@pytest.mark.parametrize("parallelism", ["false", "true"])  # one thread, and a thread pool
def test_pretraining_encoder_gives_the_tokenizers_ids_on_real_corpora(parallelism, monkeypatch):
    """The fast (tiktoken) path must reproduce the tokenizer's own ids wherever pretraining text comes from."""
    import pyarrow.parquet as pq

    from conftest import SHARED
    from utils.formats import load_records
    from utils.tokenizer import pretraining_encoder

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", parallelism)
    tokenizer = load_tokenizer()
    encode = pretraining_encoder(tokenizer)
    assert encode.__name__ == "tiktoken_encode"  # the Qwen2.5 vocabulary gets the fast path
    texts = [MIXED_TEXT, "", " ", "\n", "<|im_end|>"] + [r["text"] for r in load_records(
        str(REFERENCE / "mini_data" / "pt"), "pt")[0]]
    chinese_chat = pq.read_table(SHARED / "data" / "chatlm_mini_chinese" / "my_valid_dataset_1k.parquet")
    texts += [str(v) for column in chinese_chat.columns for v in column.to_pylist()]
    texts += [line for line in (REPO / "mini_data" / "heldout" / "heldout.txt").read_text().splitlines()]
    assert sum(map(len, texts)) > 500_000
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True
    expected = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    assert encode(texts) == expected
    assert encode(["<|im_end|>"])[0] != [tokenizer.eos_token_id]  # a special token's text stays text


def test_pretraining_encoder_falls_back_to_the_tokenizer_for_another_vocabulary():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from utils.tokenizer import pretraining_encoder

    words = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=words)
    encode = pretraining_encoder(other)
    assert encode.__name__ == "backend_encode"
    assert encode(["hello world", "world other"]) == [[0, 1], [1, 2]]
