"""An OpenAI-compatible server for a checkpoint: transformers' own `transformers serve` (FastAPI, OpenAI schema,
streaming), loading the checkpoint folder offline, bound to 127.0.0.1 unless told otherwise, with an optional key.

    bash run.sh serve --model_path results/dpo [--port 8000]
    python -m utils.serve --model_path results/dpo --host 0.0.0.0 --api_key "$KEY"   # reachable from elsewhere

SFT and DPO checkpoints answer `POST /v1/chat/completions` with the chat template saved inside them; a PT checkpoint
continues text at `POST /v1/completions`. Decoding defaults are the checkpoint's generation_config.json; a request's
own temperature / top_p / max_tokens override them. `GET /v1/models` lists the one model, under its path, which is
the `model` a request names. On a GPU, vLLM reads the same folder: `vllm serve results/dpo`.

The chat page, http://127.0.0.1:8000/chat, is one self-contained HTML file (utils/chat_page.html) that talks to this
server's own `/v1/chat/completions`, streamed. Why not Gradio: the page needs nothing beyond this server (no second
process, no extra dependency, no CDN fonts or scripts, which an offline GPU box cannot fetch), and what it sends is
exactly what any OpenAI client sends, so the page, the `openai` client and vLLM behave alike. Its defaults
(temperature, top_p, repetition_penalty, max new tokens) are the checkpoint's generation_config.json, read from
`GET /chat/defaults.json`.

The key: every request must carry `Authorization: Bearer KEY` (what the `openai` client sends for `api_key`), or is
answered 401 (the page and its defaults hold no secret: the page asks for the key). It is added to transformers' app before the first request; Starlette refuses a middleware added after
one, so a request that came first would stop this server rather than pass unchecked.
"""

import argparse
import hmac
import os
import sys
from pathlib import Path

from utils.chat import DEFAULT_SYSTEM_PROMPT
from utils.config import repo_path
from utils.errors import MissingInputError, run_main

CHAT_PAGE = Path(__file__).with_name("chat_page.html")
OPEN_PATHS = {"/health", "/chat", "/chat/defaults.json"}


def page_defaults(model_path: Path, key_required: bool) -> dict:
    """What the chat page starts with: the checkpoint's own decoding settings (temperature 0 = greedy)."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(model_path)
    except OSError:  # a folder saved without generation_config.json: transformers' defaults
        generation = GenerationConfig()
    return {"model": str(model_path), "system_prompt": DEFAULT_SYSTEM_PROMPT,
            "temperature": generation.temperature if generation.do_sample else 0,
            "top_p": generation.top_p, "repetition_penalty": generation.repetition_penalty,
            "max_tokens": generation.max_new_tokens or 512, "key_required": key_required}


def add_chat_page(app, defaults: dict) -> None:
    from starlette.responses import HTMLResponse, JSONResponse

    page = CHAT_PAGE.read_text(encoding="utf-8")
    app.add_route("/chat", lambda request: HTMLResponse(page), methods=["GET"])
    app.add_route("/chat/defaults.json", lambda request: JSONResponse(defaults), methods=["GET"])


def require_api_key(app, key: str) -> None:
    from starlette.responses import JSONResponse

    expected = f"Bearer {key}".encode()

    @app.middleware("http")
    async def check_key(request, call_next):
        if request.url.path not in OPEN_PATHS and not hmac.compare_digest(
                request.headers.get("authorization", "").encode(), expected):
            return JSONResponse({"error": {"message": "missing or wrong API key", "type": "invalid_request_error"}},
                                status_code=401)
        return await call_next(request)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="a checkpoint folder (results/pt, results/sft, ...)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", default=os.environ.get("MINI_QWEN_API_KEY"),
                        help="require `Authorization: Bearer KEY` (default: $MINI_QWEN_API_KEY; none: no key)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)
    model_path = Path(repo_path(args.model_path))
    if not (model_path / "config.json").is_file():
        raise MissingInputError(f"{model_path}: not a checkpoint folder (no config.json); train a stage first")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: nothing to fetch, and no hub to ask

    from transformers.cli.serve import Serve

    server = Serve(force_model=str(model_path), host=args.host, port=args.port, device=args.device,
                   log_level="info", non_blocking=True)
    app = server.server.config.app
    add_chat_page(app, page_defaults(model_path, key_required=bool(args.api_key)))
    if args.api_key:
        require_api_key(app, args.api_key)
    print(f"serving {model_path} at http://{args.host}:{args.port}/v1 (OpenAI API"
          f"{', key required' if args.api_key else ''}), chat page http://{args.host}:{args.port}/chat; "
          "Ctrl-C stops it", flush=True)
    try:
        server._thread.join()  # uvicorn runs in Serve's thread; the main thread waits for it (and for Ctrl-C)
    except KeyboardInterrupt:
        server.kill_server()


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
