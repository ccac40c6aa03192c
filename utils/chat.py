"""Conversation shaping for SFT and DPO: which turns to train, system prompts, and fitting a sample into max_length;
and the way back, a generated reply split into its reasoning, its text and its tool calls (the server, the chat).

The chat template itself is utils/chat_template.jinja (loaded with the tokenizer); check_template_matches proves on
start that it and ChatTokens still write the same tokens.
"""

import json
import random
import re
import uuid

from transformers import PreTrainedTokenizerBase

from utils.errors import ConfigError
from utils.files import SkipRecord
from utils.formats import normalize_sft, reasoning_length

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


# A conversation with every part the template and ChatTokens must agree on: tools in the system turn, reasoning
# before a call with no text, a tool result, reasoning before an answer, a second exchange.
TEMPLATE_PROBE = {
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                                "parameters": {"type": "object", "properties": {
                                                    "city": {"type": "string"}}, "required": ["city"]}}}],
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Umbrella in Paris today?"},
        {"role": "assistant", "content": None, "reasoning_content": "Check the weather in Paris.",
         "tool_calls": [{"id": "call_0", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": '{"condition": "rain", "temperature": 14}'},
        {"role": "assistant", "reasoning_content": "Rain: yes.", "content": "Yes, it is raining (14°C)."},
        {"role": "user", "content": "谢谢！"},
        {"role": "assistant", "content": "不客气。"},
    ],
}


def check_template_matches(tokenizer: PreTrainedTokenizerBase, chat: ChatTokens | None = None) -> None:
    """Render TEMPLATE_PROBE with the tokenizer's chat template (ids and assistant mask) and encode the same
    conversation as utils/formats.py normalises it with ChatTokens (ids and labels); raise ConfigError when they
    differ. Training writes ChatTokens' tokens and the checkpoint keeps the template for inference: a change to
    one alone would serve prompts the model never saw in training, silently."""
    chat = chat or ChatTokens(tokenizer)
    messages = normalize_sft(TEMPLATE_PROBE)["messages"]
    ids, labels = chat.encode_bodies(messages, [chat.body(m) for m in messages])
    where = "the chat template (utils/chat_template.jinja) and ChatTokens (utils/chat.py)"
    try:
        rendered = tokenizer.apply_chat_template(TEMPLATE_PROBE["messages"], tools=TEMPLATE_PROBE["tools"],
                                                 return_dict=True, return_assistant_tokens_mask=True)
    except Exception as err:  # a template that no longer renders at all
        raise ConfigError(f"{where}: the template fails on the probe conversation: {err}") from err
    template_ids = rendered["input_ids"]
    template_labels = [i if trained else -100 for i, trained in zip(template_ids, rendered["assistant_masks"])]
    if ids == template_ids and labels == template_labels:
        return
    what, ours, theirs = ("ids", ids, template_ids) if ids != template_ids else \
        ("assistant masks", labels, template_labels)
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    context = template_ids[max(0, at - 4): at + 4]
    raise ConfigError(f"{where} disagree on a probe conversation: the {what} differ at token {at} (template text "
                      f"there: {tokenizer.decode(context)!r}); training would write what the saved template does not "
                      "render: change both together (tests/test_sft_masks.py checks them)")


THINK_OPEN, THINK_CLOSE, CALL_OPEN = "<think>", "</think>", "<tool_call>"
TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _tool_call(text: str) -> dict | None:
    """A <tool_call> block's JSON as an OpenAI tool call, or None unless it is {"name": ..., "arguments": {...}}
    as the training data writes calls (utils/formats.py)."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not (isinstance(call, dict) and isinstance(call.get("name"), str) and call["name"].strip()
            and isinstance(call.get("arguments"), dict)):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def _split_thinking(text: str) -> tuple[str, str, bool]:
    """(reasoning, the rest, whether the reasoning is closed) of a reply, read as utils/formats.py reads an
    answer's <think> block. An unclosed block (the reply was cut short while thinking) is all reasoning."""
    opened = text.lstrip()
    if not opened.startswith(THINK_OPEN):
        return "", text, True
    thought, closed, rest = opened[len(THINK_OPEN):].partition(THINK_CLOSE)
    return (thought.strip("\n") if thought.strip() else ""), rest.lstrip("\n"), bool(closed)


def parse_assistant_output(text: str) -> tuple[str, str, list[dict]]:
    """(reasoning, content, tool_calls) of a generated reply: a leading <think> block is the reasoning, each
    <tool_call> block holding a valid call an OpenAI tool call (content keeps the text around them, trailing
    whitespace trimmed); a block that does not parse stays in the content as written."""
    reasoning, content, _ = _split_thinking(text)
    calls = []

    def take(block: re.Match) -> str:
        call = _tool_call(block.group(1).strip())
        if call is None:
            return block.group(0)
        calls.append(call)
        return ""

    content = TOOL_CALL_BLOCK.sub(take, content)
    return reasoning, (content.rstrip() if calls else content), calls


def _held_back(text: str, tag: str) -> str:
    """`text` without a trailing start of `tag` (and the whitespace before it), which the next piece may finish."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return text[:-length].rstrip()
    return text.rstrip()


class AssistantStream:
    """parse_assistant_output while a reply streams in: `feed` each decoded piece and get the (reasoning, content)
    text that is now certain, `finish` for the rest and the tool calls. What is sent is always a prefix of what
    parse_assistant_output gives for the whole reply, so a streamed reply reads as the whole one: a possible start
    of <think>, </think> or <tool_call> is held until the next piece decides it, a tool call block until the end,
    and trailing whitespace until text follows it (a trimmed reply never takes back what was sent)."""

    def __init__(self):
        self.text, self.sent = "", ("", "")

    def feed(self, piece: str) -> tuple[str, str]:
        self.text += piece
        return self._advance(self._certain())

    def finish(self) -> tuple[str, str, list[dict]]:
        reasoning, content, calls = parse_assistant_output(self.text)
        return (*self._advance((reasoning, content)), calls)

    def _certain(self) -> tuple[str, str]:
        opened = self.text.lstrip()
        if THINK_OPEN.startswith(opened):  # nothing yet, or maybe the start of <think>
            return "", ""
        reasoning, content, closed = _split_thinking(self.text)
        if not closed:
            return _held_back(opened[len(THINK_OPEN):].lstrip("\n"), THINK_CLOSE), ""
        return reasoning, _held_back(content.partition(CALL_OPEN)[0], CALL_OPEN)

    def _advance(self, now: tuple[str, str]) -> tuple[str, str]:
        deltas = tuple(new[len(old):] for new, old in zip(now, self.sent))
        self.sent = now
        return deltas
