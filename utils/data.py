"""One data layer for all stages: find files, read them, normalise each record to the shape a stage needs.

Files: json (an array, or an object of equal-length lists), jsonl, parquet, txt (one document per non-empty line),
given as files, folders (searched recursively) or globs.

Shapes understood, per stage kind:
- "pt": `text` (IndustryCorpus2, with or without its quality columns; c4), `content`, or a .txt line.
- "sft": `conversations: [{from, value}]` (Infinity-Instruct, ShareGPT), `messages: [{role, content}]`,
  `conversation: [{human, assistant}]` (Firefly/MOSS; XTuner's {input, output}), alpaca `instruction/input/output`,
  `prompt/response`, `prompt/completion`; each with optional `system` and `tools` columns.
- "dpo": `prompt` + `chosen`/`rejected` as strings, messages or message lists (Infinity-Preference; TRL), ShareGPT-style
  `conversations` + `chosen`/`rejected` {from, value} (LLaMA-Factory), `chosen_messages`/`rejected_messages`
  (whole conversations; the shared leading turns are the prompt), or `chosen`/`rejected` alone as
  "\n\nHuman: …\n\nAssistant: …" transcripts (Anthropic hh-rlhf).
Messages may hold typed text parts ([{"type": "text", "text"}]), tool calls and results (OpenAI `tool_calls` / `tool`,
LLaMA-Factory `function_call` / `observation` turns or `tool_call` parts) and reasoning (`reasoning_content`,
LLaMA-Factory `reasoning` parts, a <think> block opening the answer): all become plain ChatML text the way Qwen's
chat templates write them (<tool_call>, <tool_response>, <think> blocks; tools in the system message), so the roles stay
system/user/assistant. Message text is never parsed as JSON; a DPO prompt/chosen/rejected string is read as messages
only when it is the text of messages. KTO-style records (a true/false `label`) are skipped, in both stages.
- "kto": `prompt` + `completion` + `label` (true: a desirable reply), or `messages` + `label` (the last message is
  the reply); or any "dpo" shape, each pair giving its chosen answer as desirable and its rejected one as not.
- "grpo": GSM8K's `question` + `answer` (a solution ending in a line `#### <number>`, or the number alone), or
  GSM8K_zh's `question_zh` + `answer_only`.

Each file is read on its own and only the columns a shape needs are taken from it, so files whose other columns
drift (Infinity-Instruct's `id` is int64 in 7M and str in Gen; `label` a struct or a str) combine without surgery.
Unreadable input raises DataError naming the file, the line or row and the reason. Records that are readable but
unusable are skipped and counted by reason (SkipCounter), and the counts are printed: nothing disappears silently.
"""

import ast
import glob
import gzip
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from utils.errors import UserError
from utils.rewards import final_number, parse_number

# Each may also end in .gz (several public sets ship gzip-compressed jsonl).
DATA_EXTENSIONS = (".parquet", ".jsonl", ".json", ".txt")

ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "chatgpt": "assistant",
    "system": "system",
    # Tool use. These two roles never leave this module: tool results become user turns (_messages) and a
    # LLaMA-Factory `function_call` turn an assistant turn (_message), as Qwen2.5's template renders them.
    "tool": "tool", "observation": "tool", "function": "tool",
    "function_call": "function_call",
}

# Columns that identify a shape; a file must hold one of these sets for the stage kind asked for.
SHAPES = {
    "pt": [("text",), ("content",)],
    "sft": [("conversations",), ("messages",), ("conversation",), ("instruction", "output"), ("prompt", "response"),
            ("prompt", "completion")],
    "dpo": [("prompt", "chosen", "rejected"), ("conversations", "chosen", "rejected"),
            ("chosen_messages", "rejected_messages"),
            # KTO data is read only to be refused with its own reason, instead of "no columns for dpo data".
            ("prompt", "completion", "label"), ("messages", "label"),
            # hh-rlhf transcripts: last, since every preference file has these two columns.
            ("chosen", "rejected")],
    "kto": [("prompt", "completion", "label"), ("messages", "label"),
            # preference pairs, unpaired: the chosen answer desirable, the rejected one not
            ("prompt", "chosen", "rejected"), ("conversations", "chosen", "rejected"),
            ("chosen_messages", "rejected_messages"), ("chosen", "rejected")],
    # GSM8K_zh (prepare.sh): Chinese question and final number beside the English originals, which come second
    "grpo": [("question_zh", "answer_only"), ("question", "answer")],
}
# Optional columns read when present.
OPTIONAL_COLUMNS = {
    "pt": ("quality_score",),
    "sft": ("label", "category", "system", "input", "tools"),
    "dpo": ("task_category", "system", "prompt", "tools"),
    "kto": ("system", "prompt", "tools"),
    "grpo": ("system", "split"),
}


class DataError(UserError, ValueError):
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


def is_data_file(path: str) -> bool:
    return f".{data_format(path)}" in DATA_EXTENSIONS and not path.endswith(".parquet.gz")


def resolve_data_files(specs: str | list[str]) -> list[str]:
    """Expand files, folders and globs into a sorted, de-duplicated list of data files; fail on any spec that
    matches nothing, so a typo in a YAML data list is an error, not a smaller run."""
    if isinstance(specs, str):
        specs = [specs]
    files: list[str] = []
    for spec in specs:
        spec = os.path.expanduser(str(spec))
        if os.path.isdir(spec):
            found = sorted(str(p) for p in Path(spec).rglob("*") if is_data_file(str(p)) and p.is_file())
        elif any(ch in spec for ch in "*?["):
            found = sorted(p for p in glob.glob(spec, recursive=True) if is_data_file(p))
        elif os.path.isfile(spec):
            if not is_data_file(spec):
                raise DataError(f"{spec}: unsupported file type (expected one of {', '.join(DATA_EXTENSIONS)}, "
                                "optionally .gz)")
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


@dataclass(frozen=True)
class WorkUnit:
    """A piece of one file that a preparation worker reads on its own: a parquet row group, or the lines of a
    jsonl/txt file whose first byte lies in [byte_start, byte_end) (`first_line` is the number of the first of them,
    so locations in messages stay true to the file). Whole-file units have no range."""

    path: str
    row_group: int | None = None
    first_row: int = 0
    byte_start: int | None = None
    byte_end: int | None = None
    first_line: int = 1


def data_format(path: str) -> str:
    """parquet | jsonl | json | txt, looking through a .gz ending."""
    name = path[:-3] if path.endswith(".gz") else path
    return Path(name).suffix.lstrip(".")


def _line_boundaries(path: str, unit_bytes: int) -> list[tuple[int, int]]:
    """(byte offset, line number) of line starts about every `unit_bytes`: one pass at disk speed, so workers can
    seek to their range and still report true line numbers."""
    boundaries = [(0, 1)]
    with open(path, "rb") as handle:
        position, lines = 0, 1
        while True:
            handle.seek(boundaries[-1][0] + unit_bytes)
            handle.readline()  # finish the line the jump landed in
            next_start = handle.tell()
            if next_start >= os.path.getsize(path):
                return boundaries
            handle.seek(position)
            lines += handle.read(next_start - position).count(b"\n")
            position = next_start
            boundaries.append((position, lines))


def plan_units(files: list[str], unit_bytes: int = 64 << 20) -> list[WorkUnit]:
    """Split files into work units, in data order: parquet by row group, large uncompressed jsonl/txt by line
    ranges of about `unit_bytes`, anything else whole. The plan depends only on the files, never on the number of
    workers, so every worker count produces the same units and hence the same output."""
    units = []
    for path in files:
        kind = data_format(path)
        if kind == "parquet":
            metadata = _open_parquet(path).metadata
            first_row = 0
            for group in range(metadata.num_row_groups):
                units.append(WorkUnit(path, row_group=group, first_row=first_row))
                first_row += metadata.row_group(group).num_rows
        elif kind in ("jsonl", "txt") and not path.endswith(".gz") and os.path.getsize(path) > unit_bytes:
            boundaries = _line_boundaries(path, unit_bytes)
            ends = [start for start, _ in boundaries[1:]] + [os.path.getsize(path)]
            units.extend(WorkUnit(path, byte_start=start, byte_end=end, first_line=line)
                         for (start, line), end in zip(boundaries, ends))
        else:
            units.append(WorkUnit(path))
    return units


def _open_parquet(path: str):
    try:
        # Buffered page-by-page reads: without them a whole row group (which can be a whole file) is read
        # into memory at once (627 MB vs 133 MB peak for a 500 MB single-row-group file).
        return pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    except Exception as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from err


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, path: str, line_number: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}:line {line_number}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                        "convert the file, e.g. iconv -f GB18030 -t UTF-8") from None
    # A byte-order mark opens files saved by some Windows editors; it is not part of the first record.
    return text[1:] if line_number == 1 and text.startswith("\ufeff") else text


def _iter_lines(unit: WorkUnit) -> Iterator[tuple[int, str]]:
    """(line number, text without its line end) of every line of a unit; CRLF and LF alike."""
    with _open_binary(unit.path) as handle:
        if unit.byte_start is not None:
            handle.seek(unit.byte_start)
        position = unit.byte_start or 0
        for line_number, raw in enumerate(handle, start=unit.first_line):
            if unit.byte_end is not None and position >= unit.byte_end:
                return
            position += len(raw)
            yield line_number, _decode(raw, unit.path, line_number).rstrip("\r\n")


def _columns_of(record: dict, path: str, where: str, kind: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return {c: record.get(c) for c in _pick_columns(path, list(record), kind)}


def iter_file_records(path: str | WorkUnit, kind: str) -> Iterator[tuple[str, dict]]:
    """Yield (location, record) for every record of one file, or of one WorkUnit of it, with only the columns the
    stage kind needs."""
    unit = path if isinstance(path, WorkUnit) else WorkUnit(path)
    path = unit.path
    file_format = data_format(path)
    if file_format == "parquet":
        parquet = _open_parquet(path)
        columns = _pick_columns(path, parquet.schema_arrow.names, kind)
        row_groups = None if unit.row_group is None else [unit.row_group]
        row = unit.first_row
        for batch in parquet.iter_batches(batch_size=1000, columns=columns, row_groups=row_groups):
            for record in batch.to_pylist():
                yield f"{path}:row {row}", record
                row += 1
    elif file_format == "jsonl":
        for line_number, line in _iter_lines(unit):
            if not line.strip():
                continue
            where = f"{path}:line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            yield where, _columns_of(record, path, where, kind)
    elif file_format == "json":
        with _open_binary(path) as handle:
            text = _decode(handle.read(), path, 1)
        try:
            content = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        if isinstance(content, dict) and content and all(isinstance(v, list) for v in content.values()):
            lengths = {len(v) for v in content.values()}
            if len(lengths) != 1:
                raise DataError(f"{path}: columns of a JSON object of lists must have equal lengths, got {lengths}")
            content = [dict(zip(content, values)) for values in zip(*content.values())]
        if not isinstance(content, list):
            raise DataError(f"{path}: expected a JSON array of records, got {type(content).__name__}")
        for index, record in enumerate(content):
            where = f"{path}:record {index}"
            yield where, _columns_of(record, path, where, kind)
    elif file_format == "txt":
        if kind != "pt":
            raise DataError(f"{path}: plain text files hold pretraining documents only, not {kind} data")
        for line_number, line in _iter_lines(unit):
            if line.strip():
                yield f"{path}:line {line_number}", {"text": line}
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
    """Some exports store lists/structs as their Python or JSON text; accept both. Only for fields that are
    structures (message lists, `label`, `tools`, `tool_calls`, a `function_call` turn): message text never is."""
    if isinstance(value, str) and value[:1] in "[{":
        for parse in (json.loads, ast.literal_eval):
            try:
                return parse(value)
            except (ValueError, SyntaxError, RecursionError):
                continue
    return value


def _first(item: dict, *keys):
    """The value of the first of `keys` that has one: parquet gives every row every struct field, absent ones None."""
    return next((item[key] for key in keys if item.get(key) is not None), None)


def _is_message(value) -> bool:
    return isinstance(value, dict) and _first(value, "role", "from") is not None


def _message_structure(value):
    """A DPO prompt/chosen/rejected field: text, a message, or a list of messages, which some exports store as
    their JSON/Python text. Text is taken for messages only if it parses into messages, so an answer that merely
    looks like JSON ("[71, 269, 3]", '{"k": 1}') stays the answer."""
    parsed = _maybe_literal(value)
    items = parsed if isinstance(parsed, list) else [parsed]
    return parsed if items and all(map(_is_message, items)) else value


# Typed parts an assistant message may hold besides text (LLaMA-Factory's messages): its thinking, and a tool call
# as the JSON text of {name, arguments}.
ASSISTANT_PARTS = ("reasoning", "tool_call")


def _content_text(content, what: str, other_parts: tuple[str, ...] = ()) -> tuple[str | None, dict[str, list]]:
    """A message's text: a string as it is, or typed parts [{"type": "text", "text"|"value": ...}] (OpenAI,
    LLaMA-Factory's newer format) joined with nothing between them, as Qwen2-VL's template joins them: the parts
    are pieces of one text, and a separator would add characters the author did not write. Parts of the types in
    `other_parts` are returned beside the text, by type and in order; any other type skips the record."""
    if not isinstance(content, list):
        return content, {}
    texts, others = [], {kind: [] for kind in other_parts}
    for part in content:
        if not isinstance(part, dict):
            raise SkipRecord(f"content part of a {what} is not an object")
        kind = part.get("type")
        if kind != "text" and kind not in others:
            raise SkipRecord(f"non-text content part {kind!r}")
        value = _first(part, "text", "value")
        if kind == "tool_call":  # a structure, checked by _tool_call_text
            others[kind].append(_maybe_literal(value))
            continue
        if not isinstance(value, str):
            raise SkipRecord(f"{kind} part of a {what} is not a string")
        (texts if kind == "text" else others[kind]).append(value)
    return "".join(texts), others


def _tool_call_text(call) -> str:
    """One call as Qwen2.5's template writes it: <tool_call>, {"name": ..., "arguments": {...}}, </tool_call>."""
    if isinstance(call, dict) and isinstance(call.get("function"), dict):  # OpenAI nests the call in "function"
        call = call["function"]
    if not isinstance(call, dict):
        raise SkipRecord("tool call is not a {name, arguments} object")
    name = call.get("name")
    if not isinstance(name, str) or not name.strip():
        raise SkipRecord("tool call without a function name")
    arguments = call.get("arguments")
    if isinstance(arguments, str):  # OpenAI sends the arguments as JSON text; Qwen writes the object itself
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise SkipRecord("tool call arguments are not valid JSON") from None
    if not isinstance(arguments, dict):
        raise SkipRecord("tool call arguments are not a JSON object")
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>"


THINK_START, THINK_END = "<think>\n", "\n</think>\n\n"


def reasoning_length(content: str) -> int:
    """Characters of the <think> block that opens an assistant text as _assistant_text writes it (0 without one):
    the span that --train_on_reasoning false leaves out of the loss."""
    end = content.find(THINK_END) if content.startswith(THINK_START) else -1
    return end + len(THINK_END) if end >= 0 else 0


def _reasoning(item: dict, content, parts: dict[str, list]) -> tuple[str, str | None]:
    """(the reasoning of an assistant message, its text without it). The reasoning may be a field
    (`reasoning_content`: DeepSeek, OpenAI-compatible servers; `reasoning`, `thinking`), `reasoning` parts
    (LLaMA-Factory), or a <think>...</think> block already opening the text (R1-style distillations); blank
    reasoning is none. Given in two of these places, which one the answer follows is unknowable: skipped."""
    field = _first(item, "reasoning_content", "reasoning", "thinking")
    if field is not None and not isinstance(field, str):
        raise SkipRecord("assistant reasoning is not a string")
    found = [field or "", "".join(parts.get("reasoning", []))]
    if isinstance(content, str) and content.lstrip().startswith("<think>") and "</think>" in content:
        thought, _, content = content.lstrip().removeprefix("<think>").partition("</think>")
        found.append(thought)
        content = content.lstrip("\n")
    found = [text.strip("\n") for text in found if text.strip()]
    if len(found) > 1:
        raise SkipRecord("assistant reasoning given twice")
    return (found[0] if found else ""), content


def _assistant_text(item: dict, content, parts: dict[str, list]) -> str:
    """The text an assistant turn trains on, as Qwen3's template writes a turn (Qwen2.5's has no reasoning): the
    reasoning in a <think> block, a blank line, the text, then one <tool_call> block per call, each on its own line
    as Qwen2.5's template puts them. Calls come from OpenAI `tool_calls` (or its older `function_call`) and from
    LLaMA-Factory `tool_call` parts."""
    reasoning, content = _reasoning(item, content, parts)
    calls = _maybe_literal(_first(item, "tool_calls", "function_call"))
    if isinstance(calls, dict):  # OpenAI's older single `function_call`
        calls = [calls]
    if calls is not None and not isinstance(calls, list):
        raise SkipRecord("tool_calls is not a list")
    calls = (calls or []) + parts.get("tool_call", [])
    if calls:
        if content is not None and not isinstance(content, str):
            raise SkipRecord("assistant message is not a string")
        content = "\n".join(([content] if content else []) + [_tool_call_text(call) for call in calls])
    content = _text(content, "assistant message")  # thinking alone is no answer
    # newlines trimmed where Qwen3's template trims them
    return THINK_START + reasoning + THINK_END + content.lstrip("\n") if reasoning else content


def _message(item) -> dict:
    """One message as {"role", "content"}; role system, user, assistant or tool (folded by _messages)."""
    if not isinstance(item, dict):
        raise SkipRecord("message is not an object")
    raw_role = _first(item, "role", "from")
    role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
    if role is None:
        raise SkipRecord(f"unknown role {raw_role!r}")
    raw_content = _first(item, "content", "value")
    if role == "function_call":  # LLaMA-Factory: the value is the JSON of one call {name, arguments} or a list
        calls = _maybe_literal(raw_content)
        calls = calls if isinstance(calls, list) else [calls]
        return {"role": "assistant", "content": _text("\n".join(map(_tool_call_text, calls)), "function_call message")}
    if role == "assistant":
        return {"role": role, "content": _assistant_text(item, *_content_text(raw_content, "assistant message",
                                                                               ASSISTANT_PARTS))}
    content, _ = _content_text(raw_content, f"{role} message")
    if item.get("tool_calls"):
        raise SkipRecord(f"tool_calls on a {role} message")
    return {"role": role, "content": _text(content, f"{role} message")}


def _messages(items) -> list[dict]:
    """A list of messages (or its JSON/Python text) into ChatML messages, in the order given. Tool results become a
    user turn of <tool_response> blocks, consecutive results sharing one turn, as Qwen2.5's template shows them."""
    items = _maybe_literal(items)
    if not isinstance(items, list) or not items:
        raise SkipRecord("no messages")
    messages, previous_role = [], None
    for message in map(_message, items):
        if message["role"] == "tool":
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if previous_role == "tool":
                messages[-1]["content"] += "\n" + block
            else:
                messages.append({"role": "user", "content": block})
        else:
            messages.append(message)
        previous_role = message["role"]
    return messages


def _check_turns(messages: list[dict]) -> list[dict]:
    """Optional system first, then user/assistant alternating, starting with user."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise SkipRecord(f"roles do not alternate user/assistant (got {message['role']} at turn {index})")
    return messages


def normalize_messages(items) -> list[dict]:
    """A list of {role|from, content|value} into ChatML messages: optional system first, then user/assistant
    alternating, starting with user and ending with assistant (a trailing unanswered user turn is dropped)."""
    messages = _check_turns(_messages(items))
    if messages[-1]["role"] == "user":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "assistant":
        raise SkipRecord("no assistant answer")
    return messages


def _exchanges(items) -> list[dict]:
    """Firefly/MOSS `conversation: [{human, assistant}, ...]` (XTuner writes {input, output}) as messages; a
    `system` in the first exchange opens the conversation."""
    items = _maybe_literal(items)
    if not isinstance(items, list) or not items:
        raise SkipRecord("no messages")
    messages = []
    for index, exchange in enumerate(items):
        if not isinstance(exchange, dict):
            raise SkipRecord("conversation exchange is not an object")
        system = exchange.get("system") if index == 0 else None
        if system:
            messages.append({"role": "system", "content": system})
        human, answer = _first(exchange, "human", "input"), _first(exchange, "assistant", "output")
        if system and human is None and answer is None:  # a first item holding only the system prompt
            continue
        messages.append({"role": "user", "content": human})
        if answer is not None:  # a last question may be unanswered; normalize_messages drops it
            messages.append({"role": "assistant", "content": answer})
    return messages


# Qwen2.5's chat template (Qwen2.5-*-Instruct tokenizer_config.json) writes the tools into the system message in
# these words, and a model fine-tuned from Qwen2.5 has learnt to call tools from them.
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _tools_text(tools) -> str:
    """The tools block of the system message, one JSON spec a line; "" when the record offers no tools."""
    tools = _maybe_literal(tools)
    if not tools or (isinstance(tools, str) and not tools.strip()):
        return ""
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise SkipRecord("tools is not a list of function specs")
    # Qwen2.5 was trained on OpenAI-style specs; bare ones (LLaMA-Factory) are wrapped as its Qwen formatter does.
    specs = [tool if tool.get("type") == "function" else {"type": "function", "function": tool} for tool in tools]
    return TOOLS_HEADER + "".join("\n" + json.dumps(spec, ensure_ascii=False) for spec in specs) + TOOLS_FOOTER


def _with_system(messages: list[dict], system, tools) -> list[dict]:
    """The record's `system` (unless the conversation has its own) and `tools` in one system message first, as
    Qwen2.5's template joins them. Without system text the tools block stands alone, as in Qwen3's template
    (Qwen2.5's would put its own "You are Qwen" identity there)."""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    content = "\n\n".join(part for part in (str(system) if system else "", _tools_text(tools)) if part)
    return ([{"role": "system", "content": content}] if content else []) + messages


KTO_LABEL_REASON = ("labelled (KTO-style) record: label true/false marks desirable/undesirable replies; SFT would "
                    "train on the undesirable ones, and DPO needs chosen/rejected pairs")


def _refuse_kto_label(record: dict):
    """KTO data (TRL's unpaired preference format) labels each reply good or bad. Infinity-Instruct's `label` is a
    struct of abilities (or its text): a category, not a verdict, so only a bool or the words true/false count."""
    label = record.get("label")
    if isinstance(label, bool) or (isinstance(label, str) and label.strip().lower() in ("true", "false")):
        raise SkipRecord(KTO_LABEL_REASON)


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
    _refuse_kto_label(record)
    if record.get("conversations") is not None:
        messages = normalize_messages(record["conversations"])
    elif record.get("messages") is not None:
        messages = normalize_messages(record["messages"])
    elif record.get("conversation") is not None:
        messages = normalize_messages(_exchanges(record["conversation"]))
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
    return {"messages": _with_system(messages, record.get("system"), record.get("tools")),
            "category": _category(record)}


def _split_answer(messages: list[dict], what: str) -> tuple[list[dict], str]:
    """(the messages before the answer, the answer) of a conversation that ends with the assistant's answer."""
    if messages[-1]["role"] != "assistant":
        raise SkipRecord(f"{what} does not end with an assistant message")
    return messages[:-1], messages[-1]["content"]


def _answer(value, what: str) -> tuple[list[dict], str]:
    """A chosen/rejected field: the answer text, one assistant message, or a conversation ending in the answer
    (Infinity-Preference repeats the prompt there). Returns (the messages before the answer, the answer)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return [], _text(value, what)
    if not value:
        raise SkipRecord(f"empty {what}")
    return _split_answer(_messages(value), what)


HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def _transcript(text, side: str) -> tuple[list[dict], str]:
    """Anthropic hh-rlhf: a whole dialogue "\\n\\nHuman: …\\n\\nAssistant: …" in one string. The answer is the last
    Assistant turn, the turns before it the prompt. Returns (prompt messages, answer)."""
    text = _text(text, side)
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise SkipRecord(f"no prompt: no prompt column, and {side} is not a Human:/Assistant: transcript")
    prefix = text[:cut]
    opening, *exchanges = (f"\n\n{prefix}" if prefix.startswith("Human:") else prefix).split(HH_HUMAN)
    if opening.strip() or not exchanges:
        raise SkipRecord(f"{side} transcript does not start with a Human: turn")
    items = []
    for exchange in exchanges:
        human, *answers = exchange.split(HH_ASSISTANT)
        items.append({"role": "user", "content": human.removeprefix(" ")})
        items.extend({"role": "assistant", "content": answer.removeprefix(" ")} for answer in answers)
    return _messages(items), _text(text[cut + len(HH_ASSISTANT):].removeprefix(" "), f"{side} answer")


def _turns(messages: list[dict], roles=("system", "user", "assistant")) -> list[tuple[str, str]]:
    """What two prompts are compared on: whitespace at the ends of a text is not a difference."""
    return [(message["role"], message["content"].strip()) for message in messages if message["role"] in roles]


def _prompt_field_agrees(prompt_field, embedded: list[dict]) -> bool:
    """A prompt text agrees with the prompt inside chosen/rejected if it is its first or its last user turn (the
    conversation's opening, or the question answered); a prompt message list agrees if it has the same turns."""
    if isinstance(prompt_field, list):
        return _turns(_messages(prompt_field), ("user", "assistant")) == _turns(embedded, ("user", "assistant"))
    users = [content for _, content in _turns(embedded, ("user",))]
    return bool(users) and str(prompt_field).strip() in (users[0], users[-1])


def normalize_dpo(record: dict) -> dict:
    _refuse_kto_label(record)
    prompt_field = _message_structure(record.get("prompt"))
    if isinstance(prompt_field, dict):
        prompt_field = [prompt_field]
    prompt_given = bool(prompt_field.strip() if isinstance(prompt_field, str) else prompt_field)
    if "chosen_messages" in record:
        chosen_prompt, chosen = _split_answer(_messages(record["chosen_messages"]), "chosen answer")
        rejected_prompt, rejected = _split_answer(_messages(record["rejected_messages"]), "rejected answer")
    elif "chosen" not in record:
        raise SkipRecord("no chosen/rejected pair: prompt/completion or messages data is not preference data")
    else:
        chosen_raw, rejected_raw = _message_structure(record["chosen"]), _message_structure(record.get("rejected"))
        if "prompt" not in record and "conversations" not in record and isinstance(chosen_raw, str):
            chosen_prompt, chosen = _transcript(chosen_raw, "chosen")
            rejected_prompt, rejected = _transcript(rejected_raw, "rejected")
        else:
            chosen_prompt, chosen = _answer(chosen_raw, "chosen answer")
            rejected_prompt, rejected = _answer(rejected_raw, "rejected answer")
    if chosen_prompt and rejected_prompt and _turns(chosen_prompt) != _turns(rejected_prompt):
        raise SkipRecord("chosen and rejected answer different prompts")
    embedded_prompt = chosen_prompt or rejected_prompt
    if record.get("conversations") is not None:
        prompt = _messages(record["conversations"])
    elif embedded_prompt:
        # Two prompts that disagree: which one the answers reply to is unknowable, so neither is guessed.
        if prompt_given and not _prompt_field_agrees(prompt_field, embedded_prompt):
            raise SkipRecord("prompt field disagrees with the prompt inside chosen/rejected")
        prompt = embedded_prompt
    elif isinstance(prompt_field, list):
        prompt = _messages(prompt_field)
    else:
        prompt = [{"role": "user", "content": _text(prompt_field, "prompt")}]
    prompt = _check_turns(_with_system(prompt, record.get("system"), record.get("tools")))
    if prompt[-1]["role"] != "user":
        raise SkipRecord("prompt does not end with a user message")
    if chosen.strip() == rejected.strip():
        raise SkipRecord("chosen and rejected are identical")
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _label(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise SkipRecord("label is not true/false")


def normalize_kto(record: dict) -> list[dict]:
    """KTO's unpaired data: a prompt, one reply and whether it is desirable. A preference pair gives two."""
    if "label" not in record:
        pair = normalize_dpo(record)
        return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
    label = _label(record["label"])
    if record.get("messages") is not None:
        prompt, completion = _split_answer(_messages(record["messages"]), "completion")
    else:
        embedded, completion = _answer(_message_structure(record.get("completion")), "completion")
        prompt_field = _message_structure(record.get("prompt"))
        if isinstance(prompt_field, list):
            prompt = _messages(prompt_field)
        else:
            prompt = embedded or [{"role": "user", "content": _text(prompt_field, "prompt")}]
    prompt = _check_turns(_with_system(prompt, record.get("system"), record.get("tools")))
    if prompt[-1]["role"] != "user":
        raise SkipRecord("prompt does not end with a user message")
    return [{"prompt": prompt, "completion": [{"role": "assistant", "content": completion}], "label": label}]


def normalize_grpo(record: dict) -> dict:
    """A problem with a checkable answer: GSM8K's `question` and `answer` (a solution whose last line is
    `#### <number>`, or the number alone), as the question and that number (utils.rewards compares with it).
    GSM8K_zh's `question_zh` / `answer_only` are read the same way; a file that holds its test split beside the
    train split (a `split` column) gives only the train rows."""
    if record.get("split") not in (None, "train"):
        raise SkipRecord(f"not the train split ({record['split']})")
    question = _text(record.get("question_zh", record.get("question")), "question")
    answer = record.get("answer_only", record.get("answer"))
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        number = float(answer)
    else:
        text = _text(answer, "answer")
        number = final_number(text) if "####" in text else parse_number(text)
        if number is None:
            raise SkipRecord("answer has no final number (a last line '#### <number>', or a number alone)")
    return {"question": question, "answer": str(int(number)) if number.is_integer() else repr(number),
            "system": record.get("system")}


NORMALIZERS = {"pt": normalize_pt, "sft": normalize_sft, "dpo": normalize_dpo, "kto": normalize_kto,
               "grpo": normalize_grpo}


def iter_normalized(files: list[str], kind: str, counter: SkipCounter, check=None) -> Iterator[dict]:
    """Every usable record of `files`, normalised for `kind`; the rest are counted in `counter`.
    `check(record)` may add a stage's own rule by raising SkipRecord."""
    normalize = NORMALIZERS[kind]
    for path in files:
        for where, record in iter_file_records(path, kind):
            try:
                normalized = normalize(record)
                # a KTO record may be a preference pair: two unpaired rows
                rows = normalized if isinstance(normalized, list) else [normalized]
                if check is not None:
                    rows = [check(row) for row in rows]
            except SkipRecord as reason:
                counter.skip(str(reason), where)
                continue
            counter.kept += 1
            yield from rows


def load_records(specs: str | list[str], kind: str) -> tuple[list[dict], SkipCounter]:
    """All normalised records in memory, with the skip counts: for SFT/DPO-sized data and for inspection.
    Pretraining corpora go through utils.packing, which streams."""
    counter = SkipCounter()
    records = list(iter_normalized(resolve_data_files(specs), kind, counter))
    return records, counter
