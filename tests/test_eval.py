"""The evaluator: interactive chat through a pipe (a reply's thinking and tool calls shown apart), batch reports
with repetition metrics, held-out bits per byte."""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO, ScriptedModel, chatml


def test_interactive_chat_two_turns_reset_and_exit(sft_checkpoint):
    session = "你好\\n再见\nsecond turn\n/reset\nafter reset\n/exit\nnever read\n"
    result = subprocess.run(
        [sys.executable, str(REPO / "mini_qwen_eval.py"), "--model_path", str(sft_checkpoint), "--max_new_tokens", "4",
         "--system", "You are a test."], input=session, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mode=chat" in result.stdout
    assert result.stdout.count("assistant> ") == 3  # two turns, then one after /reset; nothing after /exit
    assert "[history cleared]" in result.stdout
    assert result.stdout.count("user> ") == 5


def test_chat_shows_thinking_and_tool_calls_apart_and_keeps_them_in_the_history(sft_checkpoint, monkeypatch, capsys):
    """Replies a tiny model never writes, from a ScriptedModel: the thinking shown as its own section, a call
    parsed as the server parses it, and the next prompt holding both as the model wrote them."""
    import mini_qwen_eval
    from utils.formats import normalize_sft
    from utils.modeling import load_checkpoint

    record = json.loads((REPO / "mini_data" / "sft_tools" / "openai_messages.jsonl").read_text().splitlines()[0])
    raw, training = record["messages"], normalize_sft(record)["messages"]
    model, tokenizer = load_checkpoint(str(sft_checkpoint), "cpu")
    model = ScriptedModel(model, tokenizer, [training[2]["content"], training[4]["content"]])
    questions = iter(["Umbrella in Paris?", "So?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt: print(prompt, end="") or next(questions))
    mini_qwen_eval.interactive(model, tokenizer, "chat", mini_qwen_eval.parse_args(["--model_path", "x"]))
    answers = capsys.readouterr().out.split("assistant> ")[1:]
    assert answers[0] == (f"[思考 · thinking] {raw[2]['reasoning_content']}\n"
                          '[工具调用 · tool call] get_weather {"city": "Paris"}\nuser> ')
    assert answers[1] == (f"[思考 · thinking] {raw[4]['reasoning_content']}\n[回答 · answer] {raw[4]['content']}\n"
                          "user> ")
    assert tokenizer.decode(model.prompts[1]) == chatml([{"role": "user", "content": "Umbrella in Paris?"},
                                                         training[2], {"role": "user", "content": "So?"}]) + \
        "<|im_start|>assistant\n"


def test_batch_report_compares_checkpoints_with_metrics(pt_checkpoint, sft_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("李白是谁\ntell me a story\n")
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("床前明月光，疑是地上霜。举头望明月，低头思故乡。 The quick brown fox jumps over the lazy dog.")
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, str(REPO / "mini_qwen_eval.py"), "--model_path", str(pt_checkpoint), str(sft_checkpoint),
         "--prompts", str(prompts), "--max_new_tokens", "6", "--greedy", "--sweep_repetition_penalty", "1.0", "1.3",
         "--eval_text", str(heldout), "--output_dir", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert [run["mode"] for run in report["runs"]] == ["pt", "pt", "chat", "chat"]  # from mini_qwen_stage.json
    assert [run["decoding"]["repetition_penalty"] for run in report["runs"]] == [1.0, 1.3, 1.0, 1.3]
    for run in report["runs"]:
        assert run["decoding"]["do_sample"] is False
        assert len(run["outputs"]) == 2 and run["tokens_per_second"] > 0
        assert set(run["outputs"][0]["repetition"]) >= {"distinct_1", "distinct_2", "repeated_4gram_share",
                                                        "longest_repeat_chars", "looping"}
    # bits per byte by its definition: the summed next-token loss in bits over the UTF-8 bytes it predicts (all but
    # the first token's)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = heldout.read_text()
    for checkpoint, runs in ((pt_checkpoint, report["runs"][:2]), (sft_checkpoint, report["runs"][2:])):
        model, tokenizer = AutoModelForCausalLM.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
        with torch.no_grad():
            nats = model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        predicted_bytes = len(text.encode()) - len(tokenizer.decode(ids[0, :1]).encode())
        for run in runs:
            assert run["heldout"]["bits_per_byte"] == pytest.approx(nats / math.log(2) / predicted_bytes, rel=1e-4)
    markdown = (out / "report.md").read_text()
    assert "## 李白是谁" in markdown and markdown.count("- run ") == 8
