"""Evaluation: chat with a checkpoint, compare checkpoints side by side, measure repetition and perplexity.

    # interactive chat (SFT/DPO checkpoints): streamed tokens, multi-turn history, /reset, /exit; a reply's
    # <think> block is shown apart as 思考 · thinking, its <tool_call> blocks as parsed calls
    python mini_qwen_eval.py --model_path results/sft --system "你是一个乐于助人的助手。"
    # continue raw text with a pretraining checkpoint
    python mini_qwen_eval.py --model_path results/pt --mode pt
    # batch report: default prompts, several checkpoints, Markdown + JSON in --output_dir
    python mini_qwen_eval.py --model_path results/pt results/sft results/dpo --prompts default
    # the effect of the repetition penalty (the original evaluated greedy with none)
    python mini_qwen_eval.py --model_path results/sft --prompts default --greedy --sweep_repetition_penalty 1.0 1.1 1.3
    # held-out loss and bits per byte on text the model never saw
    python mini_qwen_eval.py --model_path results/pt --eval_text heldout.txt
    # benchmarks through lm-evaluation-harness (C-Eval val, CMMLU, MMLU, GSM8K from prepare.sh's folders), side by side
    python mini_qwen_eval.py --model_path results/pt results/sft results/dpo --benchmarks ceval,cmmlu,mmlu
    # 5-shot, chat template, a quick look: two subjects, 20 questions each; NAME=PATH for data elsewhere
    python mini_qwen_eval.py --model_path results/sft --benchmarks ceval,mmlu=data/eval/mmlu/val --shots 5 \
        --chat_template --subjects computer_network,abstract_algebra --limit 20
    # GSM8K exact match for a GRPO checkpoint (a folder with *train* and *test* files, or one file with --shots 0)
    python mini_qwen_eval.py --model_path results/grpo --benchmarks gsm8k=mini_data/grpo/math_en.jsonl --shots 0

In chat, typing the two characters \\n inserts a line break (a terminal sends them literally; seed FAQ 16).
Decoding defaults come from the checkpoint's generation_config; every flag overrides them.
Benchmarks follow lm-eval's own protocol (utils/eval_harness.py); they write <output_dir>/benchmarks/report.md.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from threading import Thread

# Checkpoints and benchmark data are local: nothing here may reach a hub (set before huggingface_hub is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import utils  # noqa: E402, F401  (first of the project: it silences import-time noise, see utils/__init__.py)
import torch  # noqa: E402
from transformers import GenerationConfig, TextIteratorStreamer  # noqa: E402

from utils import eval_harness  # noqa: E402
from utils.chat import AssistantStream  # noqa: E402
from utils.checkpoint import STAGE_FILE  # noqa: E402
from utils.config import repo_path  # noqa: E402
from utils.errors import ConfigError, MissingInputError, run_main  # noqa: E402
from utils.files import DataError  # noqa: E402
from utils.metrics import heldout_metrics, repetition_report  # noqa: E402
from utils.modeling import load_checkpoint  # noqa: E402
from utils.report import pipeline_report
from utils.validation import check_namespace  # noqa: E402

# The original's four prompts, and a few more in both languages.
DEFAULT_PROMPTS = [
    "李白是谁", "绿豆糕", "who are you?", "tell me a story",
    "请介绍一下长城的历史。", "如何做一道西红柿炒鸡蛋？", "Explain what a hash table is.",
    "Write a short poem about autumn.",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", nargs="+", required=True, help="checkpoint folder(s)")
    parser.add_argument("--mode", choices=["auto", "chat", "pt"], default="auto",
                        help="chat: use the chat template; pt: continue raw text; auto: from the stage that made "
                             "the checkpoint (pt for pretraining checkpoints, else chat)")
    parser.add_argument("--system", default=None, help="system prompt for chat mode")
    # batch mode
    parser.add_argument("--prompts", default=None,
                        help="'default' or a file with one prompt per line (a .jsonl file: {\"prompt\": ...} per "
                             "line); without it, an interactive session starts")
    parser.add_argument("--output_dir", default="results/eval", help="where the batch report is written")
    parser.add_argument("--sweep_repetition_penalty", type=float, nargs="+", default=None,
                        help="run the batch once per value, e.g. 1.0 1.1 1.3")
    parser.add_argument("--pipeline_report", default=None, metavar="RESULTS_DIR",
                        help="then write RESULTS_DIR/report.md linking its stage reports and this one (run.sh all)")
    parser.add_argument("--eval_text", default=None, help="held-out text file: report loss and bits per byte")
    # benchmarks (lm-evaluation-harness)
    bench = parser.add_argument_group("benchmarks, through lm-evaluation-harness (utils/eval_harness.py)")
    bench.add_argument("--benchmarks", default=None, metavar="NAME[=PATH],...",
                       help="ceval, cmmlu, mmlu, gsm8k, comma-separated; PATH: the evaluated split's folder of "
                            "per-subject CSVs, few-shot rows from a `dev` folder beside it (default: "
                            + ", ".join(f"{n} {b.default_data}" for n, b in eval_harness.BENCHMARKS.items())
                            + "; gsm8k: a file, or a folder of *test* and *train* files)")
    bench.add_argument("--shots", type=int, default=None,
                       help="few-shot examples per question (default: lm-eval's, 0; gsm8k 5)")
    bench.add_argument("--subjects", default=None, help="comma-separated subjects, e.g. computer_network,virology")
    bench.add_argument("--limit", type=int, default=None, help="the first N questions of each subject")
    bench.add_argument("--batch_size", default=None,
                       help="prompts per forward pass, or auto: the most that fit (lm-eval's search; the default on a "
                            "GPU). Default on a CPU: 1, as fast there as 4 or 8 and the least memory: lm-eval holds "
                            "batch x prompt tokens x 151,936 log-probabilities (docs/BENCHMARKS.md)")
    bench.add_argument("--chat_template", action="store_true",
                       help="wrap prompts in the checkpoint's chat template, shots as earlier turns (lm-eval's "
                            "--apply_chat_template); default: plain prompts, as published base-model scores")
    bench.add_argument("--dtype", default="auto", help="auto (the checkpoint's) | float32 | bfloat16 | float16")
    # decoding (defaults: the checkpoint's generation_config)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top_p", type=float)
    parser.add_argument("--top_k", type=int)
    parser.add_argument("--repetition_penalty", type=float)
    parser.add_argument("--no_repeat_ngram_size", type=int)
    parser.add_argument("--max_new_tokens", type=int, default=256, help="also gsm8k's (lm-eval's max_gen_toks)")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed, for reports that can be repeated")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return parser.parse_args(argv)


def checkpoint_mode(path: str, requested: str) -> str:
    if requested != "auto":
        return requested
    stage_file = Path(path) / STAGE_FILE
    stage = json.loads(stage_file.read_text())["stage"] if stage_file.is_file() else "chat"
    return "pt" if stage == "pt" else "chat"


def decoding_config(model, args, repetition_penalty=None) -> GenerationConfig:
    config = GenerationConfig.from_dict(model.generation_config.to_dict())
    overrides = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                 "repetition_penalty": repetition_penalty or args.repetition_penalty,
                 "no_repeat_ngram_size": args.no_repeat_ngram_size, "max_new_tokens": args.max_new_tokens}
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    if args.greedy:
        config.do_sample = False
        config.temperature = config.top_p = config.top_k = None
    return config


def encode(tokenizer, mode: str, history: list[dict], text: str):
    if mode == "pt":
        return tokenizer(text, return_tensors="pt")
    return tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def generate(model, tokenizer, inputs, config: GenerationConfig, streamer=None) -> tuple[str, int, float]:
    """Returns (text, new tokens, seconds)."""
    inputs = inputs.to(model.device)
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, generation_config=config, streamer=streamer)
    seconds = time.perf_counter() - start
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new_tokens, skip_special_tokens=True), len(new_tokens), seconds


THINKING, ANSWER, TOOL_CALL = "[思考 · thinking] ", "\n[回答 · answer] ", "\n[工具调用 · tool call] "


def show_reply(pieces) -> dict:
    """Print a streamed chat reply as it comes, its thinking apart from its answer and its tool calls parsed, as the
    server parses them (utils.chat.AssistantStream); return it as the assistant message the history keeps, which
    the chat template renders as the model wrote it."""
    stream, reply = AssistantStream(), {"reasoning_content": "", "content": ""}

    def show(thought: str, text: str) -> None:
        if thought:
            print(("" if reply["reasoning_content"] else THINKING) + thought, end="", flush=True)
            reply["reasoning_content"] += thought
        if text:
            print((ANSWER if reply["reasoning_content"] and not reply["content"] else "") + text, end="", flush=True)
            reply["content"] += text

    for piece in pieces:
        show(*stream.feed(piece))
    *rest, calls = stream.finish()
    show(*rest)
    for call in calls:
        print(f"{TOOL_CALL}{call['function']['name']} {call['function']['arguments']}", end="", flush=True)
    reasoning = reply.pop("reasoning_content")
    return {"role": "assistant", **reply, **({"reasoning_content": reasoning} if reasoning else {}),
            **({"tool_calls": calls} if calls else {})}


def interactive(model, tokenizer, mode: str, args):
    config = decoding_config(model, args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    print(f"mode={mode}; /reset clears the history, /exit quits; type \\n for a line break", flush=True)
    while True:
        try:
            line = input("user> ")
        except EOFError:
            break
        command = line.strip()
        if command == "/exit":
            break
        if command == "/reset":
            history = list(system)
            print("[history cleared]", flush=True)
            continue
        if not command:
            continue
        text = line.replace("\\n", "\n")
        history.append({"role": "user", "content": text})
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        inputs = encode(tokenizer, mode, history, text).to(model.device)
        worker = Thread(target=model.generate, kwargs=dict(**inputs, generation_config=config, streamer=streamer))
        worker.start()
        print("assistant> ", end="", flush=True)
        if mode == "pt":
            for piece in streamer:
                print(piece, end="", flush=True)
            history = list(system)  # raw continuation has no dialogue to remember
        else:
            history.append(show_reply(streamer))
        worker.join()
        print(flush=True)


def read_prompts(spec: str) -> list[str]:
    if spec == "default":
        return DEFAULT_PROMPTS
    path = Path(repo_path(spec))
    if not path.is_file():
        raise MissingInputError(f"{spec}: no such prompts file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        return [jsonl_prompt(path, number, line) for number, line in enumerate(lines, 1) if line.strip()]
    return [line.replace("\\n", "\n") for line in lines if line.strip()]


def jsonl_prompt(path: Path, number: int, line: str) -> str:
    try:
        prompt = json.loads(line)["prompt"]
    except (ValueError, TypeError, KeyError):
        raise DataError(f'{path}:{number}: expected a JSON object with a "prompt" string') from None
    if not isinstance(prompt, str):
        raise DataError(f'{path}:{number}: "prompt" is {type(prompt).__name__}, not a string')
    return prompt


def batch_report(models: list[str], args) -> dict:
    prompts = read_prompts(args.prompts)
    penalties = args.sweep_repetition_penalty or [None]
    report = {"prompts": prompts, "runs": []}
    for path in models:
        model, tokenizer = load_checkpoint(path, args.device)
        mode = checkpoint_mode(path, args.mode)
        for penalty in penalties:
            config = decoding_config(model, args, penalty)
            torch.manual_seed(args.seed)
            outputs, new_tokens, seconds = [], 0, 0.0
            for prompt in prompts:
                history = ([{"role": "system", "content": args.system}] if args.system else []) + [
                    {"role": "user", "content": prompt}]
                text, count, spent = generate(model, tokenizer, encode(tokenizer, mode, history, prompt), config)
                outputs.append({"prompt": prompt, "output": text, "repetition": repetition_report(text)})
                new_tokens, seconds = new_tokens + count, seconds + spent
            run = {"model": path, "mode": mode, "outputs": outputs,
                   "decoding": {k: v for k, v in config.to_diff_dict().items()
                                if not k.endswith("token_id") and k != "transformers_version"},
                   "tokens_per_second": new_tokens / seconds if seconds else 0.0,
                   "looping_share": sum(o["repetition"]["looping"] for o in outputs) / len(outputs),
                   "mean_distinct_2": sum(o["repetition"]["distinct_2"] for o in outputs) / len(outputs)}
            if args.eval_text:
                run["heldout"] = heldout_metrics(model, tokenizer, repo_path(args.eval_text))
            report["runs"].append(run)
            print(f"{path} (rp={config.repetition_penalty}): looping {run['looping_share']:.0%}, "
                  f"distinct-2 {run['mean_distinct_2']:.2f}, {run['tokens_per_second']:.1f} tokens/s", flush=True)
    return report


def to_markdown(report: dict) -> str:
    lines = ["# mini_qwen evaluation report", "", "| run | mode | decoding | tokens/s | looping | distinct-2 | held-out bpb |",
             "|---|---|---|---|---|---|---|"]
    for index, run in enumerate(report["runs"]):
        decoding = ", ".join(f"{k}={v}" for k, v in sorted(run["decoding"].items()))
        bpb = f"{run['heldout']['bits_per_byte']:.3f}" if "heldout" in run else "-"
        lines.append(f"| {index}: `{run['model']}` | {run['mode']} | {decoding} | {run['tokens_per_second']:.1f} | "
                     f"{run['looping_share']:.0%} | {run['mean_distinct_2']:.2f} | {bpb} |")
    for prompt_index, prompt in enumerate(report["prompts"]):
        lines += ["", f"## {prompt}", ""]
        for index, run in enumerate(report["runs"]):
            output = run["outputs"][prompt_index]
            flag = " **[looping]**" if output["repetition"]["looping"] else ""
            text = output["output"].replace("\n", " ⏎ ")
            lines.append(f"- run {index}{flag}: {text}")
    return "\n".join(lines) + "\n"


def run_benchmarks(models: list[str], args) -> None:
    batch_size = args.batch_size or ("1" if args.device == "cpu" else "auto")
    settings = eval_harness.Settings(args.shots, args.limit, batch_size, args.chat_template, args.device, args.dtype,
                                     args.max_new_tokens)
    output_dir = Path(repo_path(args.output_dir)) / "benchmarks"
    eval_harness.run(models, args.benchmarks, output_dir, args.subjects.split(",") if args.subjects else None,
                     settings)
    print(f"benchmark report written to {output_dir / 'report.md'} and report.json")


def main(argv=None):
    args = parse_args(argv)
    check_namespace(args)  # ranges of the decoding flags, before any model loads
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    models = [repo_path(path) for path in args.model_path]
    if args.benchmarks:  # first: its data checks come before any model loads
        run_benchmarks(models, args)
    if args.prompts is not None:
        report = batch_report(models, args)
        output_dir = Path(repo_path(args.output_dir))
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2))
        (output_dir / "report.md").write_text(to_markdown(report))
        print(f"report written to {output_dir / 'report.md'} and report.json")
    elif args.eval_text is not None:
        for path in models:
            model, tokenizer = load_checkpoint(path, args.device)
            print(json.dumps({"model": path, **heldout_metrics(model, tokenizer, repo_path(args.eval_text))}))
    elif not args.benchmarks:
        if len(models) != 1:
            raise ConfigError("interactive chat takes one --model_path; use --prompts for a comparison")
        model, tokenizer = load_checkpoint(models[0], args.device)
        interactive(model, tokenizer, checkpoint_mode(models[0], args.mode), args)
        return
    if args.pipeline_report:
        print(f"wrote {pipeline_report(repo_path(args.pipeline_report))}")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
