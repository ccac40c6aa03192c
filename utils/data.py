"""One data layer for all stages: find files, read them, normalise each record to the shape a stage needs.

Files: json (an array, or an object of equal-length lists), jsonl, parquet, txt (one document per non-empty line),
given as files, folders (searched recursively) or globs.

Shapes understood, per stage kind:
- "pt": `text` (IndustryCorpus2, with or without its quality columns; c4), `content`, or a .txt line.
- "sft": `conversations: [{from, value}]` (Infinity-Instruct, ShareGPT), `messages: [{role, content}]`,
  alpaca `instruction/input/output` (+ optional `system`), `prompt/response`, `prompt/completion`.
- "dpo": `prompt` + `chosen`/`rejected` as strings or message lists (Infinity-Preference), or ShareGPT-style
  `conversations` + `chosen`/`rejected` {from, value} (LLaMA-Factory).

Each file is read on its own and only the columns a shape needs are taken from it, so files whose other columns
drift (Infinity-Instruct's `id` is int64 in 7M and str in Gen; `label` a struct or a str) combine without surgery.
Unreadable input raises DataError naming the file, the line or row and the reason. Records that are readable but
unusable are skipped and counted by reason (SkipCounter), and the counts are printed: nothing disappears silently.
"""

import ast
import glob
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

DATA_EXTENSIONS = (".parquet", ".jsonl", ".json", ".txt")

ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "chatgpt": "assistant",
    "system": "system",
}

# Columns that identify a shape; a file must hold one of these sets for the stage kind asked for.
SHAPES = {
    "pt": [("text",), ("content",)],
    "sft": [("conversations",), ("messages",), ("instruction", "output"), ("prompt", "response"),
            ("prompt", "completion")],
    "dpo": [("prompt", "chosen", "rejected"), ("conversations", "chosen", "rejected")],
}
# Optional columns read when present.
OPTIONAL_COLUMNS = {
    "pt": ("quality_score",),
    "sft": ("label", "category", "system", "input"),
    "dpo": ("task_category", "system"),
}


class DataError(ValueError):
    """Input that cannot be read at all. The message names the file, the line/row and what is wrong."""


class SkipRecord(Exception):
    """A readable record that a stage cannot use; its message is the reason it is counted under."""


class SkipCounter:
    """Counts skipped records by reason and remembers where the first of each was, for the report."""

    def __init__(self):
        self.kept = 0
        self.skipped = Counter()
        self.first_seen: dict[str, str] = {}

    def skip(self, reason: str, where: str):
        self.skipped[reason] += 1
        self.first_seen.setdefault(reason, where)

    def to_dict(self) -> dict:
        return {"kept": self.kept, "skipped": dict(self.skipped), "first_seen": self.first_seen}

    @classmethod
    def from_dict(cls, data: dict) -> "SkipCounter":
        counter = cls()
        counter.kept = data["kept"]
        counter.skipped = Counter(data["skipped"])
        counter.first_seen = dict(data["first_seen"])
        return counter

    def report(self, title: str) -> str:
        lines = [f"{title}: kept {self.kept} records, skipped {sum(self.skipped.values())}"]
        for reason, count in self.skipped.most_common():
            lines.append(f"  skipped {count:>8}  {reason}  (first at {self.first_seen[reason]})")
        return "\n".join(lines)


def resolve_data_files(specs: str | list[str]) -> list[str]:
    """Expand files, folders and globs into a sorted, de-duplicated list of data files; fail on any spec that
    matches nothing, so a typo in a YAML data list is an error, not a smaller run."""
    if isinstance(specs, str):
        specs = [specs]
    files: list[str] = []
    for spec in specs:
        spec = os.path.expanduser(str(spec))
        if os.path.isdir(spec):
            found = sorted(str(p) for p in Path(spec).rglob("*") if p.suffix in DATA_EXTENSIONS and p.is_file())
        elif any(ch in spec for ch in "*?["):
            found = sorted(p for p in glob.glob(spec, recursive=True) if Path(p).suffix in DATA_EXTENSIONS)
        elif os.path.isfile(spec):
            if Path(spec).suffix not in DATA_EXTENSIONS:
                raise DataError(f"{spec}: unsupported file type (expected one of {', '.join(DATA_EXTENSIONS)})")
            found = [spec]
        else:
            raise DataError(f"{spec}: no such file or folder")
        if not found:
            raise DataError(f"{spec}: matches no {'/'.join(DATA_EXTENSIONS)} file")
        files.extend(f for f in found if f not in files)
    return files


def files_fingerprint(files: list[str]) -> list[tuple[str, int, int]]:
    """What identifies the input for caching: path, size and modification time of every file."""
    return [(os.path.abspath(f), os.path.getsize(f), int(os.path.getmtime(f))) for f in files]


def _pick_columns(path: str, available: list[str], kind: str) -> list[str]:
    for shape in SHAPES[kind]:
        if all(column in available for column in shape):
            return list(shape) + [c for c in OPTIONAL_COLUMNS[kind] if c in available and c not in shape]
    expected = " | ".join("+".join(shape) for shape in SHAPES[kind])
    raise DataError(f"{path}: no columns for {kind} data: expected {expected}; the file has: {', '.join(available)}")


def iter_file_records(path: str, kind: str) -> Iterator[tuple[str, dict]]:
    """Yield (location, record) for every record of one file, with only the columns the stage kind needs."""
    suffix = Path(path).suffix
    if suffix == ".parquet":
        try:
            # Buffered page-by-page reads: without them a whole row group (which can be a whole file) is read
            # into memory at once (627 MB vs 133 MB peak for a 500 MB single-row-group file).
            parquet = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        except Exception as err:
            raise DataError(f"{path}: not a readable parquet file ({err})") from err
        columns = _pick_columns(path, parquet.schema_arrow.names, kind)
        row = 0
        for batch in parquet.iter_batches(batch_size=1000, columns=columns):
            for record in batch.to_pylist():
                yield f"{path}:row {row}", record
                row += 1
    elif suffix == ".jsonl":
        columns = None
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:line {line_number}: invalid JSON ({err.msg} at column {err.colno})") from err
                if not isinstance(record, dict):
                    raise DataError(f"{path}:line {line_number}: expected a JSON object, got {type(record).__name__}")
                columns = columns or _pick_columns(path, list(record), kind)
                yield f"{path}:line {line_number}", {c: record.get(c) for c in columns}
    elif suffix == ".json":
        try:
            with open(path, encoding="utf-8") as handle:
                content = json.load(handle)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from err
        if isinstance(content, dict) and content and all(isinstance(v, list) for v in content.values()):
            lengths = {len(v) for v in content.values()}
            if len(lengths) != 1:
                raise DataError(f"{path}: columns of a JSON object of lists must have equal lengths, got {lengths}")
            content = [dict(zip(content, values)) for values in zip(*content.values())]
        if not isinstance(content, list):
            raise DataError(f"{path}: expected a JSON array of records, got {type(content).__name__}")
        columns = None
        for index, record in enumerate(content):
            if not isinstance(record, dict):
                raise DataError(f"{path}:record {index}: expected a JSON object, got {type(record).__name__}")
            columns = columns or _pick_columns(path, list(record), kind)
            yield f"{path}:record {index}", {c: record.get(c) for c in columns}
    elif suffix == ".txt":
        if kind != "pt":
            raise DataError(f"{path}: plain text files hold pretraining documents only, not {kind} data")
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    yield f"{path}:line {line_number}", {"text": line.rstrip("\n")}
    else:
        raise DataError(f"{path}: unsupported file type")


def _text(value, what: str) -> str:
    if value is None:
        raise SkipRecord(f"missing {what}")
    if not isinstance(value, str):
        raise SkipRecord(f"{what} is not a string")
    if not value.strip():
        raise SkipRecord(f"empty {what}")
    return value


def _maybe_literal(value):
    """Some exports store lists/structs as their Python or JSON text; accept both."""
    if isinstance(value, str) and value[:1] in "[{":
        for parse in (json.loads, ast.literal_eval):
            try:
                return parse(value)
            except (ValueError, SyntaxError):
                continue
    return value


def _message(item) -> dict:
    if not isinstance(item, dict):
        raise SkipRecord("message is not an object")
    raw_role = item.get("role", item.get("from"))
    role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
    if role is None:
        raise SkipRecord(f"unknown role {raw_role!r}")
    content = item.get("content", item.get("value"))
    return {"role": role, "content": _text(content, f"{role} message")}


def normalize_messages(items) -> list[dict]:
    """A list of {role|from, content|value} into ChatML messages: optional system first, then user/assistant
    alternating, starting with user and ending with assistant (trailing unanswered user turns are dropped)."""
    items = _maybe_literal(items)
    if not isinstance(items, list) or not items:
        raise SkipRecord("no messages")
    messages = [_message(item) for item in items]
    if messages[0]["role"] == "system":
        system, turns = messages[:1], messages[1:]
    else:
        system, turns = [], messages
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise SkipRecord(f"roles do not alternate user/assistant (got {message['role']} at turn {index})")
    if len(turns) % 2 == 1:
        turns = turns[:-1]
    if not turns:
        raise SkipRecord("no assistant answer")
    return system + turns


def _category(record: dict) -> str:
    if record.get("category"):
        return str(record["category"])
    label = _maybe_literal(record.get("label"))
    if isinstance(label, dict):
        for key in ("cate_ability_en", "cate_ability_zh", "ability_en"):
            values = _maybe_literal(label.get(key))
            if isinstance(values, list) and values:
                return str(values[0])
    return ""


def normalize_pt(record: dict) -> dict:
    text = _text(record.get("text", record.get("content")), "text")
    return {"text": text, "quality_score": record.get("quality_score")}


def normalize_sft(record: dict) -> dict:
    if record.get("conversations") is not None:
        messages = normalize_messages(record["conversations"])
    elif record.get("messages") is not None:
        messages = normalize_messages(record["messages"])
    elif "instruction" in record:
        prompt = _text(record.get("instruction"), "instruction")
        if record.get("input"):
            prompt = f"{prompt}\n{record['input']}"
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": _text(record.get("output"), "output")}]
    else:
        answer = record.get("response", record.get("completion"))
        messages = [{"role": "user", "content": _text(record.get("prompt"), "prompt")},
                    {"role": "assistant", "content": _text(answer, "response")}]
    if record.get("system") and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": str(record["system"])})
    return {"messages": messages, "category": _category(record)}


def _answer(value, what: str) -> str:
    value = _maybe_literal(value)
    if isinstance(value, list):
        if not value:
            raise SkipRecord(f"empty {what}")
        value = value[-1]
    if isinstance(value, dict):
        message = _message(value)
        if message["role"] != "assistant":
            raise SkipRecord(f"{what} does not end with an assistant message")
        return message["content"]
    return _text(value, what)


def normalize_dpo(record: dict) -> dict:
    chosen_raw = _maybe_literal(record.get("chosen"))
    rejected_raw = _maybe_literal(record.get("rejected"))
    if record.get("conversations") is not None:
        prompt = normalize_messages(list(_maybe_literal(record["conversations"])) + [{"role": "assistant", "content": "-"}])[:-1]
    elif isinstance(chosen_raw, list) and len(chosen_raw) > 1:
        # Infinity-Preference repeats the prompt as the first message(s) of chosen and rejected.
        prompt = normalize_messages(chosen_raw[:-1] + [{"role": "assistant", "content": "-"}])[:-1]
        if isinstance(rejected_raw, list) and len(rejected_raw) > 1:
            rejected_prompt = normalize_messages(rejected_raw[:-1] + [{"role": "assistant", "content": "-"}])[:-1]
            if rejected_prompt != prompt:
                raise SkipRecord("chosen and rejected answer different prompts")
    else:
        prompt = [{"role": "user", "content": _text(record.get("prompt"), "prompt")}]
    if record.get("system") and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": str(record["system"])})
    chosen = _answer(chosen_raw, "chosen answer")
    rejected = _answer(rejected_raw, "rejected answer")
    if chosen.strip() == rejected.strip():
        raise SkipRecord("chosen and rejected are identical")
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


NORMALIZERS = {"pt": normalize_pt, "sft": normalize_sft, "dpo": normalize_dpo}


def iter_normalized(files: list[str], kind: str, counter: SkipCounter, check=None) -> Iterator[dict]:
    """Every usable record of `files`, normalised for `kind`; the rest are counted in `counter`.
    `check(record)` may add a stage's own rule by raising SkipRecord."""
    normalize = NORMALIZERS[kind]
    for path in files:
        for where, record in iter_file_records(path, kind):
            try:
                normalized = normalize(record)
                if check is not None:
                    normalized = check(normalized)
            except SkipRecord as reason:
                counter.skip(str(reason), where)
                continue
            counter.kept += 1
            yield normalized


def load_records(specs: str | list[str], kind: str) -> tuple[list[dict], SkipCounter]:
    """All normalised records in memory, with the skip counts: for SFT/DPO-sized data and for inspection.
    Pretraining corpora go through utils.packing, which streams."""
    counter = SkipCounter()
    records = list(iter_normalized(resolve_data_files(specs), kind, counter))
    return records, counter
