"""Preference data as conversations, shared by the DPO stage's methods that tokenize for themselves (ORPO, SimPO,
KTO) and by the reward-model stage: normalised pairs (or KTO's unpaired replies) → prompt / chosen / rejected (or
completion / label) message lists, and a held-out share of them."""

import random

import pyarrow as pa
from datasets import Features, List, Value

from utils.errors import ConfigError
from utils.files import SkipRecord
from utils.prepare import Preparation

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
MESSAGES_FEATURE = List({"role": Value("string"), "content": Value("string")})


def preference_conversations(files, tokenizer, key, max_prompt_length: int, unpaired: bool = False,
                             max_length: int | None = None) -> Preparation:
    """Rows whose prompt fits `max_prompt_length` tokens (so that none loses its answer to truncation), counted out
    otherwise. With `max_length`, a pair whose prompt + answer does not fit is counted out too: RewardTrainer would
    drop it without a count."""

    def tokens(messages, **kwargs) -> int:
        return len(tokenizer.apply_chat_template(messages, return_dict=True, **kwargs)["input_ids"])

    def shape(row, stats):
        length = tokens(row["prompt"], add_generation_prompt=True)
        if length > max_prompt_length:
            raise SkipRecord(f"prompt longer than max_prompt_length={max_prompt_length}")
        if max_length and max(tokens(row["prompt"] + row[side]) for side in ("chosen", "rejected")) > max_length:
            raise SkipRecord(f"prompt + answer longer than max_length={max_length}")
        stats.tokens += length
        return row

    answers = ("completion",) if unpaired else ("chosen", "rejected")
    columns = [("prompt", MESSAGES), *((column, MESSAGES) for column in answers)] + ([("label", pa.bool_())] * unpaired)
    features = {"prompt": MESSAGES_FEATURE, **{column: MESSAGES_FEATURE for column in answers}}
    if unpaired:
        features["label"] = Value("bool")
    return Preparation("kto" if unpaired else "dpo", files, key, shape, pa.schema(columns), Features(features))


def hold_out(dataset, fraction: float, seed: int):
    """(train, held-out) rows: a seeded random share `fraction` of them, at least one."""
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    count = max(1, round(fraction * len(order)))
    if count >= len(order):
        raise ConfigError(f"heldout_fraction={fraction} leaves no pairs to train on ({len(order)} in all)")
    return dataset.select(sorted(order[count:])), dataset.select(sorted(order[:count]))
