"""`python -m utils.serve` answers the official `openai` client on loopback: chat (whole and streamed) from an SFT
checkpoint, a completion from a PT checkpoint, and 401 without the key; its chat page answers in a real browser."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, skip_without

openai = pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(checkpoint, key: str, log_file: Path) -> tuple[subprocess.Popen, str]:
    """The server's output goes to a file: a pipe nobody reads would block it once full."""
    port = free_port()
    with log_file.open("w") as log:
        server = subprocess.Popen([sys.executable, "-m", "utils.serve", "--model_path", str(checkpoint), "--port",
                                   str(port), "--api_key", key, "--device", "cpu"], cwd=REPO, stdout=log,
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
def servers(pt_checkpoint, sft_checkpoint, tmp_path_factory):
    """One SFT and one PT server for the module (each start loads torch and the model: ~30 s on 2 cores)."""
    logs = tmp_path_factory.mktemp("serve")
    started = {name: start(checkpoint, f"{name}-key", logs / f"{name}.log")  # both start at once
               for name, checkpoint in (("sft", sft_checkpoint), ("pt", pt_checkpoint))}
    try:
        deadline = time.monotonic() + 240
        for name, (server, url) in started.items():
            wait_until_up(server, url, logs / f"{name}.log", deadline)
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
