"""An OpenAI-compatible server for a checkpoint: FastAPI and uvicorn in front of `model.generate`, streamed through
transformers' AsyncTextIteratorStreamer, the checkpoint folder loaded offline, bound to 127.0.0.1 unless told
otherwise, with an optional key.

    bash run.sh serve --model_path results/dpo [--port 8000]
    python -m tools.serve --model_path results/dpo --host 0.0.0.0 --api_key "$KEY"   # reachable from elsewhere

SFT and DPO checkpoints answer `POST /v1/chat/completions` with the chat template saved inside them; a PT checkpoint
continues text at `POST /v1/completions`; both stream (`"stream": true`) or answer whole. Decoding defaults are the
checkpoint's generation_config.json; a request's own temperature (0 = greedy) / top_p / max_tokens /
repetition_penalty override them. `max_tokens` is capped by the context the prompt leaves (usage shows what came),
and a prompt that fills the whole context is refused. `GET /v1/models` lists the one model, under its path, which is
the `model` a request names (or leaves out). On a GPU, vLLM reads the same folder: `vllm serve results/dpo`.

Tool use and reasoning as OpenAI clients (and vLLM) send and read them: a request's `tools`, assistant messages with
`tool_calls` and `tool` messages render as the SFT data wrote them (utils/chat_template.jinja), and a reply is split
by utils.chat.parse_assistant_output: its leading <think> block becomes `message.reasoning_content`, its <tool_call>
blocks `message.tool_calls` (finish_reason "tool_calls"), and the rest `content`; a block that is not a valid call
stays in the content. Streamed, the thinking comes as `delta.reasoning_content`, the answer as `delta.content`, and
the calls in one `delta.tool_calls` at the end. `tool_choice` is accepted and ignored: the model decides.

Requests are served one at a time: there is one copy of the model, on the CPU or on one GPU, which two generations
would only share at half speed each. They run in a single worker thread, so the event loop stays free to answer
/health and refusals meanwhile. The queue is bounded: at most --max_queue requests wait or run, and one more is
answered 429 at once (the `openai` client retries it) instead of waiting behind an unbounded backlog. A generation
stops after --request_timeout seconds, or at the next token once its client has hung up.

Every refusal has OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, which the `openai` client
turns into its exceptions: 400 for a bad request (FastAPI's own 422 included), 401 for a wrong key, 404 for an
unknown model or path, 429 when the queue is full; a bad request leaves no traceback in the log, only a bug does.

The chat page, http://127.0.0.1:8000/chat, is one self-contained HTML file (tools/chat_page.html) that talks to this
server's own `/v1/chat/completions`, streamed. Why not Gradio: the page needs nothing beyond this server (no second
process, no extra dependency, no CDN fonts or scripts, which an offline GPU box cannot fetch), and what it sends is
exactly what any OpenAI client sends, so the page, the `openai` client and vLLM behave alike. Its defaults
(temperature, top_p, repetition_penalty, max new tokens) are the checkpoint's generation_config.json, read from
`GET /chat/defaults.json`.

The key: every /v1 request must carry `Authorization: Bearer KEY` (what the `openai` client sends for `api_key`), or
is answered 401 (the page and its defaults hold no secret: the page asks for the key). Listening on anything but
loopback without a key is refused unless --allow_no_key: whoever reaches the port would use the machine for free.
"""

import argparse
import asyncio
import hmac
import ipaddress
import json
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, StrictStr, field_validator, model_validator
from starlette.exceptions import HTTPException

from utils.chat import DEFAULT_SYSTEM_PROMPT, AssistantStream, parse_assistant_output
from utils.config import repo_path
from utils.errors import ConfigError, MissingInputError, run_main

CHAT_PAGE = Path(__file__).with_name("chat_page.html")


class OpenAIError(Exception):
    """A refused request, answered the way OpenAI answers: this status, and {"error": {...}}."""

    def __init__(self, status: int, message: str, param=None, type="invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body, status_code=error.status)


class Sampling(BaseModel):
    """What both endpoints take; other OpenAI fields (frequency_penalty, user, ...) are accepted and ignored."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)  # not OpenAI's, but vLLM's and the chat page's
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None

    @field_validator("n")
    @classmethod
    def one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n


class FunctionCall(BaseModel):
    name: StrictStr
    arguments: StrictStr  # JSON text of an object, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def json_object(cls, arguments: str) -> str:
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be the JSON text of an object")
        return arguments


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr | None = None
    reasoning_content: StrictStr | None = None  # an earlier reply's thinking, sent back (the chat page does)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def has_content(self) -> "Message":
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.content is None and not self.tool_calls:
            raise ValueError("content is required (an assistant message may give tool_calls instead)")
        return self


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[dict] | None = None  # kept as sent: the template writes each spec's JSON as the SFT data did

    @field_validator("tools")
    @classmethod
    def function_specs(cls, tools: list[dict] | None) -> list[dict] | None:
        for tool in tools or []:
            function = tool.get("function")
            if tool.get("type") != "function" or not isinstance(function, dict) or \
                    not isinstance(function.get("name"), str):
                raise ValueError('each tool must be {"type": "function", "function": {"name": ..., ...}}')
        return tools

    def prompt_messages(self) -> list[dict]:
        """The messages for the chat template, each call's arguments as an object: the template writes it as the
        training data did (utils/formats.py), whatever spacing the client's JSON text had."""
        messages = [message.model_dump(exclude_none=True) for message in self.messages]
        for message in messages:
            for call in message.get("tool_calls", []):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        return messages


class CompletionRequest(Sampling):
    prompt: StrictStr = Field(min_length=1)


def validation_error(request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 as OpenAI's 400, naming the first bad field the way OpenAI does (messages[0].role)."""
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return error_response(OpenAIError(400, f"the body is not valid JSON: {first['msg']}"))
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"][1:]).lstrip(".")
    return error_response(OpenAIError(400, f"{param or 'body'}: {first['msg']}", param or None))


def sse(data: dict | str) -> str:
    """One server-sent event, as OpenAI streams them."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class StopFlag(threading.Event):
    """Set once the client has gone; as a stopping criterion, `model.generate` checks it after every token."""

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.is_set(), dtype=torch.bool, device=input_ids.device)


class Generator:
    """The model, its tokenizer and decoding defaults, and the single worker that runs one generation at a time."""

    def __init__(self, model_path: Path, device: str, max_queue: int, request_timeout: float):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto").to(device).eval()
        self.defaults = self.model.generation_config  # the checkpoint's generation_config.json
        self.context = self.model.config.max_position_embeddings
        self.worker = ThreadPoolExecutor(max_workers=1)
        self.max_queue, self.request_timeout, self.queued = max_queue, request_timeout, 0

    def decoding(self, request: Sampling, prompt_tokens: int, param: str) -> dict:
        """`model.generate`'s settings for a request: those it names; generate takes the rest from the checkpoint."""
        left = self.context - prompt_tokens
        if left <= 0:
            raise OpenAIError(400, f"the prompt is {prompt_tokens} tokens, and the model's context is {self.context} "
                                   "tokens: no room is left for an answer; shorten it", param,
                              code="context_length_exceeded")
        named = {"do_sample": None if request.temperature is None else request.temperature > 0,  # 0: greedy
                 "temperature": request.temperature or None, "top_p": request.top_p,
                 "repetition_penalty": request.repetition_penalty}
        # max_time: generate's own MaxTimeCriteria, counted from the start of this generation, not of its wait
        return {"max_new_tokens": min(request.max_tokens or self.defaults.max_new_tokens or 512, left),
                "max_time": self.request_timeout, **{name: value for name, value in named.items() if value is not None}}

    def submit(self, ids: list[int], settings: dict, stop: StopFlag, streamer=None) -> asyncio.Future:
        """Queue a generation (the new token ids, once done), or refuse it at once when the queue is full."""
        if self.queued >= self.max_queue:
            raise OpenAIError(429, f"the server is busy: {self.queued} requests are waiting or running (--max_queue "
                                   f"{self.max_queue}); retry shortly", type="rate_limit_exceeded")
        self.queued += 1  # only the event loop's thread counts, so no lock is needed
        future = asyncio.get_running_loop().run_in_executor(self.worker, self.generate, ids, settings, stop, streamer)
        future.add_done_callback(self.done)
        return future

    def done(self, future) -> None:
        self.queued -= 1

    def generate(self, ids: list[int], settings: dict, stop: StopFlag, streamer) -> list[int]:
        prompt = torch.tensor([ids], device=self.model.device)
        try:
            with torch.inference_mode():
                output = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), stopping_criteria=[stop],
                                             streamer=streamer, **settings)
        except BaseException:
            if streamer is not None:
                streamer.end()  # the stream ends instead of waiting forever; the error reaches the handler
            raise
        return output[0, len(ids):].tolist()

    def finish_reason(self, new_ids: list[int]) -> str:
        eos = self.defaults.eos_token_id
        return "stop" if new_ids and new_ids[-1] in (eos if isinstance(eos, list) else [eos]) else "length"


async def until_done(request: Request, future: asyncio.Future, stop: StopFlag) -> list[int]:
    """Wait for a whole (unstreamed) answer, stopping its generation should the client hang up meanwhile."""
    while not future.done():
        await asyncio.wait([future], timeout=0.5)
        if not future.done() and await request.is_disconnected():
            stop.set()
    return future.result()


def page_defaults(model_path: Path, key_required: bool) -> dict:
    """What the chat page starts with: the checkpoint's own decoding settings (temperature 0 = greedy)."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(model_path)
    except OSError:  # a folder saved without generation_config.json: transformers' defaults
        generation = GenerationConfig()
    return {"model": str(model_path), "system_prompt": DEFAULT_SYSTEM_PROMPT,
            # unset (transformers 5 leaves them None): transformers' own values, which the page can send back
            "temperature": (generation.temperature or 1.0) if generation.do_sample else 0,
            "top_p": generation.top_p or 1.0, "repetition_penalty": generation.repetition_penalty or 1.0,
            "max_tokens": generation.max_new_tokens or 512, "key_required": key_required}


def build_app(generator: Generator, model_id: str, api_key: str | None, defaults: dict) -> FastAPI:
    app = FastAPI(openapi_url=None)  # no /docs or /openapi.json: the only open paths are /health and the chat page
    app.add_exception_handler(OpenAIError, lambda request, error: error_response(error))
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, lambda request, exc: error_response(OpenAIError(
        exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)))
    app.add_exception_handler(Exception, lambda request, exc: error_response(OpenAIError(  # a bug: logged, too
        500, "internal error; the server's log says more", type="server_error")))
    expected = f"Bearer {api_key}".encode()
    page = CHAT_PAGE.read_text(encoding="utf-8")

    def check_key(request: Request) -> None:  # on the /v1 routes only: /health and the chat page stay open
        if api_key and not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            raise OpenAIError(401, "missing or wrong API key (send `Authorization: Bearer KEY`)",
                              code="invalid_api_key")

    def check_model(request: Sampling) -> None:
        if request.model not in (None, model_id):
            raise OpenAIError(404, f"the model {request.model!r} does not exist; this server has {model_id!r}",
                              "model", code="model_not_found")

    async def answer(request: Request, body: Sampling, ids: list[int], chat: bool):
        settings = generator.decoding(body, len(ids), "messages" if chat else "prompt")
        stop = StopFlag()
        streamer = None
        if body.stream:
            from transformers import AsyncTextIteratorStreamer
            streamer = AsyncTextIteratorStreamer(generator.tokenizer, skip_prompt=True, skip_special_tokens=True)
        future = generator.submit(ids, settings, stop, streamer)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model_id, "object": ("chat.completion" if chat else "text_completion")
                + (".chunk" if chat and body.stream else "")}

        def reply(choice: dict, finish: str | None) -> dict:
            return {**head, "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": finish}]}

        def parts(reasoning: str = "", content: str = "", calls: list[dict] | None = None) -> dict:
            """An assistant message's reasoning_content, content and tool_calls, those that it has."""
            return {"role": "assistant", **{name: value for name, value in (
                ("reasoning_content", reasoning), ("content", content), ("tool_calls", calls)) if value}}

        def usage(new_ids: list[int]) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": len(new_ids),
                    "total_tokens": len(ids) + len(new_ids)}

        if not body.stream:
            new_ids = await until_done(request, future, stop)
            text = generator.tokenizer.decode(new_ids, skip_special_tokens=True)
            finish = generator.finish_reason(new_ids)
            if not chat:
                return {**reply({"text": text}, finish), "usage": usage(new_ids)}
            reasoning, content, calls = parse_assistant_output(text)
            # content is always there: null beside calls alone, as OpenAI's
            message = {**parts(reasoning, content, calls), "content": content or (None if calls else "")}
            return {**reply({"message": message}, "tool_calls" if calls else finish), "usage": usage(new_ids)}

        async def events():
            parser = AssistantStream()
            try:
                async for piece in streamer:
                    if chat and any(delta := parser.feed(piece)):
                        yield sse(reply({"delta": parts(*delta)}, None))
                    elif not chat and piece:
                        yield sse(reply({"text": piece}, None))
                new_ids = await future
                finish = generator.finish_reason(new_ids)
                if chat:
                    *delta, calls = parser.finish()
                    if any(delta) or calls:  # the held-back end; the calls, each with its place in the list
                        yield sse(reply({"delta": parts(*delta, [{"index": index, **call}
                                                                 for index, call in enumerate(calls)])}, None))
                    finish = "tool_calls" if calls else finish
                yield sse(reply({"delta": {}} if chat else {"text": ""}, finish))
                if (body.stream_options or {}).get("include_usage"):
                    yield sse({**head, "choices": [], "usage": usage(new_ids)})
                yield sse("[DONE]")
            finally:  # done, or the client hung up and Starlette closed this stream: either way, stop generating
                stop.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/chat", response_class=HTMLResponse)
    def chat_page():
        return page

    @app.get("/chat/defaults.json")
    def chat_defaults():
        return defaults

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "mini_qwen"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request, body: ChatRequest):
        check_model(body)
        ids = generator.tokenizer.apply_chat_template(body.prompt_messages(), tools=body.tools,
                                                      add_generation_prompt=True, return_dict=True)["input_ids"]
        return await answer(request, body, ids, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request, body: CompletionRequest):
        check_model(body)
        return await answer(request, body, generator.tokenizer(body.prompt)["input_ids"], chat=False)

    return app


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may well resolve to a public address
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="a checkpoint folder (results/pt, results/sft, ...)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", default=os.environ.get("MINI_QWEN_API_KEY"),
                        help="require `Authorization: Bearer KEY` (default: $MINI_QWEN_API_KEY; none: no key)")
    parser.add_argument("--allow_no_key", action="store_true",
                        help="listen on a non-loopback address without a key (anyone who reaches it may use it)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--max_queue", type=int, default=8,
                        help="requests waiting or running at once; one more is answered 429 (default 8)")
    parser.add_argument("--request_timeout", type=float, default=120,
                        help="seconds one generation may run before it is cut short (default 120)")
    args = parser.parse_args(argv)
    model_path = Path(repo_path(args.model_path))
    if not (model_path / "config.json").is_file():
        raise MissingInputError(f"{model_path}: not a checkpoint folder (no config.json); train a stage first")
    if not args.api_key and not args.allow_no_key and not is_loopback(args.host):
        raise ConfigError(f"--host {args.host} is reachable from other machines, and no key is set: give --api_key "
                          "(or $MINI_QWEN_API_KEY), or --allow_no_key to serve it open")
    if args.max_queue < 1 or args.request_timeout <= 0:
        raise ConfigError("--max_queue must be at least 1 and --request_timeout above 0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: nothing to fetch, and no hub to ask

    import uvicorn

    generator = Generator(model_path, args.device, args.max_queue, args.request_timeout)
    app = build_app(generator, str(model_path), args.api_key, page_defaults(model_path, bool(args.api_key)))
    print(f"serving {model_path} at http://{args.host}:{args.port}/v1 (OpenAI API"
          f"{', key required' if args.api_key else ''}), chat page http://{args.host}:{args.port}/chat; "
          "Ctrl-C stops it", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
