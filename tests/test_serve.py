"""`python -m tools.serve` answers the official `openai` client on loopback: chat (whole and streamed) from an SFT
checkpoint, a completion from a PT checkpoint, and 401 without the key; its chat page answers in a real browser.
Under load and bad requests it answers 429 / 400 / 404 in OpenAI's error shape, and keeps serving. Tools and tool
results go into the prompt as SFT trained on them, and a reply's reasoning and tool calls come out as OpenAI's
reasoning_content / tool_calls, whole and streamed, and on the chat page (a scripted model writes those replies)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, ScriptedModel, chatml, skip_without
from tools import serve
from utils.chat import DEFAULT_SYSTEM_PROMPT, ChatTokens
from utils.errors import ConfigError
from utils.formats import normalize_sft

openai = pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(checkpoint, key: str, log_file: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """The server's output goes to a file: a pipe nobody reads would block it once full."""
    port = free_port()
    with log_file.open("w") as log:
        server = subprocess.Popen([sys.executable, "-m", "tools.serve", "--model_path", str(checkpoint), "--port",
                                   str(port), "--api_key", key, "--device", "cpu", *flags], cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT)
    return server, f"http://127.0.0.1:{port}"


def wait_until_up(server: subprocess.Popen, url: str, log_file: Path, deadline: float) -> None:
    while True:
        assert server.poll() is None, log_file.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if json.loads(response.read())["status"] == "ok":
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.5)


CHROMIUM = os.environ.get("MINI_QWEN_CHROMIUM", "/usr/bin/chromium")
# Chromium as root on a machine with no outside network: no sandbox, and none of its background connections
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def serve_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve")


SFT_MAX_QUEUE = 2  # small enough that 16 requests at once overflow it


@pytest.fixture(scope="module")
def servers(pt_checkpoint, sft_checkpoint, serve_logs):
    """One SFT and one PT server for the module (each start loads torch and the model: ~30 s on 2 cores)."""
    started = {name: start(checkpoint, f"{name}-key", serve_logs / f"{name}.log", *flags)  # both start at once
               for name, checkpoint, flags in (("sft", sft_checkpoint, ["--max_queue", str(SFT_MAX_QUEUE)]),
                                               ("pt", pt_checkpoint, []))}
    try:
        deadline = time.monotonic() + 240
        for name, (server, url) in started.items():
            wait_until_up(server, url, serve_logs / f"{name}.log", deadline)
        yield {name: url for name, (_, url) in started.items()}
    finally:
        for server, _ in started.values():
            server.terminate()
            server.wait(timeout=30)


def test_openai_client_chats_streams_and_completes(servers, pt_checkpoint, sft_checkpoint):
    sft_url = servers["sft"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{sft_url}/v1/models", timeout=10)
    assert refused.value.code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{sft_url}/v1", api_key="wrong").models.list()

    chat = openai.OpenAI(base_url=f"{sft_url}/v1", api_key="sft-key")
    (model,) = [entry.id for entry in chat.models.list()]
    assert model == str(sft_checkpoint)
    messages = [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "李白是谁？"}]
    whole = chat.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    assert 0 < whole.usage.completion_tokens <= 6
    assert whole.usage.prompt_tokens == len(sft_tokenizer_ids(sft_checkpoint, messages))
    pieces = [chunk.choices[0].delta.content for chunk in chat.chat.completions.create(
        model=model, messages=messages, max_tokens=6, temperature=0, stream=True) if chunk.choices]
    assert len([piece for piece in pieces if piece]) >= 2  # several chunks, not one reply at the end
    # greedy both times: the same text (the whole reply comes with its leading space trimmed)
    assert "".join(piece or "" for piece in pieces).strip() == whole.choices[0].message.content.strip()

    completion = openai.OpenAI(base_url=f"{servers['pt']}/v1", api_key="pt-key").completions.create(
        model=str(pt_checkpoint), prompt="长城是", max_tokens=6, temperature=0)
    assert completion.choices[0].text and 0 < completion.usage.completion_tokens <= 6


def sft_tokenizer_ids(checkpoint, messages) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint).apply_chat_template(messages, add_generation_prompt=True,
                                                                        return_dict=True)["input_ids"]


def test_checkpoint_has_what_vllm_reads(sft_checkpoint):
    """vLLM is not installed here (no GPU); `vllm serve DIR` reads these files, with these fields."""
    config = json.loads((sft_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    tokenizer = json.loads((sft_checkpoint / "tokenizer_config.json").read_text())
    assert tokenizer["tokenizer_class"] == "Qwen2Tokenizer" and tokenizer["eos_token"] == "<|im_end|>"
    assert (sft_checkpoint / "tokenizer.json").is_file()
    assert "<|im_start|>assistant" in (sft_checkpoint / "chat_template.jinja").read_text()
    generation = json.loads((sft_checkpoint / "generation_config.json").read_text())  # vLLM's sampling defaults
    assert generation["eos_token_id"] == [151645, 151643] and generation["repetition_penalty"] == 1.1


def test_chat_page_streams_an_answer_in_a_browser(servers, sft_checkpoint, tmp_path):
    if not os.path.exists(CHROMIUM):
        skip_without(f"no browser at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright
    url = servers["sft"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        answered = []
        page.on("response", lambda response: response.url.endswith("/v1/chat/completions")
                and answered.append(response.status))
        page.goto(f"{url}/chat")
        page.wait_for_selector("body[data-ready=true]")
        generation = json.loads((sft_checkpoint / "generation_config.json").read_text())
        assert float(page.input_value("#temperature")) == generation["temperature"]  # the checkpoint's defaults
        assert float(page.input_value("#repetition_penalty")) == generation["repetition_penalty"]
        page.fill("#api_key", "sft-key")
        page.fill("#max_tokens", "12")
        page.fill("#question", "李白是谁？")
        page.press("#question", "Enter")
        page.wait_for_function("document.querySelector('.assistant')?.textContent && "
                               "document.getElementById('stop').hidden", timeout=120_000)  # answered, done
        assert page.inner_text(".user") == "李白是谁？"
        first_answer = page.inner_text(".assistant")
        assert first_answer.strip() and "error" not in page.inner_html("#messages")
        page.screenshot(path=tmp_path / "chat_page.png")

        page.fill("#question", "再说一遍")  # a second turn goes with the first one's history
        page.press("#question", "Enter")
        page.wait_for_function("document.querySelectorAll('.assistant').length == 2 && "
                               "document.getElementById('stop').hidden")
        assert page.locator(".message").count() == 4
        page.click("#new-chat")
        assert page.locator(".message").count() == 0
        browser.close()
    assert (tmp_path / "chat_page.png").stat().st_size > 10_000
    assert answered == [200, 200]  # one streamed request per turn, each with the whole history


def call(url: str, path: str, body, key: str) -> tuple[int, dict]:
    """POST a body (a dict as JSON, or raw bytes) and return the status and the JSON answer, error or not."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data, {"Content-Type": "application/json",
                                                            "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refusal:
        return refusal.code, json.loads(refusal.read())


def openai_error(answer: dict) -> dict:
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}, answer
    return answer["error"]


def test_load_and_bad_requests_get_openai_errors(servers, serve_logs, pt_checkpoint, sft_checkpoint):
    from transformers import AutoTokenizer

    sft, pt = servers["sft"], servers["pt"]
    hello = [{"role": "user", "content": "你好"}]
    chat = lambda body: call(sft, "/v1/chat/completions", body, "sft-key")  # noqa: E731
    complete = lambda body: call(pt, "/v1/completions", body, "pt-key")  # noqa: E731

    # 16 at once: one generation runs at a time and at most SFT_MAX_QUEUE wait or run; the rest get 429 at once
    answers, ready = [], threading.Barrier(16)

    def ask():
        ready.wait()
        answers.append(chat({"messages": hello, "max_tokens": 4}))

    askers = [threading.Thread(target=ask) for _ in range(16)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join()
    statuses = sorted(status for status, _ in answers)
    assert set(statuses) == {200, 429}, statuses  # several served, the overflow refused
    for status, answer in answers:
        if status == 200:
            assert answer["choices"][0]["message"]["content"] is not None and answer["usage"]["completion_tokens"]
        else:
            assert openai_error(answer)["type"] == "rate_limit_exceeded"

    bad_chats = [(b'{"messages": [', None), ({}, "messages"), ({"messages": []}, "messages"),
                 ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
                 ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content"),
                 ({"messages": hello, "temperature": 2.5}, "temperature"),
                 ({"messages": hello, "temperature": -0.1}, "temperature"),
                 ({"messages": hello, "top_p": 0}, "top_p"), ({"messages": hello, "top_p": 1.5}, "top_p"),
                 ({"messages": hello, "n": 2}, "n"), ({"messages": hello, "max_tokens": 0}, "max_tokens")]
    for body, param in bad_chats:
        status, answer = chat(body)
        error = openai_error(answer)
        assert (status, error["type"], error["param"]) == (400, "invalid_request_error", param), (body, answer)
    assert "n=1" in chat({"messages": hello, "n": 2})[1]["error"]["message"]
    for body in ({}, {"prompt": ""}, {"prompt": 5}):
        status, answer = complete(body)
        assert (status, openai_error(answer)["param"]) == (400, "prompt"), (body, answer)
    status, answer = chat({"model": "gpt-4", "messages": hello})
    assert (status, openai_error(answer)["code"]) == (404, "model_not_found")
    assert chat({"model": str(sft_checkpoint), "messages": hello, "max_tokens": 2})[0] == 200  # the served id

    context = json.loads((pt_checkpoint / "config.json").read_text())["max_position_embeddings"]
    tokenizer = AutoTokenizer.from_pretrained(pt_checkpoint)
    prompt = "长城" * (context - 4)  # one token each: 4 tokens of room left
    prompt_tokens = len(tokenizer(prompt)["input_ids"])
    assert context - 8 < prompt_tokens < context
    status, answer = complete({"prompt": prompt, "max_tokens": 1_000_000_000, "temperature": 0})
    assert status == 200 and answer["usage"]["prompt_tokens"] == prompt_tokens, answer
    assert 0 < answer["usage"]["completion_tokens"] <= context - prompt_tokens  # capped to the context left

    too_long = "长城" * 150_000  # 300,000 characters
    status, answer = complete({"prompt": too_long})
    error = openai_error(answer)
    assert (status, error["param"]) == (400, "prompt")
    assert str(len(tokenizer(too_long)["input_ids"])) in error["message"] and str(context) in error["message"]
    status, answer = chat({"messages": [{"role": "user", "content": too_long}]})
    error = openai_error(answer)
    assert (status, error["param"]) == (400, "messages")
    assert str(len(sft_tokenizer_ids(sft_checkpoint, [{"role": "user", "content": too_long}]))) in error["message"]

    status, answer = chat({"messages": hello, "max_tokens": 3, "temperature": 0})  # still serving
    assert status == 200 and 0 < answer["usage"]["completion_tokens"] <= 3
    assert complete({"prompt": "长城是", "max_tokens": 3})[0] == 200
    for log in ("sft.log", "pt.log"):
        assert "Traceback" not in (serve_logs / log).read_text()


def test_refuses_a_public_address_without_a_key(pt_checkpoint, monkeypatch):
    """Before it loads anything: whoever reaches 0.0.0.0 would use the machine for free."""
    class Loading(Exception):
        pass

    def load(*args):
        raise Loading

    monkeypatch.setattr(serve, "Generator", load)
    monkeypatch.delenv("MINI_QWEN_API_KEY", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # main sets it; this way it is undone after the test
    public = ["--model_path", str(pt_checkpoint), "--host", "0.0.0.0"]
    with pytest.raises(ConfigError, match="--api_key"):
        serve.main(public)
    for allowed in (public + ["--api_key", "k"], public + ["--allow_no_key"], public + ["--host", "::1"]):
        with pytest.raises(Loading):  # got as far as loading the model
            serve.main(allowed)


@pytest.fixture(scope="module")
def scripted_server(sft_checkpoint):
    """The SFT checkpoint's app, served in this process with a ScriptedModel in place of its model: replies with
    reasoning and tool calls, which the tiny model never writes, through the real app, HTTP and client."""
    import uvicorn

    generator = serve.Generator(sft_checkpoint, "cpu", max_queue=2, request_timeout=60)
    generator.model = ScriptedModel(generator.model, generator.tokenizer)
    app = serve.build_app(generator, str(sft_checkpoint), None, serve.page_defaults(sft_checkpoint, key_required=False))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the scripted server did not start"
        time.sleep(0.05)
    try:
        yield generator, f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# An OpenAI-shaped record of mini_data/sft_tools: system, user, reasoning + call, tool result, reasoning + answer.
UMBRELLA = json.loads((REPO / "mini_data" / "sft_tools" / "openai_messages.jsonl").read_text().splitlines()[0])


def calls_of(calls) -> list[tuple[str, dict]]:
    return [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in calls or []]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("turn", [2, 4], ids=["calls a tool", "answers from the tool result"])
def test_tools_go_in_as_trained_and_reasoning_and_calls_come_out_parsed(scripted_server, sft_checkpoint, turn, stream):
    generator, url = scripted_server
    messages, training = UMBRELLA["messages"], normalize_sft(UMBRELLA)["messages"]  # as SFT trains on it
    answer = messages[turn]
    generator.model.replies = [training[turn]["content"]]  # the reply as the model learnt to write it
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    request = dict(model=str(sft_checkpoint), messages=messages[:turn], tools=UMBRELLA["tools"], temperature=0)
    if stream:
        deltas = [(chunk.choices[0].delta, chunk.choices[0].finish_reason)
                  for chunk in client.chat.completions.create(**request, stream=True) if chunk.choices]
        reasoning = "".join(getattr(delta, "reasoning_content", None) or "" for delta, _ in deltas)
        content = "".join(delta.content or "" for delta, _ in deltas) or None
        calls = [call.model_dump() for delta, _ in deltas for call in delta.tool_calls or []]
        assert [call.pop("index") for call in calls] == list(range(len(calls)))
        finish = deltas[-1][1]
        if turn == 4:
            assert sum(bool(delta.content) for delta, _ in deltas) > 1  # streamed, not sent in one piece
    else:
        choice = client.chat.completions.create(**request).choices[0]
        reasoning, content, finish = choice.message.reasoning_content, choice.message.content, choice.finish_reason
        calls = [call.model_dump() for call in choice.message.tool_calls or []]
    # the prompt: the training text of the conversation so far, id for id, then the assistant's turn opened
    chat = ChatTokens(generator.tokenizer)
    assert generator.model.prompts[-1] == chat.encode_conversation(training[:turn]) + chat.generation_prompt
    assert (reasoning, content) == (answer["reasoning_content"], answer["content"])
    assert calls_of(calls) == calls_of(answer.get("tool_calls"))
    assert all(call["type"] == "function" and call["id"] for call in calls)
    assert finish == ("tool_calls" if answer.get("tool_calls") else "stop")


def test_bad_tool_requests_get_openai_errors(scripted_server):
    _, url = scripted_server
    hello = [{"role": "user", "content": "hi"}]
    call_f = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    bad = [({"messages": [{"role": "assistant", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
            "messages[0].tool_calls[0].function.arguments"),
           ({"messages": [{"role": "assistant", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
            "messages[0].tool_calls[0].function.arguments"),
           ({"messages": [{"role": "tool"}]}, "messages[0]"),
           ({"messages": [{"role": "user", "content": "hi", "tool_calls": [call_f]}]}, "messages[0]"),
           ({"messages": hello, "tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools")]
    for body, param in bad:
        status, answer = call(url, "/v1/chat/completions", body, "unused")
        assert (status, openai_error(answer)["param"]) == (400, param), (body, answer)


def test_chat_page_shows_thinking_and_tool_calls_and_sends_them_back(scripted_server):
    if not os.path.exists(CHROMIUM):
        skip_without(f"no browser at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    generator, url = scripted_server
    training = normalize_sft(UMBRELLA)["messages"]
    generator.model.replies = [training[2]["content"], "好的。"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto(f"{url}/chat")
        page.wait_for_selector("body[data-ready=true]")
        for question in ("Do I need an umbrella in Paris today?", "谢谢"):
            page.fill("#question", question)
            page.press("#question", "Enter")
            page.wait_for_function(f"document.querySelectorAll('.assistant').length == "
                                   f"{1 + (question == '谢谢')} && document.getElementById('stop').hidden")
        first = page.locator(".assistant").first
        assert first.locator("summary").inner_text() == "思考 · Thinking"
        assert first.locator(".thinking").get_attribute("open") is None  # folded until clicked
        first.locator("summary").click()
        assert first.locator(".thinking div").inner_text() == UMBRELLA["messages"][2]["reasoning_content"]
        assert first.locator(".tool-calls").inner_text() == '🔧 get_weather {"city": "Paris"}'
        second = page.locator(".assistant").nth(1)
        assert not second.locator(".thinking").is_visible() and not second.locator(".tool-calls").is_visible()
        assert second.inner_text() == "好的。"
        browser.close()
    # the second question went with the first reply as the model wrote it: thinking and call included
    assert generator.tokenizer.decode(generator.model.prompts[-1]) == chatml([
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "Do I need an umbrella in Paris today?"}, training[2],
        {"role": "user", "content": "谢谢"}]) + "<|im_start|>assistant\n"
