"""Every batch shape the stages train on keeps its sequences apart, under each attention backend.

flash_attention_2 runs through transformers' real dispatch with plain-torch kernels (tests/flash_attn_standin.py),
so its packed-sequence detection, unpadding and cu_seq_lens handling are what is tested; sdpa and eager get the same
assertions. The reference is always the same sequence run alone (batch of one, no padding, no packing)."""

import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CONFIG
from flash_attn_standin import flash_attn_standin
from utils.modeling import build_model
from utils.packing import DocumentMaskCollator, PretrainCollator, pack_documents

BACKENDS = ["flash_attention_2", "sdpa", "eager"]
BLOCK = 32
TEXTS = [  # real text of varied lengths, so that a 32-token block holds several documents and cuts some
    "The quick brown fox jumps over the lazy dog.",
    "Packing puts several short documents into one training row.",
    "北京是中国的首都，也是一座历史悠久的城市。",
    "Hello!",
    "Attention must not cross from one document into the next, or the model learns from text it will never see "
    "together at inference time.",
    "旅游业是许多地区的重要经济来源。",
    "Water boils at 100 degrees Celsius at sea level.",
    "def add(a, b):\n    return a + b",
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend name; for flash_attention_2 the stand-in is installed for the test and removed after it."""
    if request.param != "flash_attention_2":
        yield request.param, None
        return
    with flash_attn_standin() as calls:
        yield request.param, calls


def tiny_model(attention: str):
    """The tiny GQA config (64 hidden, 2 layers, 4 heads / 2 kv heads), fp32, seeded: the same weights each time."""
    return build_model(str(TINY_CONFIG), None, attention, seed=0).eval()


def encode(tokenizer, texts=TEXTS) -> list[list[int]]:
    from utils.tokenizer import pretraining_encoder

    return pretraining_encoder(tokenizer, threads=1)(texts)


def segments(positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of a row's positions that counts up from 0: a document, or the piece of one."""
    starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
    return list(zip(starts, starts[1:]))


def alone(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids)[None], use_cache=False).logits[0]


def assert_kernel_used(calls, kernel: str):
    """Under the stand-in, the kernel that must have run did: no silent fallback to another path."""
    if calls is not None:
        assert calls[kernel] > 0, dict(calls)


def test_standin_equals_sdpa_on_one_document_and_leaves_nothing_behind(tokenizer):
    import transformers.modeling_flash_attention_utils as fa_utils

    ids = torch.tensor([sum(encode(tokenizer, TEXTS[:3]), [])])
    with torch.no_grad():
        reference = tiny_model("sdpa")(input_ids=ids, use_cache=False).logits
        with flash_attn_standin() as calls:
            logits = tiny_model("flash_attention_2")(input_ids=ids, use_cache=False).logits
            assert calls["flash_attn_func"] == 2 and not calls["flash_attn_varlen_func"]  # one call per layer
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    assert "flash_attn" not in sys.modules and fa_utils._loaded_implementation != "flash_attention_2"
    assert fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]["general_availability_check"] is \
           fa_utils.is_flash_attn_2_available


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_pt_document_rows_equal_each_document_alone(tokenizer, backend, training):
    """Micro-batch of several rows (transformers infers packing from position_ids only for one row): each document,
    and each piece of one cut by a block edge, gets the logits it gets alone; the loss is the mean over the same
    targets, none of them a document's first token predicted from the previous document."""
    attention, calls = backend
    model = tiny_model(attention)
    samples = pack_documents(encode(tokenizer), BLOCK, "document", tokenizer.eos_token_id)
    batch = PretrainCollator(tokenizer.pad_token_id, attention)(samples)
    rows = [segments(p) for p in batch["position_ids"]]
    assert len(rows) >= 2 and min(len(r) for r in rows) >= 2  # the case that broke: several rows, several documents
    model.train(training)  # the config's dropout is 0: train and eval must agree
    with torch.set_grad_enabled(training):
        out = model(**batch)  # as the Trainer calls it: the model's default use_cache, a cache built
    logits, targets = [], []
    for row, row_segments in enumerate(rows):
        for start, end in row_segments:
            ids = batch["input_ids"][row, start:end]
            expected = alone(model, ids)
            torch.testing.assert_close(out.logits[row, start:end], expected, atol=1e-4, rtol=1e-4)
            logits.append(expected[:-1])
            targets.append(ids[1:])
            if start:
                assert batch["labels"][row, start] == -100
            assert torch.equal(batch["labels"][row, start + 1:end], ids[1:])
    torch.testing.assert_close(out.loss, F.cross_entropy(torch.cat(logits), torch.cat(targets)), atol=1e-5,
                               rtol=1e-5)
    if training:
        out.loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert_kernel_used(calls, "flash_attn_varlen_func")


def test_pt_none_padded_rows_equal_each_row_alone(tokenizer, backend):
    attention, calls = backend
    model = tiny_model(attention)
    samples = pack_documents(encode(tokenizer), BLOCK, "none", tokenizer.eos_token_id)
    batch = PretrainCollator(tokenizer.pad_token_id, attention)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert len(set(lengths)) > 2 and "attention_mask" in batch
    with torch.no_grad():
        logits = model(**batch).logits
    for row, sample in enumerate(samples):
        torch.testing.assert_close(logits[row, :lengths[row]], alone(model, sample["input_ids"]), atol=1e-4,
                                   rtol=1e-4)
        assert (batch["labels"][row, lengths[row]:] == -100).all()
    assert_kernel_used(calls, "flash_attn_varlen_func")  # unpadded by attention_mask


def test_pt_concat_rows_are_plain_causal_blocks(tokenizer, backend):
    """Cross-document attention is intended here: each row is one causal sequence, every token a label."""
    attention, calls = backend
    model = tiny_model(attention)
    samples = pack_documents(encode(tokenizer), BLOCK, "concat", tokenizer.eos_token_id)
    batch = PretrainCollator(tokenizer.pad_token_id, attention)(samples)
    assert len(samples) >= 2 and set(batch) == {"input_ids", "labels"}
    assert torch.equal(batch["labels"], batch["input_ids"])
    with torch.no_grad():
        logits = model(**batch).logits
    for row, sample in enumerate(samples):
        torch.testing.assert_close(logits[row], alone(model, sample["input_ids"]), atol=1e-4, rtol=1e-4)
    assert_kernel_used(calls, "flash_attn_func")


def sft_samples(tokenizer) -> list[dict]:
    """Chat-formatted samples, the prompt masked out of the labels as the SFT stage does."""
    samples = []
    for question, answer in zip(TEXTS, TEXTS[1:] + TEXTS[:1]):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        ids = tokenizer(prompt + answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        prompt_length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        samples.append({"input_ids": ids, "labels": [-100] * prompt_length + ids[prompt_length:]})
    return samples


def test_sft_packed_padding_free_samples_equal_each_sample_alone(tokenizer, backend):
    """TRL's packing (best-fit decreasing) into rows of several samples, batched by TRL's padding-free collator
    (one flat row plus cu_seq_lens) through the stage's DocumentMaskCollator (a row per packed row, each with its
    block-diagonal mask, for sdpa and eager)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    attention, calls = backend
    model = tiny_model(attention)
    samples = sft_samples(tokenizer)
    packed = [row for row in pack_dataset(Dataset.from_list(samples), 64, "bfd").to_list()
              if len(row["seq_lengths"]) >= 2][:2]
    assert len(packed) == 2
    collator = DocumentMaskCollator(DataCollatorForLanguageModeling(tokenizer.pad_token_id, padding_free=True),
                                    attention)
    batch = collator(packed)
    # flash-attention: one flat row (TRL's cu_seq_lens); sdpa and eager: a row per packed row, each with its own mask
    assert batch["input_ids"].shape[0] == (1 if attention == "flash_attention_2" else len(packed))
    with torch.no_grad():
        logits = model(**batch).logits
    by_ids = {tuple(s["input_ids"]): s for s in samples}
    found = 0
    for row in range(batch["input_ids"].shape[0]):
        for start, end in segments(batch["position_ids"][row]):
            ids = batch["input_ids"][row, start:end].tolist()
            if ids == [tokenizer.pad_token_id]:  # the end of a shorter packed row: padding, untrained
                assert batch["labels"][row, start] == -100
                continue
            assert tuple(ids) in by_ids  # whole samples, none cut
            torch.testing.assert_close(logits[row, start:end], alone(model, ids), atol=1e-4, rtol=1e-4)
            assert batch["labels"][row, start] == -100
            found += 1
    assert found == sum(len(row["seq_lengths"]) for row in packed)
    assert_kernel_used(calls, "flash_attn_varlen_func")


def test_dpo_right_padded_rows_equal_each_row_alone(tokenizer, backend):
    """TRL's preference collator: chosen and rejected rows of different lengths, right-padded, with a 2D mask."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    attention, calls = backend
    model = tiny_model(attention)
    ids = encode(tokenizer)
    examples = [{"prompt_ids": ids[0], "chosen_ids": ids[1], "rejected_ids": ids[3]},
                {"prompt_ids": ids[5], "chosen_ids": ids[6], "rejected_ids": ids[4]}]
    batch = DataCollatorForPreference(tokenizer.pad_token_id)(examples)
    lengths = batch["attention_mask"].sum(-1).tolist()
    assert len(set(lengths)) >= 3  # padding in most rows
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for row, length in enumerate(lengths):
        torch.testing.assert_close(logits[row, :length], alone(model, batch["input_ids"][row, :length]), atol=1e-4,
                                   rtol=1e-4)
    assert_kernel_used(calls, "flash_attn_varlen_func")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_transformers_own_packed_mask_is_off_in_training_so_the_collators_build_theirs(tokenizer, attention):
    """The coupling behind utils/packing.py's document_attention_mask: transformers infers a block-diagonal mask from
    position_ids only when no cache exists, and Qwen2 builds one on every forward while use_cache is on (the
    default, in training too). So without the collators' own masks packed documents would see each other. When
    this fails (transformers changed that rule), the hand-built masks may go: the tests above guard the behaviour."""
    model = tiny_model(attention).train()
    samples = pack_documents(encode(tokenizer), BLOCK, "document", tokenizer.eos_token_id)
    batch = PretrainCollator(tokenizer.pad_token_id, attention)(samples[:1])
    (start, end), *_ = [(s, e) for s, e in segments(batch["position_ids"][0]) if s > 0]
    ids = batch["input_ids"][0, start:end]
    without_mask = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, start:end]
    assert not torch.allclose(without_mask, alone(model, ids), atol=1e-4)  # the second document saw the first
    with_mask = model(**batch).logits[0, start:end]
    torch.testing.assert_close(with_mask, alone(model, ids), atol=1e-4, rtol=1e-4)
