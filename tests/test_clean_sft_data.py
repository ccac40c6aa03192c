"""SFT data cleaning: each rule on realistic zh/en samples (and what it must leave alone), duplicates, and the CLI
end to end on a small jsonl and on a real Infinity-Instruct Gen file, read back through the data layer."""

import hashlib
import json
import re

import pytest

from conftest import REFERENCE, needs_shared
from tools.clean_sft_data import (
    CODE_SPAN, RULES, CleaningOptions, NearDuplicateIndex, SftCleaner, collapse_repeated_punctuation,
    compile_filler_pattern, compile_sensitive_pattern, main, mask_sensitive, normalize_whitespace, read_word_list,
    remove_fillers,
)
from utils.files import DataError
from utils.formats import load_records

GEN_FILE = REFERENCE / "mini_data" / "sft" / "Gen" / "train-00000-of-00015.parquet"

FILLERS = compile_filler_pattern()


def conversation(user: str, assistant: str, category: str = "") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
            "category": category}


def file_state(path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def report_table(markdown: str) -> dict:
    """The per-rule counts and the totals as the Markdown report states them."""
    titles = {title: rule for rule, title in RULES.items()}
    rows = re.findall(r"^\| (\d\. [^|(]+?)(?: \(off[^|]*\))? \| (\d+) \| (\d+) \|$", markdown, re.MULTILINE)
    read, written, skipped, removed = map(int, re.search(
        r"\*\*(\d+) in → (\d+) out\*\* \((\d+) skipped by the data layer, (\d+) removed", markdown).groups())
    return {"in": read, "out": written, "skipped": skipped, "removed": removed,
            "rules": {titles[title]: {"changed": int(changed), "removed": int(gone)} for title, changed, gone in rows}}


# Rule 1: whitespace and punctuation

def test_whitespace_collapses_inside_lines_and_blank_lines_but_keeps_indentation():
    text = "  第一点：  方案A\t很好。  \n\n\n\n  - 子项   一 \r\n   \n\n- Next   step:\tship it.  "
    assert normalize_whitespace(text) == "第一点： 方案A 很好。\n\n  - 子项 一\n\n- Next step: ship it."


def test_whitespace_leaves_code_blocks_and_inline_code_byte_for_byte():
    code = "```python\ndef add(a,  b):\n\treturn  a   +  b\n\n\n\n```"
    text = f"Use   `add(1,  2)`  like this:\n\n\n\n{code}\n\n\n\nDone.   "
    assert normalize_whitespace(text) == f"Use `add(1,  2)` like this:\n\n{code}\n\nDone."
    unclosed = "Output:\n```\nname    age\nalice   30"  # a truncated answer's code is still code
    assert normalize_whitespace(unclosed) == unclosed


RULE_FUNCTIONS = {"punctuation": collapse_repeated_punctuation, "fillers": lambda text: remove_fillers(text, FILLERS)}
REWRITES = [  # (rule, text, what the rule makes of it; None: the text must stay as it is)
    ("punctuation", "太好了！！！！真的吗？？？我同意。。。。", "太好了！真的吗？我同意。"),
    ("punctuation", "首先，，我们需要、、准备材料；；然后：：开始", "首先，我们需要、准备材料；然后：开始"),
    ("punctuation", "Wow!!!! Really??? Yes!", "Wow! Really? Yes!"),
    ("punctuation", "Wait.... what..........", "Wait... what..."),
    ("punctuation", "他说…………算了", "他说……算了"),
    ("punctuation", "然后……我们就走了。", None),
    ("punctuation", "Well... maybe.", None),
    ("punctuation", "Use std::vector, for(;;) loops and ../data; fields a,,b stay.", None),
    ("punctuation", "Ranges like 1..10 and the path ../../x", None),
    ("punctuation", "Print it: `print('!!!')`", None),
    ("punctuation", "```\nassert x == '。。'\n```", None),
    ("fillers", "嗯，那个那个，我觉得这个方案，呃，还可以吧。", "我觉得这个方案，还可以吧。"),
    ("fillers", "Um, I think, uh, we should go.", "I think, we should go."),
    ("fillers", "这个价格还可以，嗯。", "这个价格还可以。"),
    ("fillers", "嗯。我知道了，明天见。", "我知道了，明天见。"),
    ("fillers", "嗯嗯嗯，好的，额，我再想想。", "好的，我再想想。"),
    ("fillers", "I um think so. UH, maybe not, erm.", "I think so. maybe not."),
    ("fillers", "第一行\n呃 第二行", "第一行\n第二行"),
    ("fillers", "好啊，我们明天见。", None),  # 啊 is not a filler and 啊啊 must stand alone
    ("fillers", "额外的费用是多少？总金额，请再核对一下。", None),  # 额 inside words
    ("fillers", "嗯哼这个词我不熟。我嗯了一声。", None),  # 嗯 inside a clause
    ("fillers", "那个那个人是谁？", None),  # followed by a word: not an interjection
    ("fillers", "I forgot my umbrella; uh-oh, the drum is wet.", None),
    ("fillers", "Call `um()` first.\n```\num = 1\nuh = 2\n```", None),
]


@pytest.mark.parametrize("rule, text, expected", REWRITES)
def test_each_rule_rewrites_what_it_targets_and_leaves_lookalikes_and_code(rule, text, expected):
    assert RULE_FUNCTIONS[rule](text) == (text if expected is None else expected)


def test_filler_words_file_replaces_the_default_list(tmp_path):
    words = tmp_path / "fillers.txt"
    words.write_text("# spoken-style fillers of our transcripts\n就是说\nyou know\n\n", encoding="utf-8")
    custom = compile_filler_pattern(read_word_list(str(words)))
    assert remove_fillers("就是说，这个接口，you know，很慢。嗯，对。", custom) == "这个接口，很慢。嗯，对。"


# Rule 3: sensitive words

def test_sensitive_words_are_masked_with_as_many_stars(tmp_path):
    words = tmp_path / "sensitive.txt"
    words.write_text("# credentials\n密码\npassword\n", encoding="utf-8")
    pattern = compile_sensitive_pattern(read_word_list(str(words)))
    assert mask_sensitive("我的密码是 hunter2，PASSWORD: hunter2", pattern) == "我的**是 hunter2，********: hunter2"
    assert mask_sensitive("Reset passwords weekly.", pattern) == "Reset passwords weekly."  # whole words only


def test_sensitive_drop_removes_the_sample_and_mask_keeps_it():
    leaking = conversation("帮我登录邮箱", "好的，你的密码是 123456。")
    dropping = SftCleaner(CleaningOptions(sensitive_words=["密码"], sensitive_action="drop"))
    assert dropping.clean("a:1", leaking) is None
    assert dropping.report.removed["sensitive_words"] == 1
    masking = SftCleaner(CleaningOptions(sensitive_words=["密码"], sensitive_action="mask"))
    assert masking.clean("a:1", leaking)["messages"][1]["content"] == "好的，你的**是 123456。"
    assert masking.report.changed["sensitive_words"] == 1 and masking.report.removed["sensitive_words"] == 0


# Rule 4: length, and a rule that empties a message

def test_length_filter_counts_only_assistant_replies():
    cleaner = SftCleaner(CleaningOptions(min_chars=5, max_chars=40))
    assert cleaner.clean("a:1", conversation("请详细介绍一下长城的历史和建造过程，越详细越好。", "好。")) is None
    assert cleaner.clean("a:2", conversation("Hi", "Sure, here is a very long answer that goes on and on.")) is None
    assert cleaner.clean("a:3", conversation("Hi", "Hello! How can I help you today?")) is not None
    assert cleaner.clean("a:4", conversation("Say hello", "Hello")) is not None  # exactly min_chars is enough
    assert cleaner.report.removed["length"] == 2


def test_a_message_emptied_by_a_rule_removes_the_sample():
    cleaner = SftCleaner(CleaningOptions())
    assert cleaner.clean("a:1", conversation("嗯。", "请问有什么可以帮你？")) is None
    assert cleaner.report.changed["fillers"] == 1 and cleaner.report.removed["fillers"] == 1


# Rules 5 and 6: duplicates

def test_exact_duplicates_after_cleaning_keep_the_first():
    cleaner = SftCleaner(CleaningOptions())
    first = cleaner.clean("a:1", conversation("什么是光合作用？", "光合作用是植物利用光能合成有机物的过程。", "biology"))
    again = cleaner.clean("a:2", conversation("什么是光合作用？  ", "光合作用是植物利用光能合成有机物的过程。。", "science"))
    assert first is not None and again is None
    assert cleaner.report.removed["exact_duplicates"] == 1


ANSWER = ("To make a simple tomato pasta, boil the spaghetti in salted water for about ten minutes. Meanwhile, warm "
          "olive oil in a pan, add chopped garlic, then crushed tomatoes, salt and a pinch of sugar, and simmer for "
          "fifteen minutes. Drain the pasta, toss it with the sauce and finish with fresh basil and parmesan.")


def test_conversations_differing_by_one_word_are_near_duplicates():
    index = NearDuplicateIndex(threshold=0.85)
    assert index.check_and_add("a:1", "How do I make tomato pasta?\n" + ANSWER) is None
    similarity, kept = index.check_and_add("a:2", "How do I make tomato pasta?\n" + ANSWER.replace("fresh", "some"))
    assert kept == "a:1" and 0.85 <= similarity < 1


def test_different_conversations_are_not_near_duplicates():
    index = NearDuplicateIndex(threshold=0.85)
    assert index.check_and_add("a:1", "How do I make tomato pasta?\n" + ANSWER) is None
    other = ("How do I reverse a list in Python?\nUse slicing: items[::-1] returns a reversed copy, while "
             "items.reverse() reverses the list in place and returns None. reversed(items) gives an iterator.")
    assert index.check_and_add("a:2", other) is None
    assert index.check_and_add("a:3", "请介绍一下番茄意面的做法。\n先把意面煮十分钟，再用橄榄油炒香蒜末，加入番茄碎小火煮十五分钟。") is None


# The CLI end to end

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def test_cli_cleans_a_small_jsonl_and_the_output_reads_back(tmp_path):
    source = tmp_path / "chats.jsonl"
    write_jsonl(source, [
        conversation("嗯，那个那个，你觉得这个方案怎么样？", "呃，我觉得这个方案，还可以吧！！！", "opinion"),
        conversation("What   is the capital of France?", "The capital of France is Paris.", "geography"),
        conversation("What is the capital of France?", "The capital of France is Paris.", "geography"),
        conversation("How do I make tomato pasta?", ANSWER, "cooking"),
        conversation("How do I make tomato pasta?", ANSWER.replace("fresh", "some"), "cooking"),
        conversation("我的银行卡密码忘了怎么办？", "你可以带身份证去柜台重置密码。", "finance"),
        conversation("1+1=?", "2", "math"),
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hi"}]},
    ])
    sensitive = tmp_path / "sensitive.txt"
    sensitive.write_text("# no credentials in training data\n密码\n", encoding="utf-8")
    before = file_state(source)

    output, report = tmp_path / "out" / "cleaned.jsonl", tmp_path / "report.md"
    counts = main([str(source), "--output", str(output), "--report", str(report), "--sensitive-words", str(sensitive),
                   "--min-chars", "2", "--examples", "2"])

    assert counts["in"] == 9 and counts["out"] == 3
    assert counts["skipped"] == {"empty assistant message": 1,
                                 "roles do not alternate user/assistant (got assistant at turn 0)": 1}
    assert counts["rules"] == {
        "whitespace_punctuation": {"changed": 2, "removed": 0},
        "fillers": {"changed": 1, "removed": 0},
        "sensitive_words": {"changed": 0, "removed": 1},
        "length": {"changed": 0, "removed": 1},
        "exact_duplicates": {"changed": 0, "removed": 1},
        "near_duplicates": {"changed": 0, "removed": 1},
    }
    cleaned, read_back = load_records(str(output), "sft")
    assert read_back.kept == 3 and not read_back.skipped
    assert cleaned[0] == conversation("你觉得这个方案怎么样？", "我觉得这个方案，还可以吧！", "opinion")
    assert [c["category"] for c in cleaned] == ["opinion", "geography", "cooking"]
    assert report_table(report.read_text(encoding="utf-8")) == {
        "in": 9, "out": 3, "skipped": 2, "removed": 4, "rules": counts["rules"]}
    assert file_state(source) == before


def test_cli_refuses_to_write_over_its_input(tmp_path):
    source = tmp_path / "chats.jsonl"
    write_jsonl(source, [conversation("Hi  there", "Hello!")])
    before = file_state(source)
    with pytest.raises(DataError, match="output is one of the inputs"):
        main([str(source), "--output", str(source)])
    assert file_state(source) == before


@needs_shared
def test_cli_on_a_real_infinity_instruct_gen_file(tmp_path):
    before = file_state(GEN_FILE)
    output, report = tmp_path / "gen.jsonl", tmp_path / "gen.md"
    counts = main([str(GEN_FILE), "--output", str(output), "--report", str(report)])

    removed = sum(rule["removed"] for rule in counts["rules"].values())
    assert counts["in"] == 100
    assert counts["in"] == counts["out"] + removed + sum(counts["skipped"].values())
    assert counts["rules"]["whitespace_punctuation"]["changed"] > 0  # the Gen answers have trailing spaces
    assert report_table(report.read_text(encoding="utf-8")) == {
        "in": counts["in"], "out": counts["out"], "skipped": sum(counts["skipped"].values()), "removed": removed,
        "rules": counts["rules"]}

    original, _ = load_records(str(GEN_FILE), "sft")
    cleaned, read_back = load_records(str(output), "sft")
    assert len(cleaned) == read_back.kept == counts["out"] == len(original)  # no rule removes one of these answers
    # Every code block and inline code span of the real answers comes through byte for byte.
    for before_sample, after_sample in zip(original, cleaned):
        for old, new in zip(before_sample["messages"], after_sample["messages"]):
            assert CODE_SPAN.findall(new["content"]) == CODE_SPAN.findall(old["content"].strip())
    assert file_state(GEN_FILE) == before
