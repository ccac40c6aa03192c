"""The one data layer: real files with schema drift load for every stage; bad input fails fast or is counted."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REFERENCE, REPO, SHARED, needs_shared
from utils.files import DataError, resolve_data_files
from utils.formats import load_records


@needs_shared
def test_original_mini_data_loads_for_all_three_stages():
    pt, pt_counts = load_records(str(REFERENCE / "mini_data" / "pt"), "pt")
    assert pt_counts.kept == len(pt) == 200 and not pt_counts.skipped
    assert set(pt[0]) == {"text", "quality_score"}  # zh files have 13 columns, en 9: only what PT needs is kept

    # 7M has int64 ids and Gen str ids (seed FAQ 10), label is a struct (FAQ 11): they combine without surgery.
    sft, sft_counts = load_records(str(REFERENCE / "mini_data" / "sft"), "sft")
    assert sft_counts.kept == len(sft) == 200
    assert max(len(s["messages"]) for s in sft) >= 12  # 7M's multi-turn rows keep every turn
    assert all(s["messages"][-1]["role"] == "assistant" for s in sft)
    assert any(s["category"] == "programming and software development" for s in sft)

    dpo, dpo_counts = load_records(str(REFERENCE / "mini_data" / "dpo"), "dpo")
    assert dpo_counts.kept == len(dpo) == 200
    first = dpo[0]
    assert first["prompt"][-1]["role"] == "user" and first["chosen"][0]["role"] == "assistant"
    assert first["chosen"][0]["content"] != first["rejected"][0]["content"]


@needs_shared
@pytest.mark.parametrize("path, kind, count", [
    ("llamafactory/alpaca_zh_demo.json", "sft", 1000),
    ("fastchat/dummy_conversation.json", "sft", 500),
    ("chatlm_mini_chinese/my_valid_dataset_1k.parquet", "sft", 1000),
    ("llamafactory/dpo_en_demo.json", "dpo", 300),
    ("llamafactory/c4_demo.jsonl", "pt", 300),
    ("llamafactory/wiki_demo.txt", "pt", 30),
])
def test_other_common_shapes_normalise(path, kind, count):
    records, counts = load_records(str(SHARED / "data" / path), kind)
    assert len(records) == count and counts.kept == count


def test_repo_mini_data_loads_with_the_same_code():
    for kind, minimum in (("pt", 100), ("sft", 100), ("dpo", 50)):
        records, counts = load_records(str(REPO / "mini_data" / kind), kind)
        assert len(records) >= minimum and not counts.skipped


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n{"text": "fine"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:line 2: invalid JSON"):
        load_records(str(path), "pt")


def test_parquet_without_the_needed_column_names_file_and_columns(tmp_path):
    path = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"body": ["a"], "quality_score": [3.0]}), path)
    with pytest.raises(DataError, match=r"no_text\.parquet: no columns for pt data: expected text \| content; "
                                        r"the file has: body, quality_score"):
        load_records(str(path), "pt")


def test_unusable_records_are_skipped_and_counted_by_reason(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"conversations": [{"from": "narrator", "value": "once"}, {"from": "gpt", "value": "upon"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]},
        {"conversations": [{"from": "human", "value": "only a question"}]},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    records, counts = load_records(str(path), "sft")
    assert len(records) == 1 and counts.kept == 1
    assert counts.skipped == {"unknown role 'narrator'": 1, "empty assistant message": 1, "no assistant answer": 1}
    assert counts.first_seen["unknown role 'narrator'"].endswith("sft.jsonl:line 2")
    assert "skipped 3" in counts.report("sft")


def test_identical_preference_answers_are_counted_not_trained(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"prompt": "q", "chosen": "same", "rejected": "same"},
                                {"prompt": "q", "chosen": "good", "rejected": "bad"}]))
    records, counts = load_records(str(path), "dpo")
    assert len(records) == 1 and counts.skipped == {"chosen and rejected are identical": 1}


def test_a_data_spec_that_matches_nothing_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        resolve_data_files([str(tmp_path / "typo")])
    with pytest.raises(DataError, match="matches no"):
        resolve_data_files([str(tmp_path / "*.parquet")])
