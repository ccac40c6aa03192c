"""Packing modes keep every token they claim to; document mode isolates documents exactly."""

import pytest
import torch

from conftest import REFERENCE, TINY_CONFIG
from utils.data import resolve_data_files
from utils.modeling import build_model
from utils.packing import PackingStats, PretrainCollator, pack_documents, pretraining_samples

EOS = 151645


@pytest.mark.parametrize("mode", ["concat", "document", "none"])
def test_every_token_is_kept_or_reported_dropped(tokenizer, mode):
    files = resolve_data_files([str(REFERENCE / "mini_data" / "pt")])
    report = {}
    samples = list(pretraining_samples(files, tokenizer, 64, mode, report))
    stats = report["packing"]
    assert stats["documents"] == 200
    assert stats["tokens_in"] == stats["tokens_kept"] + stats["tokens_dropped"]
    assert sum(len(s["input_ids"]) for s in samples) == stats["tokens_kept"]
    assert len(samples) == stats["samples"]
    if mode == "none":
        assert stats["padding_tokens"] == 64 * len(samples) - stats["tokens_kept"]
    else:
        assert stats["tokens_dropped"] < 64  # only the final partial block, not a tail per batch
        assert stats["padding_fraction"] == 0


def test_concat_carries_remainders_across_tokenizer_batches(tokenizer):
    files = resolve_data_files([str(REFERENCE / "mini_data" / "pt")])
    big_batches, small_batches = {}, {}
    a = list(pretraining_samples(files, tokenizer, 64, "concat", big_batches, tokenize_batch=1000))
    b = list(pretraining_samples(files, tokenizer, 64, "concat", small_batches, tokenize_batch=7))
    assert a == b and big_batches == small_batches


def test_document_positions_restart_at_each_boundary():
    stats = PackingStats()
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]]  # with EOS: 4 + 3 + 7 = 14 tokens
    blocks = list(pack_documents(docs, 5, "document", EOS, stats))
    assert [b["input_ids"] for b in blocks] == [[1, 2, 3, EOS, 4], [5, EOS, 6, 7, 8]]
    assert [b["position_ids"] for b in blocks] == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2]]
    assert (stats.tokens_in, stats.tokens_kept, stats.tokens_dropped) == (14, 10, 4)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_document_mode_logits_equal_each_document_alone(attention):
    torch.manual_seed(0)
    model = build_model(str(TINY_CONFIG), None, attention).eval()
    docs = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34, 35, 36, 37]]
    stats = PackingStats()
    (block,) = list(pack_documents(docs, 18, "document", EOS, stats))
    batch = PretrainCollator(151643, attention)([block])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"]).logits[0]
        start = 0
        for doc in docs:
            ids = torch.tensor([doc + [EOS]])
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(packed[start:start + ids.shape[1]], alone, atol=1e-4, rtol=1e-4)
            start += ids.shape[1]
        # Without the mask the second document would see the first: the test can tell the difference.
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        assert not torch.allclose(leaky[6:9], packed[6:9], atol=1e-4)
    # No document's first token is a target predicted from the previous document.
    assert batch["labels"][0, 6].item() == -100 and batch["labels"][0, 10].item() == -100


def test_none_mode_pads_and_masks_labels():
    stats = PackingStats()
    samples = list(pack_documents([[1, 2, 3], [4, 5, 6, 7, 8, 9]], 5, "none", EOS, stats))
    batch = PretrainCollator(151643, "sdpa")(samples)
    assert batch["input_ids"].tolist() == [[1, 2, 3, EOS, 151643], [4, 5, 6, 7, 8]]
    assert batch["labels"].tolist() == [[1, 2, 3, EOS, -100], [4, 5, 6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert (stats.tokens_dropped, stats.padding_tokens) == (2, 1)
