"""Packing modes keep every token they claim to and mark documents apart; that attention then stays inside each
document, on every backend and in training, is tests/test_fa2_paths.py."""

import json

import pyarrow as pa
import pytest
from datasets import Features, Value

from conftest import REPO
from utils.files import resolve_data_files
from utils.formats import load_records
from utils.packing import PackingStats, PretrainCollator, pack_documents, pretraining_preparation
from utils.prepare import prepare_or_load

EOS = 151645


def prepared(tokenizer, files, mode, cache_dir, workers, block_size=64, unit_bytes=64 << 20):
    preparation = pretraining_preparation(files, tokenizer, block_size, mode, None, {"mode": mode})
    preparation.unit_bytes = unit_bytes
    return prepare_or_load(preparation, str(cache_dir), workers, world_size=1)


@pytest.mark.parametrize("mode", ["concat", "document", "none"])
def test_every_token_is_kept_or_reported_dropped(tokenizer, tmp_path, mode):
    files = resolve_data_files([str(REPO / "mini_data" / "pt")])
    dataset, report = prepared(tokenizer, files, mode, tmp_path, 1)
    stats = report["packing"]
    assert stats["documents"] == 120
    assert stats["tokens_in"] == stats["tokens_kept"] + stats["tokens_dropped"]
    assert sum(len(s) for s in dataset["input_ids"]) == stats["tokens_kept"]
    assert len(dataset) == stats["samples"]
    if mode == "none":
        assert stats["padding_tokens"] == 64 * len(dataset) - stats["tokens_kept"]
    else:
        assert stats["tokens_dropped"] < 64  # only the final partial block, not a tail per batch or shard
        assert stats["padding_fraction"] == 0


@pytest.fixture
def split_corpus(tmp_path):
    """The repo's PT documents as one parquet file of 4 row groups and one jsonl file that 4 kB line ranges split
    into many work units: shard boundaries fall inside blocks everywhere."""
    import pyarrow.parquet as pq

    table = pa.concat_tables(pq.read_table(f, columns=["text"]) for f in resolve_data_files(
        [str(REPO / "mini_data" / "pt")]))
    pq.write_table(table.slice(0, 60), tmp_path / "a.parquet", row_group_size=15)
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as handle:
        for text in table.column("text").to_pylist()[60:]:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return [str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl")]


@pytest.mark.parametrize("mode", ["concat", "document", "none"])
def test_two_workers_write_the_same_bytes_as_one(tokenizer, tmp_path, split_corpus, mode):
    one, one_report = prepared(tokenizer, split_corpus, mode, tmp_path / "one", 1, unit_bytes=4096)
    two, two_report = prepared(tokenizer, split_corpus, mode, tmp_path / "two", 2, unit_bytes=4096)
    assert one_report["preparation"]["units"] == two_report["preparation"]["units"] > 10
    assert one_report["packing"] == two_report["packing"] and one_report["records"] == two_report["records"]
    ((one_file,), (two_file,)) = [list((tmp_path / name).glob("pt-*/data.arrow")) for name in ("one", "two")]
    assert one_file.read_bytes() == two_file.read_bytes()
    # And it is the packing of all documents in one stream: no token lost or moved at a shard boundary.
    from utils.tokenizer import pretraining_encoder

    texts = [r["text"] for r in load_records(split_corpus, "pt")[0]]
    assert one.to_list() == pack_documents(pretraining_encoder(tokenizer)(texts), 64, mode, EOS)


def test_document_positions_restart_at_each_boundary():
    stats = PackingStats()
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]]  # with EOS: 4 + 3 + 7 = 14 tokens
    blocks = list(pack_documents(docs, 5, "document", EOS, stats))
    assert [b["input_ids"] for b in blocks] == [[1, 2, 3, EOS, 4], [5, EOS, 6, 7, 8]]
    assert [b["position_ids"] for b in blocks] == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2]]
    assert (stats.tokens_in, stats.tokens_kept, stats.tokens_dropped) == (14, 10, 4)


def test_none_mode_pads_and_masks_labels():
    stats = PackingStats()
    samples = list(pack_documents([[1, 2, 3], [4, 5, 6, 7, 8, 9]], 5, "none", EOS, stats))
    batch = PretrainCollator(151643, "sdpa")(samples)
    assert batch["input_ids"].tolist() == [[1, 2, 3, EOS, 151643], [4, 5, 6, 7, 8]]
    assert batch["labels"].tolist() == [[1, 2, 3, EOS, -100], [4, 5, 6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert (stats.tokens_dropped, stats.padding_tokens) == (2, 1)


def test_workers_do_not_inherit_the_parents_sigterm_handler(tmp_path, split_corpus):
    """Pool ends its workers with SIGTERM. Forked from a process with a SIGTERM handler (a training run's, an
    earlier test's) they must not keep it, or they ignore it and the preparation waits for them forever (it did,
    depending on timing). Each work unit records the SIGTERM disposition its worker has."""
    import signal

    import pyarrow as pa

    from utils.prepare import Preparation

    def shape(record, stats):
        stats.counts[str(signal.getsignal(signal.SIGTERM))] += 1
        return {"n": len(record["text"])}

    preparation = Preparation("pt", split_corpus, {"test": "sigterm"}, shape, pa.schema([("n", pa.int64())]),
                              Features({"n": Value("int64")}), unit_bytes=4096)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        _, report = prepare_or_load(preparation, str(tmp_path), 2, world_size=1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert report["counts"] == {str(signal.SIG_DFL): len(load_records(split_corpus, "pt")[0])}
