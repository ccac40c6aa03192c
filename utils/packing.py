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

import dataclasses
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch
from datasets import Features, List, Value

from utils.errors import ConfigError

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


def _list_array(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))


class BlockPacker:
    """Packs batches of tokenized documents (an Arrow list<int32> column, in data order) into samples.

    Vectorised with numpy: the end-of-document token is inserted, the stream is cut at multiples of block_size, and
    in document mode each token's position is its distance from the later of its document's start and its block's
    start. What does not fill a block is carried to the next batch, so batch and shard boundaries change nothing.
    """

    def __init__(self, block_size: int, mode: str, eos_token_id: int):
        if mode not in PACKING_MODES:
            raise ConfigError(f"packing must be one of {PACKING_MODES}, got {mode!r}")
        self.block_size, self.mode, self.eos = block_size, mode, eos_token_id
        self.stats = PackingStats()
        self.carry = np.empty(0, dtype=np.int32)
        self.carry_starts = np.empty(0, dtype=np.int64)  # where documents begin in `carry`

    def add(self, documents: pa.ListArray) -> pa.Table | None:
        documents = documents.combine_chunks() if isinstance(documents, pa.ChunkedArray) else documents
        offsets = documents.offsets.to_numpy().astype(np.int64)
        values = documents.values.to_numpy()[offsets[0]:offsets[-1]]
        lengths = np.diff(offsets)
        count = len(lengths)
        # The stream with <|im_end|> after every document; starts[i] is where document i begins in it.
        starts = offsets[:-1] - offsets[0] + np.arange(count)
        ends = starts + lengths
        stream = np.empty(values.size + count, dtype=np.int32)
        is_text = np.ones(stream.size, dtype=bool)
        is_text[ends] = False
        stream[is_text] = values
        stream[ends] = self.eos
        stats, block = self.stats, self.block_size
        stats.documents += count
        stats.tokens_in += int(stream.size)
        if self.mode == "none":
            kept = np.minimum(lengths + 1, block)
            document_of = np.repeat(np.arange(count), lengths + 1)
            keep = np.arange(stream.size) - starts[document_of] < block
            stats.tokens_kept += int(kept.sum())
            stats.tokens_dropped += int(stream.size - kept.sum())
            stats.padding_tokens += int((block - kept).sum())
            stats.samples += count
            return pa.table({"input_ids": _list_array(stream[keep], kept)}) if count else None
        buffer = np.concatenate([self.carry, stream])
        buffer_starts = np.concatenate([self.carry_starts, starts + self.carry.size])
        full = buffer.size // block
        used = full * block
        self.carry = buffer[used:].copy()
        self.carry_starts = buffer_starts[buffer_starts >= used] - used
        if not full:
            return None
        stats.tokens_kept += used
        stats.samples += full
        columns = {"input_ids": _list_array(buffer[:used], np.full(full, block))}
        if self.mode == "document":
            # Positions restart at every document start; a document cut by the block edge restarts at 0 in the next
            # block, like a document of its own. The carry begins at a block edge, so 0 counts as a start.
            index = np.arange(used)
            document_starts = np.concatenate([[0], buffer_starts[buffer_starts < used]])
            document_start = document_starts[np.searchsorted(document_starts, index, side="right") - 1]
            positions = index - np.maximum(document_start, index - index % block)
            columns["position_ids"] = _list_array(positions.astype(np.int32), np.full(full, block))
        return pa.table(columns)

    def finish(self) -> None:
        """The final partial block is dropped (and counted)."""
        self.stats.tokens_dropped += int(self.carry.size)
        self.carry = np.empty(0, dtype=np.int32)


def pack_documents(documents: list[list[int]], block_size: int, mode: str, eos_token_id: int,
                   stats: PackingStats | None = None) -> list[dict]:
    """Samples from a list of token-id lists in one go (tests, inspection); the stage streams via BlockPacker."""
    packer = BlockPacker(block_size, mode, eos_token_id)
    table = packer.add(pa.array(documents, type=pa.list_(pa.int32())))
    packer.finish()
    if stats is not None:
        stats.__dict__.update(packer.stats.__dict__)
    return table.to_pylist() if table is not None else []


def document_attention_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4D mask (batch, 1, seq, seq) that is causal and block-diagonal over documents, documents being the runs
    where position_ids count up from 0: boolean (True = may attend) for sdpa, additive for eager attention.
    Used where flash-attention varlen is not available. A coupling with transformers' masking: it infers such a
    mask from position_ids itself only when no cache exists, and Qwen2 builds a cache on every forward while
    use_cache is on (the default, in training too), so position_ids alone would let one document attend to another.
    tests/test_fa2_paths.py checks that rule, and that every backend keeps documents apart through this mask."""
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


def pretraining_preparation(files: list[str], tokenizer, block_size: int, mode: str,
                            min_quality_score: float | None, key: dict):
    """The PT data step for utils.prepare: workers tokenize documents (quality filter first); the main process
    packs them in data order."""
    from utils.files import SkipRecord
    from utils.prepare import Preparation
    from utils.tokenizer import pretraining_encoder

    encode = pretraining_encoder(tokenizer, threads=1)

    def shape(record, stats):
        score = record.get("quality_score")
        if min_quality_score is not None and score is not None and score < min_quality_score:
            raise SkipRecord(f"quality_score below {min_quality_score}")
        ids = encode([record["text"]])[0]
        stats.tokens += len(ids)
        return {"ids": ids}

    def assemble(tables, report):
        packer = BlockPacker(block_size, mode, tokenizer.eos_token_id)
        for table in tables:
            packed = packer.add(table.column("ids"))
            if packed is not None:
                yield packed
        packer.finish()
        report["packing"] = packer.stats.to_dict()
        if not packer.stats.samples:
            report["no_rows_hint"] = (
                f"{packer.stats.documents} documents with {packer.stats.tokens_in} tokens (end-of-document tokens "
                f"included) do not fill one block of block_size={block_size}: use more data or a smaller "
                "--block_size, or --packing none (one padded sample per document)")

    return Preparation("pt", files, key, shape, pa.schema([("ids", pa.list_(pa.int32()))]), sample_features(mode),
                       assemble)


class PretrainCollator:
    """Batches of packing samples. `none`: right-padded, padding masked out of attention and loss. `document`:
    attention kept inside each document (flash-attention varlen gets the documents' boundaries as cu_seq_lens; other
    backends get the 4D block-diagonal mask), and no document's first token is predicted from the previous document.
    """

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
            if self.varlen_attention:
                # transformers infers packing from position_ids only for a batch of one row (_is_packed_sequence);
                # with more rows each row would attend across its documents. Boundaries over the flattened batch
                # (every row starts a document, so row edges are among them) take its varlen path at any batch size,
                # as TRL's padding-free batches do; max_length an int, as flash-attn's kernel wants.
                starts = (position_ids.flatten() == 0).nonzero().flatten()
                cu_seq_lens = torch.cat([starts, torch.tensor([position_ids.numel()])]).to(torch.int32)
                batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu_seq_lens
                batch["max_length_q"] = batch["max_length_k"] = int(cu_seq_lens.diff().max())
            else:
                batch["attention_mask"] = document_attention_mask(position_ids, self.mask_dtype)
        elif not bool(attention_mask.all()):
            batch["attention_mask"] = attention_mask
        return batch


class DocumentMaskCollator:
    """Wraps TRL's SFT collator, which for `packing` / `padding_free` flattens the whole micro-batch into one row of
    samples told apart by position_ids. flash-attention varlen isolates them from TRL's cu_seq_lens. sdpa and eager
    would need a mask over that flat row: (micro-batch x max_length)^2, 151 MB for 12 x 1024, built every
    micro-batch, at twice the attention FLOPs of separate rows. So for those backends the batch is made a row per
    packed row instead (TRL's own collator with padding_free off): padding-free conversations become an ordinary
    padded batch with its 2D mask, and packed rows get a block-diagonal mask per row, (micro-batch, 1, L, L). The
    few padding positions at the end of a short packed row are documents of their own (position 0), never attended
    to by the samples, and untrained."""

    def __init__(self, collator, attn_implementation: str):
        self.collator = collator
        self.attn_implementation = attn_implementation
        self.per_row = dataclasses.replace(collator, padding_free=False)

    def __call__(self, examples):
        if self.attn_implementation == "flash_attention_2":
            return self.collator(examples)
        packed = "seq_lengths" in examples[0]
        self.per_row.return_position_ids = packed
        batch = self.per_row(examples)
        if packed:
            position_ids = batch["position_ids"]
            batch["labels"][position_ids == 0] = -100  # no sample's first token is predicted from the one before
            dtype = torch.bool if self.attn_implementation == "sdpa" else torch.float32
            batch["attention_mask"] = document_attention_mask(position_ids, dtype)
        return batch
