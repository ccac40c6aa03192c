"""Tests for utils/metrics.py: hand-computed cases, the original's looping outputs, and natural text that must pass."""

import math
import random

import pytest

from utils.metrics import (
    bits_per_byte,
    distinct_n,
    longest_immediate_repeat,
    longest_repeated_substring,
    repeated_ngram_share,
    repetition_report,
    text_units,
)

# Generations of the original project that loop (复读机).
LOOPING_OUTPUTS = {
    "mung_bean_cake": "绿豆糕是一种传统的中国糕点其制作方法简单口感鲜美口感丰富以下是一些制作绿豆糕的步骤1. 准备材料绿豆糕的"
                      "糯米粉糯米粉、。。。。。。糯米粉糯米粉",
    "dessert": "甜品,甜品,甜品,甜品,甜品,甜品,甜品,甜品,甜品,甜品,甜品,甜品",
    "lily": "Once upon a time, in a small village nestled between rolling hills and a lush valley, lived a young girl "
            "named Lily. She was a young girl who had always been fascinated by the world around her. She was a young "
            "girl who loved to explore the world around her, and she was always eager to explore the world around "
            "her. She was a young girl who loved to explore the world around her. She was a young girl who loved to "
            "explore the world around her.",
    "li_bai": "李白是唐代著名的诗人他的诗歌风格以豪放奔放豪放奔放而著称他的诗歌风格以豪放奔放豪放不羁豪放不羁为特点他的诗歌"
              "风格以豪放奔放豪放不羁豪放不羁为特点",
}

# Natural text: words recur ("的时候", "我们", "the library", "pandas", "番茄", "鸡蛋") as they do in real writing.
NORMAL_TEXTS = {
    "zh_prose": "秋天的北京是一年中最舒服的季节。天空总是很蓝，空气也比夏天干爽许多。周末的时候，我和朋友喜欢骑车去颐和园，"
                "沿着昆明湖慢慢走一圈。湖边的柳树开始变黄，游客也比夏天少了不少，偶尔能看到几位老人在亭子里拉二胡、唱京剧。"
                "走累的时候，我们就在长廊下找个位置坐一会儿，看看湖上的游船，听听远处的鸟叫。傍晚回家的路上，街边已经飘来"
                "糖炒栗子的香味，我们买上一小袋，边走边吃，觉得这一天过得很值。",
    "en_prose": "The library in our town opened in 1952, and for most of its history it was a quiet place where people "
                "came to borrow books and read the newspaper. Over the last ten years, however, it has changed a great "
                "deal. Today the library offers free computer classes, a small recording studio, and a room where "
                "children can build simple robots after school. Some older visitors miss the silence, but most people "
                "agree that the library is busier and more useful than it has ever been. On a typical Saturday, the "
                "reading room is full by ten in the morning.",
    "mixed_tech": "在 Python 中读取 CSV 文件，最简单的方法是使用 pandas 库。步骤如下：\n"
                  "1. 安装 pandas：pip install pandas\n"
                  "2. 导入库并读取文件：\n"
                  "```python\n"
                  "import pandas as pd\n"
                  "df = pd.read_csv(\"data.csv\", encoding=\"utf-8\")\n"
                  "print(df.head())\n"
                  "```\n"
                  "3. 如果文件很大，可以设置 chunksize 参数分块读取，避免一次占用太多内存。\n"
                  "注意：如果文件中包含中文，请先确认编码是 utf-8 还是 gbk，否则读出来的内容可能是乱码。",
    "zh_recipe": "番茄炒蛋是一道家常菜，做法简单，下面是具体步骤：1. 准备材料：番茄两个、鸡蛋三个、葱一根、盐和糖适量。"
                 "2. 番茄洗净切块，鸡蛋打散，加少许盐搅匀。3. 锅中倒油烧热，倒入蛋液，炒至凝固后盛出。4. 锅里再加一点油，"
                 "放入番茄翻炒，炒出汤汁后加一小勺糖。5. 倒回鸡蛋，翻炒均匀，加盐调味，撒上葱花即可出锅。小贴士：番茄选熟"
                 "一点的，炒出来汤汁更多，味道也更好。",
    # Reduplication is grammar, not a loop: 一步一步, 看看, 研究研究, "again and again".
    "reduplication": "我们一步一步来：先看看数据，再研究研究模型。We tried again and again, and it finally worked.",
}


def test_text_units_splits_cjk_per_character_and_latin_runs():
    assert text_units("Hello, 世界 2024!") == ["hello", ",", "世", "界", "2024", "!"]


def test_text_units_cjk_punctuation_and_ideographic_space():
    # full-width comma and ideographic full stop are units; U+3000 (ideographic space) only separates
    assert text_units("你好，World。\u3000GPT-4o") == ["你", "好", "，", "world", "。", "gpt", "-", "4o"]


def test_distinct_n_hand_computed():
    units = ["a", "b", "a", "b"]
    # unigrams a b a b: 2 distinct of 4 -> 0.5
    assert distinct_n(units, 1) == pytest.approx(0.5)
    # bigrams (a b) (b a) (a b): 2 distinct of 3 -> 2/3
    assert distinct_n(units, 2) == pytest.approx(2 / 3)
    # trigrams (a b a) (b a b): 2 distinct of 2 -> 1.0
    assert distinct_n(units, 3) == pytest.approx(1.0)


def test_distinct_n_without_ngrams_is_one():
    assert distinct_n([], 1) == 1.0
    assert distinct_n(["a", "a"], 3) == 1.0


def test_repeated_ngram_share_hand_computed():
    # a b c a b c a, bigrams: ab bc ca ab bc ca -> the last three repeat earlier ones: 3 of 6 = 0.5
    assert repeated_ngram_share(list("abcabca"), 2) == pytest.approx(0.5)
    # a b c a b c a b, 4-grams: abca bcab cabc abca bcab -> the last two are repeats: 2 of 5 = 0.4
    assert repeated_ngram_share(list("abcabcab")) == pytest.approx(0.4)
    # fewer than 4 units: no 4-gram, nothing repeated
    assert repeated_ngram_share(list("abc")) == 0.0


@pytest.mark.parametrize("text, expected", [
    ("abcabc", "abc"),
    ("abcd", ""),
    ("", ""),
    ("banana", "ana"),  # occurrences at 1 and 3 overlap: allowed
    ("aaaa", "aaa"),
    ("甜品,甜品,甜品", "甜品,甜品"),
])
def test_longest_repeated_substring_small_cases(text, expected):
    assert longest_repeated_substring(text) == expected


def test_longest_repeated_substring_on_4000_characters():
    rng = random.Random(0)
    pool = [chr(code) for code in range(0x4E00, 0x4E00 + 500)]
    planted = "".join(rng.choice(pool) for _ in range(50))
    filler = ["".join(rng.choice(pool) for _ in range(1_000)) for _ in range(3)]
    # the planted passage is framed by characters outside the pool, so the repeat cannot extend past it
    text = filler[0] + "A" + planted + "B" + filler[1] + "C" + planted + "D" + filler[2]
    text += "".join(rng.choice(pool) for _ in range(4_000 - len(text)))
    assert len(text) == 4_000
    assert longest_repeated_substring(text) == planted
    # a looping text is the worst case for suffix comparisons
    assert len(longest_repeated_substring("甜品," * 1_334)) == 3 * 1_334 - 3


def test_longest_immediate_repeat():
    assert longest_immediate_repeat(text_units("的糯米粉糯米粉、")) == (["糯", "米", "粉"], 6)
    # trailing partial copy counts: 甜品, x2 plus 甜品 = 8 units
    assert longest_immediate_repeat(text_units("甜品,甜品,甜品")) == (["甜", "品", ","], 8)
    # punctuation and number runs are not a repeater
    assert longest_immediate_repeat(text_units("。。。。。。 0, 0, 0, 0")) == ([], 0)
    # one copy followed by a shared prefix is not a repeat
    assert longest_immediate_repeat(list("abcabd")) == ([], 0)


@pytest.mark.parametrize("name", LOOPING_OUTPUTS)
def test_original_looping_outputs_are_flagged(name):
    assert repetition_report(LOOPING_OUTPUTS[name])["looping"] is True


@pytest.mark.parametrize("name", NORMAL_TEXTS)
def test_natural_text_is_not_flagged(name):
    report = repetition_report(NORMAL_TEXTS[name])
    assert report["looping"] is False
    # and it is not repetition-free: natural text reuses words
    assert report["distinct_1"] < 0.9


def test_repetition_report_truncates_the_shown_repeat():
    report = repetition_report(LOOPING_OUTPUTS["lily"])
    assert report["longest_repeat_chars"] > 60
    assert len(report["longest_repeat"]) == 60
    assert "explore the world around her" in report["longest_repeat"]


def test_repetition_report_of_empty_text():
    assert repetition_report("") == {
        "distinct_1": 1.0, "distinct_2": 1.0, "repeated_4gram_share": 0.0, "longest_repeat_chars": 0,
        "longest_repeat": "", "immediate_repeat_units": 0, "looping": False,
    }


def test_bits_per_byte_hand_computed():
    # 8 * ln(2) nats = 8 bits, over 8 bytes -> 1 bit per byte
    assert bits_per_byte(8 * math.log(2), 8) == pytest.approx(1.0)
    # a Chinese character is 3 UTF-8 bytes: 4 characters -> 12 bytes; 12 * ln(2) nats over them -> 1.0 (per
    # character it would be 3.0 bits)
    text = "你好世界"
    num_bytes = len(text.encode("utf-8"))
    assert num_bytes == 12
    assert bits_per_byte(12 * math.log(2), num_bytes) == pytest.approx(1.0)


def test_bits_per_byte_rejects_empty_text():
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)
