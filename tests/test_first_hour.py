"""What a new user's own files meet first: file encodings and compression, one-line errors from the real stage
entry points, a run that would train on little of its data, and caches that follow the code."""

import gzip
import json

import pytest
from datasets import Dataset

from conftest import REPO
from utils.errors import run_main
from utils.formats import load_records

CONVERSATION = {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！有什么可以帮你？"}]}


def write_jsonl(path, records, opener=open, prefix="", newline="\n"):
    with opener(path, "wt", encoding="utf-8", newline="") as handle:
        handle.write(prefix + "".join(json.dumps(r, ensure_ascii=False) + newline for r in records))
    return path


def run_stage(module, argv, tmp_path, capsys) -> tuple[int, list[str]]:
    """The stage's real entry point (run_main(main, argv)), in this process: exit status and stderr lines."""
    flags = ["--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--use_cpu", "true",
             "--bf16", "false", "--report_to", "none", "--data_workers", "1", "--prepare_only"]
    status = 0
    try:
        run_main(module.main, ["--config", str(REPO / "configs" / f"demo_{module.__name__[10:]}.yaml"), *flags, *argv])
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err.strip().splitlines()


def prepared_rows(tmp_path) -> list[dict]:
    (cache,) = (tmp_path / "cache").glob("*/data.arrow")
    return Dataset.from_file(str(cache)).to_list()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TOOL_USE = {"tools": [WEATHER_TOOL], "messages": [
    user("Weather in Paris?"),
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"sky": "sunny"}'}, assistant("Sunny in Paris.")]}
DISAGREEING_PAIR = {"prompt": "What is 3+3?", "chosen": [user("What is 2+2?"), assistant("4")],
                    "rejected": [user("What is 2+2?"), assistant("5")]}
# Each malformed or unusual file named in the first-hour review, through the stage's real entry point: it trains
# (the answer it shows is in the prepared labels / chosen ids), or stops with one line naming the file.
FIRST_HOUR_FILES = {
    "empty file": ("pt", "empty.jsonl", [], "error: {path}: no pt records at all"),
    "typed text parts": ("sft", "parts.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
        {"role": "assistant", "content": [{"type": "text", "value": "Blue"}, {"type": "text", "text": " sky."}]}]}],
        "Blue sky."),
    "answer that looks like JSON": ("sft", "json_answer.jsonl", [{"messages": [
        user("List three ids."), assistant("[71, 269, 3]")]}], "[71, 269, 3]"),
    "tool use with a tools column": ("sft", "tools.jsonl", [TOOL_USE], '"arguments": {"city": "Paris"}'),
    "KTO labels": ("sft", "kto.jsonl", [{"messages": [user("hi"), assistant("go away")], "label": False}] * 2,
                   "error: {path}: only 0 of 2 sft records are usable (0%, below min_kept_fraction 0.5): skipped 2 "
                   "labelled (KTO-style) record"),
    "Firefly conversation": ("sft", "firefly.jsonl", [{"conversation": [{"human": "hi", "assistant": "hello there"}]}],
                             "hello there"),
    "hh-rlhf transcripts": ("dpo", "hh.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant: a kind reply",
                                                 "rejected": "\n\nHuman: hi\n\nAssistant: a rude reply"}],
                            "a kind reply"),
    "chosen_messages": ("dpo", "pairs.jsonl", [{"chosen_messages": [user("2+2?"), assistant("four")],
                                                "rejected_messages": [user("2+2?"), assistant("five")]}], "four"),
    "a prompt that disagrees": ("dpo", "disagree.jsonl", [DISAGREEING_PAIR, *[{
        "prompt": "What is 2+2?", "chosen": [user("What is 2+2?"), assistant("four")],
        "rejected": [user("What is 2+2?"), assistant("five")]}] * 2], "four"),
}
# what each file that trains has skipped and counted
FIRST_HOUR_SKIPS = {"a prompt that disagrees": {"prompt field disagrees with the prompt inside chosen/rejected": 1}}


@pytest.mark.parametrize("kind", FIRST_HOUR_FILES)
def test_each_first_hour_file_trains_or_stops_with_one_line_naming_it(kind, tmp_path, capsys, tokenizer):
    import importlib

    stage, name, records, expected = FIRST_HOUR_FILES[kind]
    path = write_jsonl(tmp_path / name, records)
    status, stderr = run_stage(importlib.import_module(f"mini_qwen_{stage}"),
                               ["--init_from", str(tmp_path / "none"), "--data_files", str(path)], tmp_path, capsys)
    if expected.startswith("error:"):
        assert status == 2 and len(stderr) == 1 and stderr[0].startswith(expected.format(path=path))
        return
    assert status == 0
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    skipped = FIRST_HOUR_SKIPS.get(kind, {})
    assert report["records"]["skipped"] == skipped
    assert report["records"]["kept"] == len(records) - sum(skipped.values())
    row = prepared_rows(tmp_path)[-1 if stage == "dpo" else 0]  # SFT: the identity set's rows follow the user's
    trained = tokenizer.decode([t for t in row["labels"] if t != -100] if stage == "sft" else row["chosen_ids"])
    assert expected in trained


def test_bom_crlf_and_gzip_jsonl_are_read_like_plain_jsonl(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", [CONVERSATION] * 3)
    windows = write_jsonl(tmp_path / "windows.jsonl", [CONVERSATION] * 3, prefix="\ufeff", newline="\r\n")
    compressed = write_jsonl(tmp_path / "compressed.jsonl.gz", [CONVERSATION] * 3, opener=gzip.open)
    expected, _ = load_records(str(plain), "sft")
    for path in (windows, compressed):
        records, counts = load_records(str(path), "sft")
        assert records == expected and counts.kept == 3 and not counts.skipped
    text = tmp_path / "doc.txt.gz"
    with gzip.open(text, "wt", encoding="utf-8", newline="") as handle:
        handle.write("\ufeff第一篇文档\r\n\r\nsecond document\r\n")
    assert [r["text"] for r in load_records(str(text), "pt")[0]] == ["第一篇文档", "second document"]


def test_non_utf8_input_names_the_file_and_line_in_one_line(tmp_path, capsys):
    import mini_qwen_sft

    path = tmp_path / "gbk.jsonl"
    path.write_bytes(json.dumps(CONVERSATION, ensure_ascii=False).encode() + b"\n"
                     + json.dumps(CONVERSATION, ensure_ascii=False).encode("gbk") + b"\n")
    status, stderr = run_stage(mini_qwen_sft, ["--init_from", str(tmp_path / "none"), "--data_files", str(path)],
                               tmp_path, capsys)
    assert status == 2 and len(stderr) == 1
    assert stderr[0].startswith(f"error: {path}:line 2: not UTF-8 (byte 0x") and "iconv -f GB18030" in stderr[0]


def test_documents_that_fill_no_block_say_how_much_was_read_and_what_to_change(tmp_path, capsys):
    import mini_qwen_pt

    path = tmp_path / "two.jsonl"
    write_jsonl(path, [{"text": "短文档。"}, {"text": "A short document."}])
    status, stderr = run_stage(mini_qwen_pt, ["--data_files", str(path)], tmp_path, capsys)
    assert status == 2 and len(stderr) == 1
    assert stderr[0].startswith(f"error: {path}: no pt samples: 2 records kept, 0 skipped. 2 documents with ")
    assert "do not fill one block of block_size=128" in stderr[0] and "--block_size" in stderr[0]


def test_a_run_that_could_use_little_of_its_data_stops_before_training(tmp_path, capsys):
    import mini_qwen_sft

    path = tmp_path / "images.jsonl"
    usable = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]},
                          {"role": "assistant", "content": "a cat"}]}
    write_jsonl(path, [usable] + [image] * 3)
    # The identity set alone would still give rows to train on: the run must stop anyway.
    status, stderr = run_stage(mini_qwen_sft, ["--init_from", str(tmp_path / "none"), "--data_files", str(path)],
                               tmp_path, capsys)
    assert status == 2 and len(stderr) == 1
    assert f"{path}: only 1 of 4 sft records are usable (25%, below min_kept_fraction 0.5)" in stderr[0]
    assert "3 non-text content part 'image' (first at " in stderr[0]
    status, _ = run_stage(mini_qwen_sft, ["--init_from", str(tmp_path / "none"), "--data_files", str(path),
                                          "--min_kept_fraction", "0.2"], tmp_path, capsys)
    assert status == 0  # prepared: above the threshold the user chose, it goes on


def test_editing_the_code_that_builds_rows_changes_every_cache_key(tmp_path, monkeypatch):
    import shutil

    from utils import prepare

    before = prepare.code_fingerprint("mini_qwen_sft.py")
    copy = tmp_path / "repo"
    for module in (*prepare.ROW_BUILDING_MODULES, "mini_qwen_sft.py"):
        (copy / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / module, copy / module)
    monkeypatch.setattr(prepare, "REPO_ROOT", copy)
    assert prepare.code_fingerprint("mini_qwen_sft.py") == before  # same code, same key
    with open(copy / "utils" / "chat.py", "a") as handle:
        handle.write("\n# an edit\n")
    assert prepare.code_fingerprint("mini_qwen_sft.py") != before
    edited = prepare.code_fingerprint("mini_qwen_sft.py")
    with open(copy / "mini_qwen_sft.py", "a") as handle:
        handle.write("\n# an edit\n")
    assert prepare.code_fingerprint("mini_qwen_sft.py") != edited


def test_evaluation_and_tools_stop_with_one_line_too(tmp_path, capsys):
    import mini_qwen_eval
    from tools import plot_loss

    def entry(main, argv):
        try:
            run_main(main, argv)
        except SystemExit as stop:
            return stop.code, capsys.readouterr().err.strip().splitlines()
        raise AssertionError("no error")

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "你好"}\n\n{"text": "no prompt key"}\n', encoding="utf-8")
    assert entry(mini_qwen_eval.main, ["--model_path", str(tmp_path), "--prompts", str(prompts)]) == (
        2, [f'error: {prompts}:3: expected a JSON object with a "prompt" string'])
    assert entry(mini_qwen_eval.main, ["--model_path", str(tmp_path), "--eval_text", str(prompts)]) == (
        2, [f"error: {tmp_path}: no checkpoint there (config.json missing)"])
    assert entry(mini_qwen_eval.main, ["--model_path", str(tmp_path), "--benchmarks", f"ceval={tmp_path}"]) == (
        2, [f"error: {tmp_path}: no CSV files there (ceval: one CSV per subject; `bash prepare.sh --only eval` "
            "fetches the sets)"])
    assert entry(plot_loss.main, [str(tmp_path)]) == (2, [f"error: no trainer_state.json in {tmp_path}"])
