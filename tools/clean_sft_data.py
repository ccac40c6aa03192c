"""SFT data cleaning (seed 002): tidy, filter and de-duplicate SFT conversations into one jsonl the stages read.

    python -m tools.clean_sft_data INPUT... --output cleaned.jsonl [--report report.md]
        [--filler-words FILE] [--sensitive-words FILE] [--sensitive-action drop|mask]
        [--min-chars N] [--max-chars N] [--near-dup-threshold 0.85] [--examples 3]

INPUT is any file, folder or glob the data layer (utils/files.py, utils/formats.py) reads as SFT data, so the cleaner sees exactly the
records a stage sees; records the data layer cannot normalise are counted under their SkipRecord reason. Inputs are
only read; the output is written to a temporary file next to --output and renamed when complete.

Rules, in this order, on every message (system, user, assistant) of a conversation:
1. whitespace and punctuation, outside code (``` fenced blocks, to the end of the text if unclosed, and `inline`
   spans are left byte for byte):
   - \\r\\n and \\r become \\n; spaces/tabs at the end of a line are removed; inside a line every run of two or more
     spaces/tabs, and every single tab, becomes one space; indentation at the start of a line is kept (nested lists,
     indented code); three or more newlines (blank lines with spaces count) become two; the message is stripped.
   - a run of the same full-width mark ！？。，、；： becomes one ("！！！" -> "！", "。。。。" -> "。");
     a run of half-width ! or ? becomes one ("!!!" -> "!"); four or more "." become "..." and three or more "…"
     become "……" (an ellipsis stays an ellipsis). Half-width , ; : and ".." are left alone: outside fences they
     are often code or data (`std::`, `for(;;)`, empty CSV fields, `../`, `1..10`).
2. fillers of spoken-style text (default FILLER_WORDS, or --filler-words FILE, one per line). A word of ASCII
   letters is a filler wherever it is a whole word, case-insensitively, and not part of a hyphenated or apostrophe
   word ("um" yes, "umbrella" and "uh-oh" no). Any other entry (Chinese, or a phrase) is a filler only when it
   stands alone as an interjection: start of text or line, whitespace or punctuation right before it, and
   whitespace, punctuation or the end right after it, repeats included ("嗯嗯嗯，"); so 啊 in 好啊, 额 in 额外,
   嗯 inside a sentence stay. A run of fillers is removed with the comma and spaces after it
   ("嗯，那个那个，我觉得" -> "我觉得", "Um, I think, uh, we should go." -> "I think, we should go."); a run that ends
   a sentence takes the comma before it instead ("可以，嗯。" -> "可以。"); a run that is a whole sentence goes with
   its end mark ("嗯。我知道了" -> "我知道了"). The next word is not re-capitalised.
3. sensitive words (--sensitive-words FILE, one per line, # comments; no file: rule off), matched like fillers
   are (ASCII words as whole words, case-insensitive; other words anywhere). drop: the sample is removed;
   mask: each hit becomes "*" times its length. Code is not exempt.
4. length: the total characters of the assistant replies must be >= --min-chars and <= --max-chars (if given).
5. exact duplicates: the same cleaned conversation (roles and contents; category ignored) again: removed, first kept.
6. near duplicates: datasketch MinHash (128 permutations, fixed seed) of the character 5-gram shingles of the whole
   cleaned conversation, MinHashLSH at --near-dup-threshold; a candidate counts only if its estimated Jaccard
   similarity reaches the threshold. Removed, first kept. Keeps ~1 KB per kept sample in memory.
A rule that leaves a message empty removes the sample, counted as removed by that rule. A sample counts as changed
by every rule that edited it, even if a later rule removes it.

Output: one {"messages": [{role, content}], "category": str} per line. The report (printed; Markdown with
--report) gives, per rule, the samples it changed and removed with examples, and the totals in -> out.
"""

import argparse
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasketch import MinHash, MinHashLSH

from utils.errors import ConfigError, run_main
from utils.files import DataError, SkipCounter, SkipRecord, iter_file_records, resolve_data_files
from utils.formats import normalize_sft

DEFAULT_FILLER_WORDS = ("嗯嗯", "嗯", "呃", "额", "啊啊", "那个那个", "um", "uh", "erm", "uhm")
SHINGLE_CHARS = 5
NUM_PERM = 128
MINHASH_SEED = 1
SNIPPET_CHARS = 120

RULES = {
    "whitespace_punctuation": "1. whitespace and punctuation",
    "fillers": "2. filler words",
    "sensitive_words": "3. sensitive words",
    "length": "4. assistant reply length",
    "exact_duplicates": "5. exact duplicates",
    "near_duplicates": "6. near duplicates",
}

# ``` fences (an unclosed one runs to the end: a truncated answer's code is still code) and `inline` code spans.
CODE_SPAN = re.compile(r"```[\s\S]*?(?:```|\Z)|`[^`\n]+`")
# Code is swapped for a private-use placeholder while prose is edited; the placeholder is not whitespace, so the
# spaces around code are tidied like those around a word.
PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")

FULL_WIDTH_REPEAT = re.compile(r"([！？。，、；：])\1+")
HALF_WIDTH_REPEAT = re.compile(r"([!?])\1+")
LONG_DOTS = re.compile(r"\.{4,}")
LONG_ELLIPSIS = re.compile(r"…{3,}")

# What may stand right before/after a Chinese interjection: whitespace and punctuation of both widths.
CLAUSE_EDGE = r"\s，,、。.！!？?；;：:…~～—\-\"“”'‘’（）()【】\[\]《》"
COMMAS = "，,、"
SENTENCE_ENDS = "。.！!？?…"


def outside_code(text: str, transform) -> str:
    """Apply `transform` to the prose of `text`, leaving code blocks and inline code exactly as they are."""
    code: list[str] = []

    def stash(match):
        code.append(match.group())
        return f"\ue000{len(code) - 1}\ue001"

    edited = transform(CODE_SPAN.sub(stash, text))
    return PLACEHOLDER.sub(lambda match: code[int(match.group(1))], edited)


def _tidy_whitespace(prose: str) -> str:
    prose = re.sub(r"\r\n?", "\n", prose)
    prose = re.sub(r"[ \t]+(?=\n|$)", "", prose)
    prose = re.sub(r"(?<=\S)(?:[ \t]{2,}|\t)", " ", prose)  # after a non-space: indentation is not touched
    return re.sub(r"\n{3,}", "\n\n", prose)


def _collapse_punctuation(prose: str) -> str:
    prose = FULL_WIDTH_REPEAT.sub(r"\1", prose)
    prose = HALF_WIDTH_REPEAT.sub(r"\1", prose)
    prose = LONG_DOTS.sub("...", prose)
    return LONG_ELLIPSIS.sub("……", prose)


def normalize_whitespace(text: str) -> str:
    return outside_code(text, _tidy_whitespace).strip()


def collapse_repeated_punctuation(text: str) -> str:
    return outside_code(text, _collapse_punctuation)


def normalize_whitespace_and_punctuation(text: str) -> str:
    """Rule 1."""
    return collapse_repeated_punctuation(normalize_whitespace(text))


def read_word_list(path: str) -> list[str]:
    """One word per line; blank lines and lines starting with # are ignored."""
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]


def _is_ascii_word(word: str) -> bool:
    return word.isascii() and word.isalpha()


def word_pattern(words, chinese_edges: bool) -> str:
    """Regex alternation for `words`, longest first so the longer of two overlapping words wins. ASCII words match
    as whole words; others anywhere, or, with `chinese_edges`, only between clause edges and with repeats."""
    words = sorted(set(words), key=len, reverse=True)
    ascii_words = [re.escape(w) for w in words if _is_ascii_word(w)]
    other_words = [re.escape(w) for w in words if not _is_ascii_word(w)]
    alternatives = []
    if ascii_words:
        alternatives.append(rf"(?<![\w'’-])(?:{'|'.join(ascii_words)})(?![\w'’-])")
    if other_words:
        if chinese_edges:
            alternatives.append(rf"(?<![^{CLAUSE_EDGE}])(?:{'|'.join(other_words)})+(?=[{CLAUSE_EDGE}]|$)")
        else:
            alternatives.append("|".join(other_words))
    return "|".join(alternatives)


def compile_filler_pattern(words=DEFAULT_FILLER_WORDS) -> re.Pattern | None:
    """A run of fillers, with the commas and spaces between them."""
    filler = word_pattern(words, chinese_edges=True)
    if not filler:
        return None
    return re.compile(rf"(?:{filler})(?:[ \t]*[{COMMAS}]?[ \t]*(?:{filler}))*", re.IGNORECASE)


def _filler_span(text: str, start: int, end: int) -> tuple[int, int]:
    """The span to delete for the filler run text[start:end], so that the sentence around it still reads."""
    after = end
    while after < len(text) and text[after] in " \t":
        after += 1
    if after < len(text) and text[after] in COMMAS:  # "嗯，我觉得" / "Um, I": the filler and its comma
        after += 1
        while after < len(text) and text[after] in " \t":
            after += 1
        return start, after
    if after < len(text) and text[after] not in SENTENCE_ENDS + "\n":  # "I um think": a word follows
        return start, after
    before = start
    while before > 0 and text[before - 1] in " \t":
        before -= 1
    if before > 0 and text[before - 1] in COMMAS:  # "可以，嗯。" / "Sure, um.": the comma before goes
        return before - 1, after
    if before == 0 or text[before - 1] in SENTENCE_ENDS + "\n":  # "嗯。" is a whole sentence: its end mark goes too
        while after < len(text) and text[after] in SENTENCE_ENDS:
            after += 1
        while after < len(text) and text[after] in " \t":
            after += 1
        return start, after
    return before, after  # "so um." -> "so."


def remove_fillers(text: str, filler_pattern: re.Pattern | None) -> str:
    """Rule 2."""
    if filler_pattern is None:
        return text

    def remove(prose: str) -> str:
        pieces, kept_from = [], 0
        for match in filler_pattern.finditer(prose):
            start, end = _filler_span(prose, match.start(), match.end())
            start = max(start, kept_from)
            pieces.append(prose[kept_from:start])
            kept_from = end
        pieces.append(prose[kept_from:])
        return "".join(pieces)

    return outside_code(text, remove).strip()


def compile_sensitive_pattern(words) -> re.Pattern | None:
    pattern = word_pattern(words, chinese_edges=False)
    return re.compile(pattern, re.IGNORECASE) if pattern else None


def mask_sensitive(text: str, sensitive_pattern: re.Pattern) -> str:
    """Rule 3, mask: every hit becomes as many "*" as it has characters."""
    return sensitive_pattern.sub(lambda match: "*" * len(match.group()), text)


def assistant_chars(messages: list[dict]) -> int:
    return sum(len(m["content"]) for m in messages if m["role"] == "assistant")


def conversation_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def conversation_key(messages: list[dict]) -> bytes:
    """Rule 5's identity: roles and contents, hashed so that millions of samples fit in memory."""
    serialized = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.blake2b(serialized.encode("utf-8"), digest_size=16).digest()


def conversation_minhash(text: str) -> MinHash:
    shingles = {text[i:i + SHINGLE_CHARS] for i in range(max(1, len(text) - SHINGLE_CHARS + 1))}
    minhash = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED)
    minhash.update_batch([s.encode("utf-8") for s in shingles])
    return minhash


class NearDuplicateIndex:
    """Rule 6: MinHashLSH over the kept samples; `check_and_add` returns (similarity, key) of the kept sample a new
    one nearly duplicates, or adds the new one and returns None."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self.minhashes: dict[str, MinHash] = {}

    def check_and_add(self, key: str, text: str) -> tuple[float, str] | None:
        minhash = conversation_minhash(text)
        # LSH candidates are approximate; the estimated Jaccard similarity decides, so fewer real samples are lost.
        similar = [(minhash.jaccard(self.minhashes[other]), other) for other in self.lsh.query(minhash)]
        best = max(similar, default=None)
        if best is not None and best[0] >= self.threshold:
            return best
        self.lsh.insert(key, minhash)
        self.minhashes[key] = minhash
        return None


def _snippet(text: str, start: int = 0) -> str:
    """About SNIPPET_CHARS characters of `text` from `start`, with newlines and tabs made visible."""
    piece = text[start:start + SNIPPET_CHARS]
    piece = ("…" if start > 0 else "") + piece + ("…" if start + SNIPPET_CHARS < len(text) else "")
    return piece.replace("\n", "\\n").replace("\t", "\\t")


def _code_span(text: str) -> str:
    """Markdown inline code that survives backticks inside `text`."""
    longest_run = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest_run + 1)
    return f"{fence} {text} {fence}"


@dataclass
class CleaningOptions:
    filler_words: list[str] = field(default_factory=lambda: list(DEFAULT_FILLER_WORDS))
    sensitive_words: list[str] = field(default_factory=list)
    sensitive_action: str = "drop"
    min_chars: int = 1
    max_chars: int | None = None
    near_dup_threshold: float = 0.85
    examples: int = 3


class CleaningReport:
    """Counts per rule (samples changed, samples removed), data-layer skips, totals, and a few examples."""

    def __init__(self, max_examples: int):
        self.max_examples = max_examples
        self.read = 0
        self.written = 0
        self.skips = SkipCounter()
        self.changed = dict.fromkeys(RULES, 0)
        self.removed = dict.fromkeys(RULES, 0)
        self.examples: dict[str, list[str]] = {rule: [] for rule in RULES}

    def note_change(self, rule: str, where: str, before: str, after: str):
        self.changed[rule] += 1
        if len(self.examples[rule]) < self.max_examples:
            first_difference = len(os.path.commonprefix([before, after]))
            start = max(0, first_difference - 30)
            self.examples[rule].append(f"changed `{where}`: {_code_span(_snippet(before, start))} → "
                                       f"{_code_span(_snippet(after, start))}")

    def note_removal(self, rule: str, where: str, reason: str, messages: list[dict]):
        self.removed[rule] += 1
        if len(self.examples[rule]) < self.max_examples:
            self.examples[rule].append(f"removed `{where}` ({reason}): "
                                       f"{_code_span(_snippet(conversation_text(messages)))}")

    def to_dict(self) -> dict:
        return {
            "in": self.read,
            "out": self.written,
            "skipped": dict(self.skips.skipped),
            "rules": {rule: {"changed": self.changed[rule], "removed": self.removed[rule]} for rule in RULES},
        }

    def to_markdown(self, inputs: list[str], output: str, options: CleaningOptions) -> str:
        skipped = sum(self.skips.skipped.values())
        removed = sum(self.removed.values())
        lines = [
            "# SFT data cleaning report", "",
            f"Input: {', '.join(inputs)}  ", f"Output: {output}", "",
            f"**{self.read} in → {self.written} out** ({skipped} skipped by the data layer, "
            f"{removed} removed by the rules)", "",
            "| rule | samples changed | samples removed |", "|---|---:|---:|",
        ]
        off = {"sensitive_words": not options.sensitive_words}
        for rule, title in RULES.items():
            note = " (off: no --sensitive-words)" if off.get(rule) else ""
            lines.append(f"| {title}{note} | {self.changed[rule]} | {self.removed[rule]} |")
        lines += ["", "## Skipped by the data layer", ""]
        if not self.skips.skipped:
            lines.append("None.")
        for reason, count in self.skips.skipped.most_common():
            lines.append(f"- {count} × {reason} (first at `{self.skips.first_seen[reason]}`)")
        lines += ["", "## Examples", ""]
        for rule, title in RULES.items():
            if self.examples[rule]:
                lines += [f"### {title}", "", *(f"- {example}" for example in self.examples[rule]), ""]
        return "\n".join(lines).rstrip() + "\n"


class SftCleaner:
    """Applies the rules to one normalised sample at a time; remembers what rules 5 and 6 need and counts."""

    def __init__(self, options: CleaningOptions):
        if options.sensitive_action not in ("drop", "mask"):
            raise ConfigError(f"sensitive_action must be drop or mask, got {options.sensitive_action!r}")
        self.options = options
        self.report = CleaningReport(options.examples)
        self.filler_pattern = compile_filler_pattern(options.filler_words)
        self.sensitive_pattern = compile_sensitive_pattern(options.sensitive_words)
        self.seen_keys: dict[bytes, str] = {}
        self.near_duplicates = NearDuplicateIndex(options.near_dup_threshold)

    def _edit_messages(self, rule: str, where: str, messages: list[dict], edit) -> list[dict] | None:
        """Edit every message's content; note the first changed message; None (noted) if one becomes empty."""
        edited = [{"role": m["role"], "content": edit(m["content"])} for m in messages]
        changed = [(old["content"], new["content"]) for old, new in zip(messages, edited)
                   if old["content"] != new["content"]]
        if changed:
            self.report.note_change(rule, where, *changed[0])
        if any(not m["content"] for m in edited):
            self.report.note_removal(rule, where, "a message became empty", messages)
            return None
        return edited

    def clean(self, where: str, sample: dict) -> dict | None:
        """The cleaned sample, or None if a rule removed it."""
        messages = self._edit_messages("whitespace_punctuation", where, sample["messages"],
                                       normalize_whitespace_and_punctuation)
        if messages is None:
            return None
        messages = self._edit_messages("fillers", where, messages,
                                       lambda text: remove_fillers(text, self.filler_pattern))
        if messages is None:
            return None

        if self.sensitive_pattern is not None:
            if self.options.sensitive_action == "drop":
                hits = (self.sensitive_pattern.search(m["content"]) for m in messages)
                hit = next((h for h in hits if h), None)
                if hit:
                    self.report.note_removal("sensitive_words", where, f"contains {hit.group()!r}", messages)
                    return None
            else:
                messages = self._edit_messages("sensitive_words", where, messages,
                                               lambda text: mask_sensitive(text, self.sensitive_pattern))

        length = assistant_chars(messages)
        if length < self.options.min_chars:
            self.report.note_removal("length", where, f"assistant replies {length} chars < {self.options.min_chars}",
                                     messages)
            return None
        if self.options.max_chars is not None and length > self.options.max_chars:
            self.report.note_removal("length", where, f"assistant replies {length} chars > {self.options.max_chars}",
                                     messages)
            return None

        key = conversation_key(messages)
        if key in self.seen_keys:
            self.report.note_removal("exact_duplicates", where, f"same as `{self.seen_keys[key]}`", messages)
            return None
        self.seen_keys[key] = where

        near = self.near_duplicates.check_and_add(where, conversation_text(messages))
        if near is not None:
            similarity, kept = near
            self.report.note_removal("near_duplicates", where, f"~{similarity:.2f} similar to `{kept}`", messages)
            return None
        return {"messages": messages, "category": sample["category"]}


def clean_sft_files(inputs: list[str], output: str, options: CleaningOptions) -> CleaningReport:
    """Read `inputs` through the data layer, write the cleaned samples to `output` (jsonl), return the report."""
    files = resolve_data_files(inputs)
    output_path = Path(output)
    if output_path.exists() and any(os.path.samefile(output_path, f) for f in files):
        raise DataError(f"{output}: the output is one of the inputs; inputs are never overwritten")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    cleaner = SftCleaner(options)
    report = cleaner.report
    partial = output_path.with_name(output_path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for path in files:
            for where, record in iter_file_records(path, "sft"):
                report.read += 1
                try:
                    sample = normalize_sft(record)
                except SkipRecord as reason:
                    report.skips.skip(str(reason), where)
                    continue
                cleaned = cleaner.clean(where, sample)
                if cleaned is not None:
                    handle.write(json.dumps(cleaned, ensure_ascii=False) + "\n")
                    report.written += 1
    os.replace(partial, output_path)  # a crash leaves a .partial file, never a short cleaned.jsonl
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="SFT data files, folders or globs")
    parser.add_argument("--output", required=True, help="cleaned jsonl to write")
    parser.add_argument("--report", help="also write the report here as Markdown")
    parser.add_argument("--filler-words", help="file of filler words, one per line, replacing the default list")
    parser.add_argument("--sensitive-words", help="file of sensitive words, one per line, # comments")
    parser.add_argument("--sensitive-action", choices=("drop", "mask"), default="drop")
    parser.add_argument("--min-chars", type=int, default=1, help="minimum total characters of the assistant replies")
    parser.add_argument("--max-chars", type=int, default=None, help="maximum total characters of the assistant replies")
    parser.add_argument("--near-dup-threshold", type=float, default=0.85, help="MinHash Jaccard similarity")
    parser.add_argument("--examples", type=int, default=3, help="examples shown per rule in the report")
    args = parser.parse_args(argv)

    options = CleaningOptions(
        filler_words=read_word_list(args.filler_words) if args.filler_words else list(DEFAULT_FILLER_WORDS),
        sensitive_words=read_word_list(args.sensitive_words) if args.sensitive_words else [],
        sensitive_action=args.sensitive_action,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        near_dup_threshold=args.near_dup_threshold,
        examples=args.examples,
    )
    report = clean_sft_files(args.inputs, args.output, options)
    markdown = report.to_markdown(args.inputs, args.output, options)
    print(markdown)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(markdown, encoding="utf-8")
    return report.to_dict()


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
