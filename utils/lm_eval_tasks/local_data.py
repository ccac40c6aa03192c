"""Local benchmark files for the task YAMLs beside this file (`custom_dataset: !function local_data.load`).

lm-eval's own ceval-valid, cmmlu, mmlu and gsm8k tasks read hub datasets; these read the same data from local
files and hand lm-eval the hub datasets' columns, so the prompt templates stay lm-eval's, word for word:
  C-Eval  `id,question,A,B,C,D,answer[,explanation]`  -> id, question, A-D, answer, explanation (ceval/ceval-exam)
  CMMLU   `,Question,A,B,C,D,Answer`                  -> Question, A, B, C, D, Answer (haonan-li/cmmlu)
  MMLU    no header: question,A,B,C,D,answer          -> question, subject, choices, answer 0-3 (cais/mmlu)
  GSM8K   .jsonl / .json / .parquet of {question, answer ending "#### <number>"}  (openai/gsm8k)
CSVs go through the csv module, every cell text: pandas (the `csv` dataset builder) would read an option "None" or
"NA" as NaN, "1.50" as 1.5 and "007" as 7, and so change the prompt. Every row is checked; a bad one stops the
load with file:line and the reason (utils/eval_harness.py reads every file this way before any model loads).

Self-contained (no `utils` import): lm-eval imports this file by its path, from any working directory.
"""

import csv
import json
import re
from pathlib import Path

LETTERS = ("A", "B", "C", "D")
# lm-eval gsm8k's strict-match filter: what a reference answer must hold for exact match to mean anything.
GSM8K_FINAL = re.compile(r"#### (\-?[0-9\.\,]+)")


class LocalDataError(ValueError):
    """A file lm-eval cannot score as it stands; the message names the file and line."""


def csv_style(first_row: list[str]) -> str:
    cells = [cell.strip().lower() for cell in first_row]
    if cells[1:7] == ["question", "a", "b", "c", "d", "answer"] and cells[0] in ("id", ""):
        return "ceval" if cells[0] == "id" else "cmmlu"  # CMMLU's index column has no name: pandas wrote it
    if len(cells) == 6:
        return "mmlu"
    raise LocalDataError(f"unrecognised header {first_row!r}: expected id,question,A,B,C,D,answer[,...] (C-Eval), "
                         ",Question,A,B,C,D,Answer (CMMLU) or six columns without a header (MMLU)")


def subject_of(path: Path) -> str:
    """computer_network_val.csv -> computer_network (the split suffix of C-Eval's and MMLU's file names goes)."""
    return re.sub(r"_(dev|val|test)$", "", path.stem)


def read_csv(path: str | Path) -> tuple[str, list[dict]]:
    """(style, docs in the hub dataset's columns) of one subject's CSV."""
    path = Path(path)
    with path.open(encoding="utf-8-sig", newline="") as handle:  # -sig: CSVs saved by Excel start with a BOM
        reader, rows, start = csv.reader(handle), [], 1
        try:
            for row in reader:
                rows.append((start, row))
                start = reader.line_num + 1  # a quoted cell may span lines: the next row starts after this one ends
        except csv.Error as error:
            raise LocalDataError(f"{path}:{start}: {error}") from None
        except UnicodeDecodeError:  # e.g. a GBK export; where exactly is unknown (the file is decoded in chunks)
            raise LocalDataError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    if not rows:
        raise LocalDataError(f"{path}: empty file")
    try:
        style = csv_style(rows[0][1])
    except LocalDataError as error:
        raise LocalDataError(f"{path}:1: {error}") from None
    first = 0 if style == "mmlu" else 1  # C-Eval and CMMLU rows begin with an id
    docs = []
    for line, row in rows if style == "mmlu" else rows[1:]:
        if not any(cell.strip() for cell in row):
            continue  # a blank line, e.g. at the end of a hand-edited file
        if len(row) < first + 6:
            raise LocalDataError(f"{path}:{line}: {len(row)} columns, expected {first + 6} "
                                 f"({'id, ' if first else ''}question, A-D, answer)")
        question, options, answer = row[first], row[first + 1: first + 5], row[first + 5].strip()
        if not question.strip():
            raise LocalDataError(f"{path}:{line}: empty question")
        for letter, option in zip(LETTERS, options):
            if not option.strip():
                raise LocalDataError(f"{path}:{line}: option {letter} is empty")
        if answer not in LETTERS:
            raise LocalDataError(f"{path}:{line}: answer {answer!r} is not one of A, B, C, D")
        if style == "mmlu":
            docs.append({"question": question, "subject": subject_of(path), "choices": options,
                         "answer": LETTERS.index(answer)})
        elif style == "ceval":
            docs.append({"id": row[0], "question": question, **dict(zip(LETTERS, options)), "answer": answer,
                         "explanation": row[7] if len(row) > 7 else ""})
        else:
            docs.append({"Question": question, **dict(zip(LETTERS, options)), "Answer": answer})
    if not docs:
        raise LocalDataError(f"{path}: no questions")
    return style, docs


def read_gsm8k(path: str | Path) -> list[dict]:
    """GSM8K-shaped problems: a question and a worked answer whose `#### <number>` is what exact match compares."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet

        records = [(f"row {index + 1}", record) for index, record in
                   enumerate(pyarrow.parquet.read_table(path).to_pylist())]
    elif path.suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json" and text.lstrip().startswith("["):
            try:
                records = [(f"record {index + 1}", record) for index, record in enumerate(json.loads(text))]
            except ValueError as error:
                raise LocalDataError(f"{path}: not JSON ({error})") from None
        else:
            records = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append((f"{number}", json.loads(line)))
                    except ValueError as error:
                        raise LocalDataError(f"{path}:{number}: not JSON ({error})") from None
    else:
        raise LocalDataError(f"{path}: expected .jsonl, .json or .parquet")
    docs = []
    for where, record in records:
        if not (isinstance(record, dict) and isinstance(record.get("question"), str)
                and isinstance(record.get("answer"), str)):
            raise LocalDataError(f"{path}:{where}: expected question and answer strings (GSM8K's columns)")
        if not GSM8K_FINAL.search(record["answer"]):
            raise LocalDataError(f"{path}:{where}: the answer has no `#### <number>` line to compare against")
        docs.append({"question": record["question"], "answer": record["answer"]})
    if not docs:
        raise LocalDataError(f"{path}: no problems")
    return docs


def read_docs(path: str | Path) -> list[dict]:
    return read_csv(path)[1] if Path(path).suffix == ".csv" else read_gsm8k(path)


def load(data_files: dict[str, list[str]], **_):
    """lm-eval's custom_dataset hook: {split: [files]} -> a DatasetDict (it passes its metadata too: ignored)."""
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list([doc for path in paths for doc in read_docs(path)])
                                 for split, paths in data_files.items()})
