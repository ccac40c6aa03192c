"""Pretraining samples from tokenized documents, in three modes.

- `concat` (the original's): every document gets `<|im_end|>` appended, all are concatenated and cut into blocks of
  `block_size`. The remainder is carried from one batch of documents to the next (the original dropped the tail of
  every 5,000-document map batch); only the final partial block is dropped, and it is reported.
- `document`: the same blocks, plus `position_ids` that restart at 0 where each document (or the piece of it that
  a block holds) begins. The collator turns them into attention that stays inside each document.
- `none`: one document per sample, truncated to `block_size`; the collator pads and masks the padding out of the
  loss. The truncated tokens are reported as dropped.

PackingStats adds up what went in and what came out: tokens_in == tokens_kept + tokens_dropped.
"""

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
from datasets import Features, List, Value

PACKING_MODES = ("concat", "document", "none")


def sample_features(mode: str) -> Features:
    """int32 token ids on disk, not the int64 Python ints would infer: half the cache for a 16B-token corpus
    (64 GB instead of 128 GB); the collator widens them to int64 per batch."""
    columns = {"input_ids": List(Value("int32"))}
    if mode == "document":
        columns["position_ids"] = List(Value("int32"))
    return Features(columns)


@dataclass
class PackingStats:
    documents: int = 0
    tokens_in: int = 0  # document tokens plus the appended end-of-document token
    tokens_kept: int = 0
    tokens_dropped: int = 0
    samples: int = 0
    padding_tokens: int = 0  # padding the `none` mode needs to fill every sample to block_size

    @property
    def padding_fraction(self) -> float:
        total = self.tokens_kept + self.padding_tokens
        return self.padding_tokens / total if total else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"padding_fraction": round(self.padding_fraction, 4)}

    def report(self, mode: str, block_size: int) -> str:
        return (
            f"packing={mode} block_size={block_size}: {self.documents} documents, {self.tokens_in} tokens in, "
            f"{self.samples} samples, {self.tokens_kept} tokens kept, {self.tokens_dropped} dropped, "
            f"padding fraction {self.padding_fraction:.1%}"
        )


def pack_documents(
    documents: Iterable[list[int]], block_size: int, mode: str, eos_token_id: int, stats: PackingStats
) -> Iterator[dict]:
    """Yield training samples ({"input_ids"} and, in document mode, {"position_ids"}) from token-id lists."""
    if mode not in PACKING_MODES:
        raise ValueError(f"packing must be one of {PACKING_MODES}, got {mode!r}")
    buffer: list[int] = []
    document_starts: list[int] = []  # where in `buffer` each document begins (document mode)
    for ids in documents:
        stats.documents += 1
        stats.tokens_in += len(ids) + 1
        if mode == "none":
            kept = (list(ids) + [eos_token_id])[:block_size]
            stats.tokens_kept += len(kept)
            stats.tokens_dropped += len(ids) + 1 - len(kept)
            stats.padding_tokens += block_size - len(kept)
            stats.samples += 1
            yield {"input_ids": kept}
            continue
        document_starts.append(len(buffer))
        buffer.extend(ids)
        buffer.append(eos_token_id)
        full_blocks = len(buffer) // block_size
        for block_index in range(full_blocks):
            start = block_index * block_size
            block = buffer[start : start + block_size]
            stats.tokens_kept += block_size
            stats.samples += 1
            if mode == "document":
                # Positions restart at every document start; a document cut by the block edge restarts at 0 in the
                # next block, like a document of its own.
                edges = [0] + [s - start for s in document_starts if start < s < start + block_size] + [block_size]
                positions = [p for begin, end in zip(edges, edges[1:]) for p in range(end - begin)]
                yield {"input_ids": block, "position_ids": positions}
            else:
                yield {"input_ids": block}
        if full_blocks:
            consumed = full_blocks * block_size
            del buffer[:consumed]
            document_starts = [s - consumed for s in document_starts if s >= consumed]
    stats.tokens_dropped += len(buffer)


def document_attention_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4D mask (batch, 1, seq, seq) that is causal and block-diagonal over documents, documents being the runs
    where position_ids count up from 0: boolean (True = may attend) for sdpa, additive for eager attention.
    Used where flash-attention varlen is not available: with sdpa or eager attention, position_ids alone do not
    stop one document attending to another."""
    starts = position_ids == 0
    document_index = torch.cumsum(starts.long(), dim=-1)
    same_document = document_index[:, :, None] == document_index[:, None, :]
    seq_len = position_ids.shape[-1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=position_ids.device).tril()
    allowed = same_document & causal
    if dtype == torch.bool:
        return allowed[:, None, :, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None, :, :]


def pretraining_samples(files: list[str], tokenizer, block_size: int, mode: str, report: dict,
                        min_quality_score: float | None = None, tokenize_batch: int = 1000) -> Iterator[dict]:
    """Read → normalise → (quality filter) → tokenize in batches → pack. Fills `report` with the skip counts and
    the packing statistics when the generator is exhausted."""
    from utils.data import SkipCounter, SkipRecord, iter_normalized
    from utils.tokenizer import pretraining_encoder

    counter = SkipCounter()
    stats = PackingStats()

    def quality_filter(record):
        score = record.get("quality_score")
        if min_quality_score is not None and score is not None and score < min_quality_score:
            raise SkipRecord(f"quality_score below {min_quality_score}")
        return record

    def token_lists():
        encode = pretraining_encoder(tokenizer)
        batch = []
        for record in iter_normalized(files, "pt", counter, quality_filter):
            batch.append(record["text"])
            if len(batch) == tokenize_batch:
                yield from encode(batch)
                batch = []
        if batch:
            yield from encode(batch)

    yield from pack_documents(token_lists(), block_size, mode, tokenizer.eos_token_id, stats)
    report.update(records=counter.to_dict(), packing=stats.to_dict())


class PretrainCollator:
    """Batches of packing samples. `none`: right-padded, padding masked out of attention and loss. `document`:
    attention kept inside each document (flash-attention varlen reads position_ids; other backends get the 4D
    block-diagonal mask), and no document's first token is predicted from the previous document."""

    def __init__(self, pad_token_id: int, attn_implementation: str):
        self.pad_token_id = pad_token_id
        self.varlen_attention = attn_implementation == "flash_attention_2"
        self.mask_dtype = torch.bool if attn_implementation == "sdpa" else torch.float32

    def __call__(self, samples: list[dict]) -> dict:
        longest = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            input_ids[row, : len(sample["input_ids"])] = torch.tensor(sample["input_ids"])
            attention_mask[row, : len(sample["input_ids"])] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        batch = {"input_ids": input_ids, "labels": labels}
        if "position_ids" in samples[0]:
            position_ids = torch.tensor([s["position_ids"] for s in samples], dtype=torch.long)
            labels[:, 1:][position_ids[:, 1:] == 0] = -100
            batch["position_ids"] = position_ids
            if not self.varlen_attention:
                batch["attention_mask"] = document_attention_mask(position_ids, self.mask_dtype)
        elif not bool(attention_mask.all()):
            batch["attention_mask"] = attention_mask
        return batch


class DocumentMaskCollator:
    """Wraps a padding-free / packing collator (TRL's) whose rows hold several samples told apart only by
    position_ids. flash-attention varlen isolates them from position_ids; sdpa and eager attention do not (a packed
    sample's logits then differ from the same sample alone), so for those backends this adds the 4D mask."""

    def __init__(self, collator, attn_implementation: str):
        self.collator = collator
        self.attn_implementation = attn_implementation

    def __call__(self, examples):
        batch = self.collator(examples)
        if self.attn_implementation != "flash_attention_2" and "position_ids" in batch:
            dtype = torch.bool if self.attn_implementation == "sdpa" else torch.float32
            batch["attention_mask"] = document_attention_mask(batch["position_ids"], dtype)
        return batch
