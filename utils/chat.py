"""Conversation shaping for SFT and DPO: which turns to train, system prompts, and fitting a sample into max_length.

The chat template itself is utils/chat_template.jinja (loaded with the tokenizer).
"""

import random

from transformers import PreTrainedTokenizerBase

from utils.data import SkipRecord

DEFAULT_SYSTEM_PROMPT = "You are mini_qwen, a helpful assistant that answers in the user's language."

# Seed 000's advice: a role per kind of task. Keys are Infinity-Instruct `label.cate_ability_en` values.
CATEGORY_SYSTEM_PROMPTS = {
    "mathematical ability": "You are a careful mathematics tutor. Reason step by step and state the final answer.",
    "programming and software development": "You are an experienced software engineer. Give correct, runnable code "
    "and explain it briefly.",
    "logic and reasoning": "You are a rigorous logician. Lay out your reasoning clearly before concluding.",
    "creativity and design": "You are a creative writer. Write vividly and originally.",
    "linguistic knowledge, multilingual and multicultural understanding": "You are a linguist and translator, "
    "precise about meaning and tone in every language.",
    "information processing and integration": "You are a meticulous analyst. Summarise and organise information "
    "faithfully.",
    "natural language processing and understanding": "You are a language expert. Read closely and answer "
    "precisely.",
    "life knowledge and skills": "You are a practical, friendly advisor for everyday life.",
    "stem knowledge": "You are a science teacher who explains clearly and accurately.",
    "humanities, history, philosophy, and sociology knowledge": "You are a knowledgeable historian and "
    "philosopher.",
}

SYSTEM_PROMPT_STRATEGIES = ("none", "uniform", "mixed")
TURN_MODES = ("all", "first")


def select_turns(messages: list[dict], turns: str) -> list[dict]:
    """`all`: every exchange is kept (and every assistant turn trained); `first`: only the first exchange."""
    if turns not in TURN_MODES:
        raise ValueError(f"turns must be one of {TURN_MODES}, got {turns!r}")
    if turns == "all":
        return messages
    offset = 1 if messages[0]["role"] == "system" else 0
    return messages[: offset + 2]


def add_system_prompt(
    messages: list[dict], category: str, strategy: str, rng: random.Random, default_prompt: str = DEFAULT_SYSTEM_PROMPT
) -> list[dict]:
    """`none`: as the data has it; `uniform`: one default prompt for every sample; `mixed`: half the samples get the
    default, half a prompt chosen by the sample's category (seed 000: this generalises role-play better).
    A system prompt already in the data is kept."""
    if strategy not in SYSTEM_PROMPT_STRATEGIES:
        raise ValueError(f"system_prompt_strategy must be one of {SYSTEM_PROMPT_STRATEGIES}, got {strategy!r}")
    if strategy == "none" or messages[0]["role"] == "system":
        return messages
    prompt = default_prompt
    if strategy == "mixed" and rng.random() >= 0.5:
        prompt = CATEGORY_SYSTEM_PROMPTS.get(category.lower(), default_prompt)
    return [{"role": "system", "content": prompt}] + messages


def fill_identity(messages: list[dict], name: str, author: str) -> list[dict]:
    """Identity data is written with {{name}} / {{author}} placeholders, so the model learns who it is instead of
    claiming to be someone else's (the original's model said OpenAI created it)."""
    return [{**m, "content": m["content"].replace("{{name}}", name).replace("{{author}}", author)} for m in messages]


def count_tokens(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _shorten_middle(text: str, keep_tokens: int, tokenizer: PreTrainedTokenizerBase) -> str:
    """Keep the beginning and the end of `text` (where instructions and questions usually are) in about
    `keep_tokens` tokens, marking the cut."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    head = keep_tokens // 2
    tail = keep_tokens - head
    return tokenizer.decode(ids[:head]) + "\n…\n" + tokenizer.decode(ids[len(ids) - tail :] if tail else [])


def fit_to_length(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int, min_prompt_tokens: int = 32
) -> tuple[list[dict], str | None]:
    """Make a conversation fit `max_length` tokens without ever cutting an answer away.

    Drops the oldest exchanges first (left truncation of history). If one exchange is still too long, shortens its
    prompt. Returns (messages, what was done or None); raises SkipRecord when even the last answer with a minimal
    prompt does not fit.
    """
    if count_tokens(messages, tokenizer) <= max_length:
        return messages, None
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    while len(turns) > 2 and count_tokens(system + turns, tokenizer) > max_length:
        turns = turns[2:]
    if count_tokens(system + turns, tokenizer) <= max_length:
        return system + turns, "dropped oldest turns"
    user, answer = turns
    overhead = count_tokens(system + [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}], tokenizer)
    answer_tokens = len(tokenizer(answer["content"], add_special_tokens=False).input_ids)
    prompt_tokens = len(tokenizer(user["content"], add_special_tokens=False).input_ids)
    room_for_prompt = max_length - overhead - answer_tokens - 4  # 4: the "\n…\n" mark and merges at the cut
    if room_for_prompt < min(min_prompt_tokens, prompt_tokens):
        raise SkipRecord("answer alone is longer than max_length")
    while room_for_prompt > 0:
        shortened = system + [{"role": "user", "content": _shorten_middle(user["content"], room_for_prompt, tokenizer)}, answer]
        if count_tokens(shortened, tokenizer) <= max_length:
            return shortened, "prompt shortened"
        room_for_prompt -= 8
    raise SkipRecord("answer alone is longer than max_length")
