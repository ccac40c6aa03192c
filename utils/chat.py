"""Conversation shaping for SFT and DPO: which turns to train, system prompts, and fitting a sample into max_length.

The chat template itself is utils/chat_template.jinja (loaded with the tokenizer).
"""

import random

from transformers import PreTrainedTokenizerBase

from utils.data import SkipRecord, reasoning_length
from utils.errors import ConfigError

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
        raise ConfigError(f"turns must be one of {TURN_MODES}, got {turns!r}")
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
        raise ConfigError(f"system_prompt_strategy must be one of {SYSTEM_PROMPT_STRATEGIES}, got {strategy!r}")
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


class ChatTokens:
    """ChatML conversations to token ids and assistant-token masks, message by message, exactly as the chat template
    (utils/chat_template.jinja) renders and the tokenizer tokenizes them.

    Each message is `<|im_start|>` + tokens("{role}\n{content}") + `<|im_end|>` + tokens("\n"). The special tokens
    are hard boundaries for the tokenizer, so encoding the pieces gives the ids of encoding the whole text; the
    tests check it, ids and mask, against `apply_chat_template(..., return_assistant_tokens_mask=True)` on real
    conversations. Rendering the template per candidate length and tokenizing again (what fitting did before, and
    what TRL does once more) ran at ~250 conversations/s on one core; this encodes each message once.

    Message text is encoded as text: a literal "<|im_end|>" inside a message stays characters, never a control
    token (the template path would turn it into one).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        from utils.tokenizer import pretraining_encoder

        batch_encode = pretraining_encoder(tokenizer, threads=1)
        self.encode = lambda text: batch_encode([text])[0]
        self.im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.newline = self.encode("\n")
        self.cut_mark = self.encode("\n…\n")
        self.role_prefix = {role: self.encode(f"{role}\n") for role in ("system", "user", "assistant")}
        self.generation_prompt = [self.im_start, *self.role_prefix["assistant"]]

    def body(self, message: dict) -> list[int]:
        """Token ids of "{role}\n{content}", the part between <|im_start|> and <|im_end|>. An assistant's <think>
        block is encoded on its own, so that it ends on a token boundary whatever follows (its last characters,
        ">\n\n", end a pre-token anyway, so the ids are those of the whole text)."""
        text, head = f"{message['role']}\n{message['content']}", self.thinking(message)
        return self.encode(head) + self.encode(text[len(head):]) if head else self.encode(text)

    def thinking(self, message: dict) -> str:
        """"assistant\n<think>\n...\n</think>\n\n" when the message opens with reasoning, else ""."""
        length = reasoning_length(message["content"]) if message["role"] == "assistant" else 0
        return f"assistant\n{message['content'][:length]}" if length else ""

    def prefix_length(self, role: str, body: list[int]) -> int:
        """Tokens of `body` before the content: the role and its newline, unless the newline merged with the
        content's first characters (content starting with whitespace), in which case that token counts as content,
        as the template's character-based assistant mask counts it."""
        prefix = self.role_prefix[role]
        return len(prefix) if body[: len(prefix)] == prefix else len(prefix) - 1

    def message_length(self, body: list[int]) -> int:
        return len(body) + 2 + len(self.newline)

    def encode_bodies(self, messages: list[dict], bodies: list[list[int]], assistant_only: bool = True,
                      train_on_reasoning: bool = True) -> tuple[list[int], list[int]]:
        """(input_ids, labels): labels are the ids on assistant content and its <|im_end|> (or everywhere when
        `assistant_only` is off) and -100 elsewhere; without `train_on_reasoning`, -100 on <think> blocks too (the
        model reads its reasoning but learns only the answers and tool calls that follow it)."""
        ids, labels = [], []
        for message, body in zip(messages, bodies):
            piece = [self.im_start, *body, self.im_end, *self.newline]
            ids.extend(piece)
            if not assistant_only:
                trained_from, trained_to = 0, len(piece)
            elif message["role"] == "assistant":
                trained_from = 1 + self.prefix_length("assistant", body)
                trained_to = 2 + len(body)  # through <|im_end|>, not the newline after it
            else:
                trained_from = trained_to = 0
            piece_labels = [-100] * trained_from + piece[trained_from:trained_to] + [-100] * (len(piece) - trained_to)
            if not train_on_reasoning and (thinking := self.thinking(message)):
                start, end = 1 + len(self.role_prefix["assistant"]), 1 + len(self.encode(thinking))
                piece_labels[start:end] = [-100] * (end - start)
            labels.extend(piece_labels)
        return ids, labels

    def encode_conversation(self, messages: list[dict]) -> list[int]:
        return self.encode_bodies(messages, [self.body(m) for m in messages])[0]

    def count(self, messages: list[dict]) -> int:
        return sum(self.message_length(self.body(m)) for m in messages)

    def fit(self, messages: list[dict], max_length: int, min_prompt_tokens: int = 32
            ) -> tuple[list[dict], list[list[int]], str | None]:
        """Make a conversation fit `max_length` tokens without ever cutting an answer away.

        Drops the oldest exchanges first (left truncation of history). If one exchange is still too long, shortens
        its prompt in the middle (beginning and end kept, the cut marked with "\n…\n"), on token ids, to exactly
        the room left. Returns (messages, their bodies, what was done or None); raises SkipRecord when even the last
        answer with a minimal prompt does not fit.
        """
        bodies = [self.body(m) for m in messages]
        lengths = [self.message_length(b) for b in bodies]
        if sum(lengths) <= max_length:
            return messages, bodies, None
        first_turn = 1 if messages[0]["role"] == "system" else 0
        while len(messages) - first_turn > 2 and sum(lengths) > max_length:
            messages = messages[:first_turn] + messages[first_turn + 2:]
            bodies = bodies[:first_turn] + bodies[first_turn + 2:]
            lengths = lengths[:first_turn] + lengths[first_turn + 2:]
        if sum(lengths) <= max_length:
            return messages, bodies, "dropped oldest turns"
        user_body = bodies[first_turn]
        prefix = self.prefix_length("user", user_body)
        content = user_body[prefix:]
        others = sum(lengths) - lengths[first_turn]
        room = max_length - others - self.message_length(user_body[:prefix]) - len(self.cut_mark)
        if room < min(min_prompt_tokens, len(content)):
            raise SkipRecord("answer alone is longer than max_length")
        head = room // 2
        tail = room - head
        bodies[first_turn] = user_body[:prefix] + content[:head] + self.cut_mark + content[len(content) - tail:]
        return messages, bodies, "prompt shortened"
