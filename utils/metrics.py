"""Text metrics for judging generations: how repetitive a text is, and how well a model predicts a text.

The original project's models became "repeaters" (复读机): a generation falls into a phrase and says it again and
again ("甜品,甜品,甜品,…"). These metrics put numbers on that, in a way that works for Chinese and English alike:

- `text_units`: the units every count below is made of (a CJK character, or a latin word, or a punctuation mark).
- `distinct_n`: distinct n-grams / all n-grams of the text. 1.0 means no n-gram occurs twice; a loop drives it
  towards 0 (distinct-n of Li et al., 2016).
- `repeated_ngram_share`: the share of n-gram occurrences that repeat an n-gram met earlier in the text, i.e.
  1 - distinct_n (seq-rep-n of Welleck et al., 2019). Human prose of a few hundred units scores about 0-0.02 with
  n = 4; a generation stuck in a loop scores 0.4 and more.
- `longest_repeated_substring`: the longest stretch of characters that occurs at least twice; it shows *what* is
  being repeated (a word, a clause, a whole sentence).
- `longest_immediate_repeat`: the longest stretch made of one block of units said at least twice in a row
  ("糯米粉糯米粉"). A loop starts this way, so it catches a loop that set in near the end of a text, before it has
  had room to raise the n-gram share of the whole text.
- `repetition_report`: all of the above for one text, plus `looping`, the verdict of the rule below.
- `bits_per_byte`: the model's negative log-likelihood of a text per UTF-8 byte, in bits; unlike per-token loss it
  does not depend on the tokenizer, so models with different vocabularies can be compared on the same text.

The looping rule: a text is looping when its repeated 4-gram share is at least LOOPING_REPEATED_4GRAM_SHARE, or
when it holds an immediate repeat spanning at least LOOPING_IMMEDIATE_REPEAT_UNITS units.
"""

import math
import re
from pathlib import Path

import torch

from utils.errors import MissingInputError

# Scripts written without spaces between words (CJK ideographs with their extensions, Japanese kana), their
# punctuation (、。《》「」…) and the full-width forms Chinese text uses for punctuation (，！？：；（）).
# U+3000, the ideographic space, is left out: it separates units like any other whitespace.
_CJK_RANGES = (
    "\u3001-\u303f"  # CJK symbols and punctuation
    "\u3040-\u30ff"  # hiragana, katakana
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\uff01-\uff65"  # full-width ASCII forms and half-width CJK punctuation
    "\U00020000-\U0003134f"  # CJK extensions B-H
)
# First alternative wins: one CJK character; else a run of letters/digits that are not CJK (the underscore, a
# word character to `re`, is left to the last alternative); else any other visible character on its own.
_UNIT_PATTERN = re.compile(f"[{_CJK_RANGES}]|[^\\W_{_CJK_RANGES}]+|\\S")

# Repeated 4-gram share at or above which the whole text counts as going round in circles. Natural prose measures
# 0-0.02 (the paragraphs in tests/test_metrics.py: 0 to 0.016), answers with code a little more; the original's
# loops that fill the text measure 0.40-0.91. 0.2 leaves a wide margin on both sides. (Its mung-bean answer, which
# only starts looping near its end, measures 0.09: the immediate-repeat rule below catches it.)
LOOPING_REPEATED_4GRAM_SHARE = 0.2
# Span, in units, of an immediate repeat that counts as a loop. Natural reduplication spans 2-4 units (看看,
# 研究研究, 一步一步, "again and again"); 6 units is a 3-unit phrase said twice in a row ("糯米粉糯米粉") or a word
# said three times, which in a generated answer is where a loop begins. Chants ("加油加油加油") are flagged too.
LOOPING_IMMEDIATE_REPEAT_UNITS = 6
# Longest block, in units, that `longest_immediate_repeat` looks for. Longer blocks repeated back to back make up
# a large part of any text they appear in and are caught by the repeated 4-gram share; the cap keeps the scan
# linear in the text length.
IMMEDIATE_REPEAT_MAX_BLOCK_UNITS = 64
# `repetition_report` shows this many characters of the longest repeated substring: enough to recognise it.
REPORTED_REPEAT_CHARS = 60


def text_units(text: str) -> list[str]:
    """Split `text` into language-neutral units: each CJK character or CJK punctuation mark is one unit, each run
    of other letters/digits is one unit (lower-cased), each other punctuation mark is one unit; whitespace only
    separates. Chinese puts no spaces between words and a word segmenter would make the counts depend on its
    dictionary, so the character, which is also what Chinese n-gram metrics conventionally count, is the unit.

    >>> text_units("Hello, 世界 2024!")
    ['hello', ',', '世', '界', '2024', '!']
    """
    return [unit.lower() for unit in _UNIT_PATTERN.findall(text)]


def _ngrams(units: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]


def distinct_n(units: list[str], n: int) -> float:
    """Number of distinct n-grams divided by the number of n-grams. A text with no n-gram at all (empty, or
    shorter than n units) scores 1.0: it repeats nothing, and a short answer must not look like a loop."""
    ngrams = _ngrams(units, n)
    return len(set(ngrams)) / len(ngrams) if ngrams else 1.0


def repeated_ngram_share(units: list[str], n: int = 4) -> float:
    """Share of n-gram occurrences that repeat an n-gram seen earlier in the text; 0.0 when there are none.
    Every occurrence after the first of each distinct n-gram is a repeat, so this is exactly 1 - distinct_n."""
    return 1.0 - distinct_n(units, n)


def _suffix_array(text: str) -> list[int]:
    """Start positions of the suffixes of `text` in sorted order, by prefix doubling: after the round with step
    k, suffixes are ranked by their first 2k characters. O(n log² n), and no suffix is ever copied (sorting the
    suffix strings themselves is quadratic in time and memory on a looping text)."""
    length = len(text)
    rank = [ord(char) for char in text]
    order = list(range(length))
    step = 1
    while length:
        def key(i):
            return rank[i], rank[i + step] if i + step < length else -1

        order.sort(key=key)
        new_rank = [0] * length
        for previous, current in zip(order, order[1:]):
            new_rank[current] = new_rank[previous] + (key(previous) != key(current))
        rank = new_rank
        if rank[order[-1]] == length - 1:  # every suffix has its own rank: fully sorted
            break
        step *= 2
    return order


def longest_repeated_substring(text: str) -> str:
    """The longest substring of `text` that occurs at least twice ("" when no character repeats). Occurrences
    may overlap: in a loop like "甜品,甜品,甜品" the text repeats itself shifted by one period, and the overlapping
    answer ("甜品,甜品", from the start and from the second copy) grows with the loop, whereas non-overlapping
    occurrences could never exceed half of the text. When several substrings share the longest length, one of
    them is returned.

    Computed with a suffix array and Kasai's longest-common-prefix pass: the answer is the longest common prefix
    of two suffixes adjacent in sorted order. Well under a second for 4,000 characters.
    """
    order = _suffix_array(text)
    rank_of = [0] * len(text)
    for rank, start in enumerate(order):
        rank_of[start] = rank
    best_length, best_start = 0, 0
    common = 0  # Kasai: the common prefix with the previous suffix shrinks by at most one from i to i + 1
    for start in range(len(text)):
        if rank_of[start] == 0:
            common = 0
            continue
        previous = order[rank_of[start] - 1]
        while start + common < len(text) and previous + common < len(text) \
                and text[start + common] == text[previous + common]:
            common += 1
        if common > best_length:
            best_length, best_start = common, start
        common = max(common - 1, 0)
    return text[best_start:best_start + best_length]


def longest_immediate_repeat(
    units: list[str], max_block_units: int = IMMEDIATE_REPEAT_MAX_BLOCK_UNITS
) -> tuple[list[str], int]:
    """The longest stretch of `units` made of one block said at least twice in a row, as (block, span in units);
    ([], 0) when there is none. A trailing partial copy counts towards the span: "甜品,甜品,甜品" is the block
    ["甜", "品", ","] over 8 units. Blocks without a letter or CJK character are skipped, because runs of
    punctuation ("。。。", "-----") and of numbers ("0, 0, 0, 0" in code) are normal text, not a repeater."""
    best_block: list[str] = []
    best_span = 0
    for block_length in range(1, min(max_block_units, len(units) // 2) + 1):
        matched = 0  # how many positions in a row equal the unit one block further on
        for i in range(len(units) - block_length):
            if units[i] != units[i + block_length]:
                matched = 0
                continue
            matched += 1
            span = matched + block_length
            # matched >= block_length: at least two whole copies, not just a shared prefix
            if matched >= block_length and span > best_span:
                start = i - matched + 1
                block = units[start:start + block_length]
                if any(unit.isalpha() for unit in block):
                    best_block, best_span = block, span
    return best_block, best_span


def repetition_report(text: str) -> dict:
    """The repetition metrics of `text` and the looping verdict (rule and thresholds: see the module docstring
    and the LOOPING_* constants). longest_repeat is cut to REPORTED_REPEAT_CHARS characters; longest_repeat_chars
    is its full length."""
    units = text_units(text)
    longest_repeat = longest_repeated_substring(text)
    repeated_4gram_share = repeated_ngram_share(units, 4)
    _, immediate_repeat_units = longest_immediate_repeat(units)
    return {
        "distinct_1": distinct_n(units, 1),
        "distinct_2": distinct_n(units, 2),
        "repeated_4gram_share": repeated_4gram_share,
        "longest_repeat_chars": len(longest_repeat),
        "longest_repeat": longest_repeat[:REPORTED_REPEAT_CHARS],
        "immediate_repeat_units": immediate_repeat_units,
        "looping": repeated_4gram_share >= LOOPING_REPEATED_4GRAM_SHARE
        or immediate_repeat_units >= LOOPING_IMMEDIATE_REPEAT_UNITS,
    }


def bits_per_byte(total_nll_nats: float, num_bytes: int) -> float:
    """Bits per UTF-8 byte: total_nll_nats / (ln(2) * num_bytes).

    `total_nll_nats` is the summed negative log-likelihood (natural log) of all tokens of a text, `num_bytes` that
    text's UTF-8 length (len(text.encode("utf-8")): 1 byte per ASCII character, 3 per Chinese character). Dividing
    by ln(2) turns nats into bits; dividing by bytes rather than tokens makes the number independent of how a
    tokenizer cuts the text.
    """
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be positive, got {num_bytes}")
    return total_nll_nats / (math.log(2) * num_bytes)


def heldout_metrics(model, tokenizer, path: str, block_size: int = 1024) -> dict:
    """Token-level loss over the whole file in blocks, and bits per byte (comparable across tokenizers)."""
    if not Path(path).is_file():
        raise MissingInputError(f"{path}: no such held-out text file")
    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
    total_nll, predicted = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, block_size):
            block = torch.tensor([ids[start: start + block_size + 1]], device=model.device)
            if block.shape[1] < 2:
                break
            logits = model(input_ids=block[:, :-1]).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0], block[0, 1:], reduction="sum")
            total_nll += nll.item()
            predicted += block.shape[1] - 1
    # The first token is never predicted; its bytes are left out of the denominator.
    scored_bytes = len(text.encode("utf-8")) - len(tokenizer.decode(ids[:1]).encode("utf-8"))
    return {"tokens": predicted, "loss": total_nll / max(predicted, 1),
            "perplexity": math.exp(total_nll / max(predicted, 1)),
            "bits_per_byte": bits_per_byte(total_nll, scored_bytes)}
