"""Record shapes: each raw record (utils/files.py reads them) normalised to what a stage needs.

Shapes understood, per stage kind:
- "pt": `text` (IndustryCorpus2, with or without its quality columns; c4), `content`, or a .txt line.
- "sft": `conversations: [{from, value}]` (Infinity-Instruct, ShareGPT), `messages: [{role, content}]`,
  `conversation: [{human, assistant}]` (Firefly/MOSS; XTuner's {input, output}), alpaca `instruction/input/output`,
  `prompt/response`, `prompt/completion`; each with optional `system` and `tools` columns.
- "dpo": `prompt` + `chosen`/`rejected` as strings, messages or message lists (Infinity-Preference; TRL), ShareGPT-style
  `conversations` + `chosen`/`rejected` {from, value} (LLaMA-Factory), `chosen_messages`/`rejected_messages`
  (whole conversations; the shared leading turns are the prompt), or `chosen`/`rejected` alone as
  "\n\nHuman: …\n\nAssistant: …" transcripts (Anthropic hh-rlhf).
Messages may hold typed text parts ([{"type": "text", "text"}]), tool calls and results (OpenAI `tool_calls` / `tool`,
LLaMA-Factory `function_call` / `observation` turns or `tool_call` parts) and reasoning (`reasoning_content`,
LLaMA-Factory `reasoning` parts, a <think> block opening the answer): all become plain ChatML text the way Qwen's
chat templates write them (<tool_call>, <tool_response>, <think> blocks; tools in the system message), so the roles stay
system/user/assistant. Message text is never parsed as JSON; a DPO prompt/chosen/rejected string is read as messages
only when it is the text of messages. KTO-style records (a true/false `label`) are skipped, in both stages.
- "kto": `prompt` + `completion` + `label` (true: a desirable reply), or `messages` + `label` (the last message is
  the reply); or any "dpo" shape, each pair giving its chosen answer as desirable and its rejected one as not.
- "grpo": GSM8K's `question` + `answer` (a solution ending in a line `#### <number>`, or the number alone), or
  GSM8K_zh's `question_zh` + `answer_only`.

Records that are readable but unusable are skipped and counted by reason (SkipCounter), and the counts are printed:
nothing disappears silently. A new shape is a function here: one raw record in, normalised records out.

Over 500 lines on purpose: the shapes of every stage share the message helpers (roles, typed parts, tool calls,
reasoning, system and tools), and one place for them keeps each shape a few lines.
"""

import ast
import json
from collections.abc import Iterator

from utils.files import SkipCounter, SkipRecord, iter_file_records, resolve_data_files
from utils.rewards import final_number, parse_number

ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "chatgpt": "assistant",
    "system": "system",
    # Tool use. These two roles never leave this module: tool results become user turns (_messages) and a
    # LLaMA-Factory `function_call` turn an assistant turn (_message), as Qwen2.5's template renders them.
    "tool": "tool", "observation": "tool", "function": "tool",
    "function_call": "function_call",
}


def _text(value, what: str) -> str:
    if value is None:
        raise SkipRecord(f"missing {what}")
    if not isinstance(value, str):
        raise SkipRecord(f"{what} is not a string")
    if not value.strip():
        raise SkipRecord(f"empty {what}")
    return value


def _maybe_literal(value):
    """Some exports store lists/structs as their Python or JSON text; accept both. Only for fields that are
    structures (message lists, `label`, `tools`, `tool_calls`, a `function_call` turn): message text never is."""
    if isinstance(value, str) and value[:1] in "[{":
        for parse in (json.loads, ast.literal_eval):
            try:
                return parse(value)
            except (ValueError, SyntaxError, RecursionError):
                continue
    return value


def _first(item: dict, *keys):
    """The value of the first of `keys` that has one: parquet gives every row every struct field, absent ones None."""
    return next((item[key] for key in keys if item.get(key) is not None), None)


def _is_message(value) -> bool:
    return isinstance(value, dict) and _first(value, "role", "from") is not None


def _message_structure(value):
    """A DPO prompt/chosen/rejected field: text, a message, or a list of messages, which some exports store as
    their JSON/Python text. Text is taken for messages only if it parses into messages, so an answer that merely
    looks like JSON ("[71, 269, 3]", '{"k": 1}') stays the answer."""
    parsed = _maybe_literal(value)
    items = parsed if isinstance(parsed, list) else [parsed]
    return parsed if items and all(map(_is_message, items)) else value


# Typed parts an assistant message may hold besides text (LLaMA-Factory's messages): its thinking, and a tool call
# as the JSON text of {name, arguments}.
ASSISTANT_PARTS = ("reasoning", "tool_call")


def _content_text(content, what: str, other_parts: tuple[str, ...] = ()) -> tuple[str | None, dict[str, list]]:
    """A message's text: a string as it is, or typed parts [{"type": "text", "text"|"value": ...}] (OpenAI,
    LLaMA-Factory's newer format) joined with nothing between them, as Qwen2-VL's template joins them: the parts
    are pieces of one text, and a separator would add characters the author did not write. Parts of the types in
    `other_parts` are returned beside the text, by type and in order; any other type skips the record."""
    if not isinstance(content, list):
        return content, {}
    texts, others = [], {kind: [] for kind in other_parts}
    for part in content:
        if not isinstance(part, dict):
            raise SkipRecord(f"content part of a {what} is not an object")
        kind = part.get("type")
        if kind != "text" and kind not in others:
            raise SkipRecord(f"non-text content part {kind!r}")
        value = _first(part, "text", "value")
        if kind == "tool_call":  # a structure, checked by _tool_call_text
            others[kind].append(_maybe_literal(value))
            continue
        if not isinstance(value, str):
            raise SkipRecord(f"{kind} part of a {what} is not a string")
        (texts if kind == "text" else others[kind]).append(value)
    return "".join(texts), others


def _tool_call_text(call) -> str:
    """One call as Qwen2.5's template writes it: <tool_call>, {"name": ..., "arguments": {...}}, </tool_call>."""
    if isinstance(call, dict) and isinstance(call.get("function"), dict):  # OpenAI nests the call in "function"
        call = call["function"]
    if not isinstance(call, dict):
        raise SkipRecord("tool call is not a {name, arguments} object")
    name = call.get("name")
    if not isinstance(name, str) or not name.strip():
        raise SkipRecord("tool call without a function name")
    arguments = call.get("arguments")
    if isinstance(arguments, str):  # OpenAI sends the arguments as JSON text; Qwen writes the object itself
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise SkipRecord("tool call arguments are not valid JSON") from None
    if not isinstance(arguments, dict):
        raise SkipRecord("tool call arguments are not a JSON object")
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>"


THINK_START, THINK_END = "<think>\n", "\n</think>\n\n"


def reasoning_length(content: str) -> int:
    """Characters of the <think> block that opens an assistant text as _assistant_text writes it (0 without one):
    the span that --train_on_reasoning false leaves out of the loss."""
    end = content.find(THINK_END) if content.startswith(THINK_START) else -1
    return end + len(THINK_END) if end >= 0 else 0


def _reasoning(item: dict, content, parts: dict[str, list]) -> tuple[str, str | None]:
    """(the reasoning of an assistant message, its text without it). The reasoning may be a field
    (`reasoning_content`: DeepSeek, OpenAI-compatible servers; `reasoning`, `thinking`), `reasoning` parts
    (LLaMA-Factory), or a <think>...</think> block already opening the text (R1-style distillations); blank
    reasoning is none. Given in two of these places, which one the answer follows is unknowable: skipped."""
    field = _first(item, "reasoning_content", "reasoning", "thinking")
    if field is not None and not isinstance(field, str):
        raise SkipRecord("assistant reasoning is not a string")
    found = [field or "", "".join(parts.get("reasoning", []))]
    if isinstance(content, str) and content.lstrip().startswith("<think>") and "</think>" in content:
        thought, _, content = content.lstrip().removeprefix("<think>").partition("</think>")
        found.append(thought)
        content = content.lstrip("\n")
    found = [text.strip("\n") for text in found if text.strip()]
    if len(found) > 1:
        raise SkipRecord("assistant reasoning given twice")
    return (found[0] if found else ""), content


def _assistant_text(item: dict, content, parts: dict[str, list]) -> str:
    """The text an assistant turn trains on, as Qwen3's template writes a turn (Qwen2.5's has no reasoning): the
    reasoning in a <think> block, a blank line, the text, then one <tool_call> block per call, each on its own line
    as Qwen2.5's template puts them. Calls come from OpenAI `tool_calls` (or its older `function_call`) and from
    LLaMA-Factory `tool_call` parts."""
    reasoning, content = _reasoning(item, content, parts)
    calls = _maybe_literal(_first(item, "tool_calls", "function_call"))
    if isinstance(calls, dict):  # OpenAI's older single `function_call`
        calls = [calls]
    if calls is not None and not isinstance(calls, list):
        raise SkipRecord("tool_calls is not a list")
    calls = (calls or []) + parts.get("tool_call", [])
    if calls:
        if content is not None and not isinstance(content, str):
            raise SkipRecord("assistant message is not a string")
        content = "\n".join(([content] if content else []) + [_tool_call_text(call) for call in calls])
    content = _text(content, "assistant message")  # thinking alone is no answer
    # newlines trimmed where Qwen3's template trims them
    return THINK_START + reasoning + THINK_END + content.lstrip("\n") if reasoning else content


def _message(item) -> dict:
    """One message as {"role", "content"}; role system, user, assistant or tool (folded by _messages)."""
    if not isinstance(item, dict):
        raise SkipRecord("message is not an object")
    raw_role = _first(item, "role", "from")
    role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
    if role is None:
        raise SkipRecord(f"unknown role {raw_role!r}")
    raw_content = _first(item, "content", "value")
    if role == "function_call":  # LLaMA-Factory: the value is the JSON of one call {name, arguments} or a list
        calls = _maybe_literal(raw_content)
        calls = calls if isinstance(calls, list) else [calls]
        return {"role": "assistant", "content": _text("\n".join(map(_tool_call_text, calls)), "function_call message")}
    if role == "assistant":
        return {"role": role, "content": _assistant_text(item, *_content_text(raw_content, "assistant message",
                                                                               ASSISTANT_PARTS))}
    content, _ = _content_text(raw_content, f"{role} message")
    if item.get("tool_calls"):
        raise SkipRecord(f"tool_calls on a {role} message")
    return {"role": role, "content": _text(content, f"{role} message")}


def _messages(items) -> list[dict]:
    """A list of messages (or its JSON/Python text) into ChatML messages, in the order given. Tool results become a
    user turn of <tool_response> blocks, consecutive results sharing one turn, as Qwen2.5's template shows them."""
    items = _maybe_literal(items)
    if not isinstance(items, list) or not items:
        raise SkipRecord("no messages")
    messages, previous_role = [], None
    for message in map(_message, items):
        if message["role"] == "tool":
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if previous_role == "tool":
                messages[-1]["content"] += "\n" + block
            else:
                messages.append({"role": "user", "content": block})
        else:
            messages.append(message)
        previous_role = message["role"]
    return messages


def _check_turns(messages: list[dict]) -> list[dict]:
    """Optional system first, then user/assistant alternating, starting with user."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise SkipRecord(f"roles do not alternate user/assistant (got {message['role']} at turn {index})")
    return messages


def normalize_messages(items) -> list[dict]:
    """A list of {role|from, content|value} into ChatML messages: optional system first, then user/assistant
    alternating, starting with user and ending with assistant (a trailing unanswered user turn is dropped)."""
    messages = _check_turns(_messages(items))
    if messages[-1]["role"] == "user":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "assistant":
        raise SkipRecord("no assistant answer")
    return messages


def _exchanges(items) -> list[dict]:
    """Firefly/MOSS `conversation: [{human, assistant}, ...]` (XTuner writes {input, output}) as messages; a
    `system` in the first exchange opens the conversation."""
    items = _maybe_literal(items)
    if not isinstance(items, list) or not items:
        raise SkipRecord("no messages")
    messages = []
    for index, exchange in enumerate(items):
        if not isinstance(exchange, dict):
            raise SkipRecord("conversation exchange is not an object")
        system = exchange.get("system") if index == 0 else None
        if system:
            messages.append({"role": "system", "content": system})
        human, answer = _first(exchange, "human", "input"), _first(exchange, "assistant", "output")
        if system and human is None and answer is None:  # a first item holding only the system prompt
            continue
        messages.append({"role": "user", "content": human})
        if answer is not None:  # a last question may be unanswered; normalize_messages drops it
            messages.append({"role": "assistant", "content": answer})
    return messages


# Qwen2.5's chat template (Qwen2.5-*-Instruct tokenizer_config.json) writes the tools into the system message in
# these words, and a model fine-tuned from Qwen2.5 has learnt to call tools from them.
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _tools_text(tools) -> str:
    """The tools block of the system message, one JSON spec a line; "" when the record offers no tools."""
    tools = _maybe_literal(tools)
    if not tools or (isinstance(tools, str) and not tools.strip()):
        return ""
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise SkipRecord("tools is not a list of function specs")
    # Qwen2.5 was trained on OpenAI-style specs; bare ones (LLaMA-Factory) are wrapped as its Qwen formatter does.
    specs = [tool if tool.get("type") == "function" else {"type": "function", "function": tool} for tool in tools]
    return TOOLS_HEADER + "".join("\n" + json.dumps(spec, ensure_ascii=False) for spec in specs) + TOOLS_FOOTER


def _with_system(messages: list[dict], system, tools) -> list[dict]:
    """The record's `system` (unless the conversation has its own) and `tools` in one system message first, as
    Qwen2.5's template joins them. Without system text the tools block stands alone, as in Qwen3's template
    (Qwen2.5's would put its own "You are Qwen" identity there)."""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    content = "\n\n".join(part for part in (str(system) if system else "", _tools_text(tools)) if part)
    return ([{"role": "system", "content": content}] if content else []) + messages


KTO_LABEL_REASON = ("labelled (KTO-style) record: label true/false marks desirable/undesirable replies; SFT would "
                    "train on the undesirable ones, and DPO needs chosen/rejected pairs")


def _refuse_kto_label(record: dict):
    """KTO data (TRL's unpaired preference format) labels each reply good or bad. Infinity-Instruct's `label` is a
    struct of abilities (or its text): a category, not a verdict, so only a bool or the words true/false count."""
    label = record.get("label")
    if isinstance(label, bool) or (isinstance(label, str) and label.strip().lower() in ("true", "false")):
        raise SkipRecord(KTO_LABEL_REASON)


def _category(record: dict) -> str:
    if record.get("category"):
        return str(record["category"])
    label = _maybe_literal(record.get("label"))
    if isinstance(label, dict):
        for key in ("cate_ability_en", "cate_ability_zh", "ability_en"):
            values = _maybe_literal(label.get(key))
            if isinstance(values, list) and values:
                return str(values[0])
    return ""


def normalize_pt(record: dict) -> dict:
    text = _text(record.get("text", record.get("content")), "text")
    return {"text": text, "quality_score": record.get("quality_score")}


def normalize_sft(record: dict) -> dict:
    _refuse_kto_label(record)
    if record.get("conversations") is not None:
        messages = normalize_messages(record["conversations"])
    elif record.get("messages") is not None:
        messages = normalize_messages(record["messages"])
    elif record.get("conversation") is not None:
        messages = normalize_messages(_exchanges(record["conversation"]))
    elif "instruction" in record:
        prompt = _text(record.get("instruction"), "instruction")
        if record.get("input"):
            prompt = f"{prompt}\n{record['input']}"
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": _text(record.get("output"), "output")}]
    else:
        answer = record.get("response", record.get("completion"))
        messages = [{"role": "user", "content": _text(record.get("prompt"), "prompt")},
                    {"role": "assistant", "content": _text(answer, "response")}]
    return {"messages": _with_system(messages, record.get("system"), record.get("tools")),
            "category": _category(record)}


def _split_answer(messages: list[dict], what: str) -> tuple[list[dict], str]:
    """(the messages before the answer, the answer) of a conversation that ends with the assistant's answer."""
    if messages[-1]["role"] != "assistant":
        raise SkipRecord(f"{what} does not end with an assistant message")
    return messages[:-1], messages[-1]["content"]


def _answer(value, what: str) -> tuple[list[dict], str]:
    """A chosen/rejected field: the answer text, one assistant message, or a conversation ending in the answer
    (Infinity-Preference repeats the prompt there). Returns (the messages before the answer, the answer)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return [], _text(value, what)
    if not value:
        raise SkipRecord(f"empty {what}")
    return _split_answer(_messages(value), what)


HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def _transcript(text, side: str) -> tuple[list[dict], str]:
    """Anthropic hh-rlhf: a whole dialogue "\\n\\nHuman: …\\n\\nAssistant: …" in one string. The answer is the last
    Assistant turn, the turns before it the prompt. Returns (prompt messages, answer)."""
    text = _text(text, side)
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise SkipRecord(f"no prompt: no prompt column, and {side} is not a Human:/Assistant: transcript")
    prefix = text[:cut]
    opening, *exchanges = (f"\n\n{prefix}" if prefix.startswith("Human:") else prefix).split(HH_HUMAN)
    if opening.strip() or not exchanges:
        raise SkipRecord(f"{side} transcript does not start with a Human: turn")
    items = []
    for exchange in exchanges:
        human, *answers = exchange.split(HH_ASSISTANT)
        items.append({"role": "user", "content": human.removeprefix(" ")})
        items.extend({"role": "assistant", "content": answer.removeprefix(" ")} for answer in answers)
    return _messages(items), _text(text[cut + len(HH_ASSISTANT):].removeprefix(" "), f"{side} answer")


def _turns(messages: list[dict], roles=("system", "user", "assistant")) -> list[tuple[str, str]]:
    """What two prompts are compared on: whitespace at the ends of a text is not a difference."""
    return [(message["role"], message["content"].strip()) for message in messages if message["role"] in roles]


def _prompt_field_agrees(prompt_field, embedded: list[dict]) -> bool:
    """A prompt text agrees with the prompt inside chosen/rejected if it is its first or its last user turn (the
    conversation's opening, or the question answered); a prompt message list agrees if it has the same turns."""
    if isinstance(prompt_field, list):
        return _turns(_messages(prompt_field), ("user", "assistant")) == _turns(embedded, ("user", "assistant"))
    users = [content for _, content in _turns(embedded, ("user",))]
    return bool(users) and str(prompt_field).strip() in (users[0], users[-1])


def normalize_dpo(record: dict) -> dict:
    _refuse_kto_label(record)
    prompt_field = _message_structure(record.get("prompt"))
    if isinstance(prompt_field, dict):
        prompt_field = [prompt_field]
    prompt_given = bool(prompt_field.strip() if isinstance(prompt_field, str) else prompt_field)
    if "chosen_messages" in record:
        chosen_prompt, chosen = _split_answer(_messages(record["chosen_messages"]), "chosen answer")
        rejected_prompt, rejected = _split_answer(_messages(record["rejected_messages"]), "rejected answer")
    elif "chosen" not in record:
        raise SkipRecord("no chosen/rejected pair: prompt/completion or messages data is not preference data")
    else:
        chosen_raw, rejected_raw = _message_structure(record["chosen"]), _message_structure(record.get("rejected"))
        if "prompt" not in record and "conversations" not in record and isinstance(chosen_raw, str):
            chosen_prompt, chosen = _transcript(chosen_raw, "chosen")
            rejected_prompt, rejected = _transcript(rejected_raw, "rejected")
        else:
            chosen_prompt, chosen = _answer(chosen_raw, "chosen answer")
            rejected_prompt, rejected = _answer(rejected_raw, "rejected answer")
    if chosen_prompt and rejected_prompt and _turns(chosen_prompt) != _turns(rejected_prompt):
        raise SkipRecord("chosen and rejected answer different prompts")
    embedded_prompt = chosen_prompt or rejected_prompt
    if record.get("conversations") is not None:
        prompt = _messages(record["conversations"])
    elif embedded_prompt:
        # Two prompts that disagree: which one the answers reply to is unknowable, so neither is guessed.
        if prompt_given and not _prompt_field_agrees(prompt_field, embedded_prompt):
            raise SkipRecord("prompt field disagrees with the prompt inside chosen/rejected")
        prompt = embedded_prompt
    elif isinstance(prompt_field, list):
        prompt = _messages(prompt_field)
    else:
        prompt = [{"role": "user", "content": _text(prompt_field, "prompt")}]
    prompt = _check_turns(_with_system(prompt, record.get("system"), record.get("tools")))
    if prompt[-1]["role"] != "user":
        raise SkipRecord("prompt does not end with a user message")
    if chosen.strip() == rejected.strip():
        raise SkipRecord("chosen and rejected are identical")
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _label(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise SkipRecord("label is not true/false")


def normalize_kto(record: dict) -> list[dict]:
    """KTO's unpaired data: a prompt, one reply and whether it is desirable. A preference pair gives two."""
    if "label" not in record:
        pair = normalize_dpo(record)
        return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
    label = _label(record["label"])
    if record.get("messages") is not None:
        prompt, completion = _split_answer(_messages(record["messages"]), "completion")
    else:
        embedded, completion = _answer(_message_structure(record.get("completion")), "completion")
        prompt_field = _message_structure(record.get("prompt"))
        if isinstance(prompt_field, list):
            prompt = _messages(prompt_field)
        else:
            prompt = embedded or [{"role": "user", "content": _text(prompt_field, "prompt")}]
    prompt = _check_turns(_with_system(prompt, record.get("system"), record.get("tools")))
    if prompt[-1]["role"] != "user":
        raise SkipRecord("prompt does not end with a user message")
    return [{"prompt": prompt, "completion": [{"role": "assistant", "content": completion}], "label": label}]


def normalize_grpo(record: dict) -> dict:
    """A problem with a checkable answer: GSM8K's `question` and `answer` (a solution whose last line is
    `#### <number>`, or the number alone), as the question and that number (utils.rewards compares with it).
    GSM8K_zh's `question_zh` / `answer_only` are read the same way; a file that holds its test split beside the
    train split (a `split` column) gives only the train rows."""
    if record.get("split") not in (None, "train"):
        raise SkipRecord(f"not the train split ({record['split']})")
    question = _text(record.get("question_zh", record.get("question")), "question")
    answer = record.get("answer_only", record.get("answer"))
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        number = float(answer)
    else:
        text = _text(answer, "answer")
        number = final_number(text) if "####" in text else parse_number(text)
        if number is None:
            raise SkipRecord("answer has no final number (a last line '#### <number>', or a number alone)")
    return {"question": question, "answer": str(int(number)) if number.is_integer() else repr(number),
            "system": record.get("system")}


NORMALIZERS = {"pt": normalize_pt, "sft": normalize_sft, "dpo": normalize_dpo, "kto": normalize_kto,
               "grpo": normalize_grpo}


def iter_normalized(files: list[str], kind: str, counter: SkipCounter, check=None) -> Iterator[dict]:
    """Every usable record of `files`, normalised for `kind`; the rest are counted in `counter`.
    `check(record)` may add a stage's own rule by raising SkipRecord."""
    normalize = NORMALIZERS[kind]
    for path in files:
        for where, record in iter_file_records(path, kind):
            try:
                normalized = normalize(record)
                # a KTO record may be a preference pair: two unpaired rows
                rows = normalized if isinstance(normalized, list) else [normalized]
                if check is not None:
                    rows = [check(row) for row in rows]
            except SkipRecord as reason:
                counter.skip(str(reason), where)
                continue
            counter.kept += 1
            yield from rows


def load_records(specs: str | list[str], kind: str) -> tuple[list[dict], SkipCounter]:
    """All normalised records in memory, with the skip counts: for SFT/DPO-sized data and for inspection.
    Pretraining corpora go through utils.packing, which streams."""
    counter = SkipCounter()
    records = list(iter_normalized(resolve_data_files(specs), kind, counter))
    return records, counter
