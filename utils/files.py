"""Files and work units: find the data files a stage is given (files, folders searched recursively, globs), cut
them into work units (parquet row groups, line ranges of large jsonl/txt), and read raw records from them.

Files: json (an array, or an object of equal-length lists), jsonl, parquet, txt (one document per non-empty line),
each also gzip-compressed (.gz); UTF-8 with or without a byte-order mark, LF or CRLF. Each file is read on its own
and only the columns a shape needs (SHAPES, OPTIONAL_COLUMNS) are taken from it, so files whose other columns
drift (Infinity-Instruct's `id` is int64 in 7M and str in Gen; `label` a struct or a str) combine without surgery.
Unreadable input raises DataError naming the file, the line or row and the reason. Turning raw records into what a
stage trains on is utils/formats.py.
"""

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

# Each may also end in .gz (several public sets ship gzip-compressed jsonl).
DATA_EXTENSIONS = (".parquet", ".jsonl", ".json", ".txt")

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
