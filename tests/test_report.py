"""Report cards: the config table's differences from the recipe, a stage card's sections and metrics (held-out bits
per byte through mini_qwen_eval's scorer, DPO rewards), and the pipeline card with its CLI. The card of a real PT
run is checked in test_throughput.py, next to the run's throughput logs."""

import json
import subprocess
import sys

from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

from conftest import REPO, TINY_CONFIG
from utils.config import repo_path
from utils.report import (HELDOUT_TEXT, config_rows, main, split_command_line, stage_summary,
                          write_stage_report)


def test_command_line_split_into_recipe_and_flags():
    argv = ["--config", "configs/demo_pt.yaml", "--data_files", "a", "b", "--bf16=false", "--prepare_only",
            "--logging_steps", "1", "--logging_steps", "2"]
    assert split_command_line(argv) == ("configs/demo_pt.yaml", {
        "data_files": "a b", "bf16": "false", "prepare_only": "true", "logging_steps": "2"})  # the last one wins
    assert split_command_line(["--max_steps", "3"]) == (None, {"max_steps": "3"})


def test_config_rows_mark_what_differs_from_the_recipe_and_where_it_came_from():
    recipe = {"learning_rate": 3e-3, "report_to": ["none"], "data_files": ["mini_data/pt"], "block_size": 128,
              "output_dir": "results/demo/pt", "bf16": False, "fp16": False}
    flags = {"learning_rate": "1e-3", "report_to": "none", "bf16": "false", "block_size": "64", "max_steps": "6"}
    args = TrainingArguments(output_dir=repo_path("results/demo/pt"), learning_rate=1e-3, report_to=["none"],
                             bf16=False, use_cpu=True, max_steps=6)
    args.fp16 = True  # what the stage does at start-up where bf16 is unsupported (utils.modeling)
    rows = {key: (in_recipe, run, source) for key, in_recipe, run, source in config_rows(recipe, flags, args)}
    assert list(rows) == [*recipe, "max_steps"]
    assert rows["learning_rate"] == ("0.003", "0.001", "command line")
    assert rows["block_size"] == ("128", "64", "command line")  # the stage's own argument: the flag as typed
    assert rows["max_steps"] == ("-1", "6", "command line")  # left out of the recipe: the field's default
    assert rows["fp16"] == ("false", "true", "start-up")
    # The same value typed again, a list given as words, a path anchored to the repository: no difference.
    assert rows["bf16"][2] == rows["report_to"][2] == rows["data_files"][2] == rows["output_dir"][2] == ""


def _history():
    """What two ranks log at steps 2, 4, 6, and the end-of-training summary."""
    return [{"step": step, "loss": loss, "tokens_seen": 512 * step, "tokens_per_second": tps,
             "tokens_per_second_per_device": tps / 2, "mfu": mfu, "peak_gpu_memory_gib": memory,
             "rewards/accuracies": accuracy, "rewards/margins": margin}
            for step, loss, tps, mfu, memory, accuracy, margin in [
                (2, 0.69, 1000.0, 0.30, 10.5, 0.25, 0.01), (4, 0.60, 1200.0, 0.35, 12.25, 0.5, 0.2),
                (6, 0.65, 1400.0, 0.40, 11.0, 0.75, 0.5)]] + [{"step": 6, "train_runtime": 3725.0}]


def test_dpo_card_holds_rewards_data_and_held_out_bits_per_byte(tmp_path, tokenizer, monkeypatch):
    from trl import DPOConfig

    from utils.metrics import heldout_metrics

    out = tmp_path / "dpo"
    out.mkdir()
    history = _history()
    (out / "trainer_state.json").write_text(json.dumps(
        {"global_step": 6, "max_steps": 6, "epoch": 1.0, "log_history": history}))
    (out / "data_report.json").write_text(json.dumps({
        "records": {"kept": 10, "skipped": {"prompt longer than max_prompt_length=128": 3},
                    "first_seen": {"prompt longer than max_prompt_length=128": "pairs.jsonl:4"}}, "tokens": 12345}))
    monkeypatch.setattr(sys, "argv", ["mini_qwen_dpo.py", "--config", str(REPO / "configs" / "demo_dpo.yaml"),
                                      "--beta", "0.2"])
    args = DPOConfig(output_dir=str(out), beta=0.2, use_cpu=True, report_to=["none"])
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_CONFIG))
    expected_bits = heldout_metrics(model.eval(), tokenizer, repo_path(HELDOUT_TEXT))["bits_per_byte"]

    report = write_stage_report(str(out), "dpo", args, model, tokenizer).read_text()
    summary = json.loads((out / "report.json").read_text())
    assert summary["heldout_bits_per_byte"] == expected_bits > 0
    assert f"held-out bits per byte (`{HELDOUT_TEXT}`): {expected_bits:.4f}" in report
    assert "- rewards/accuracies: start 0.25 (step 2), end 0.75 (step 6)" in report
    assert "- rewards/margins: start 0.01 (step 2), end 0.5 (step 6)" in report
    assert "- loss: start 0.69 (step 2), lowest 0.6 (step 4), end 0.65 (step 6)" in report
    assert "- tokens/s: mean 1200, last 1400 over 3 logging windows; per device mean 600, last 700" in report
    assert "- MFU: mean 35.0%, last 40.0%" in report and "- peak GPU memory: 12.25 GiB" in report
    assert "- tokens seen: 3,072 (3.1k)" in report and "- wall time of training: 1h02m (3725.0 s)" in report
    assert "- records: kept 10, skipped 3\n  - 3 prompt longer than max_prompt_length=128 (first at `pairs.jsonl:4`)" \
        in report and "- tokens: 12,345" in report
    assert "| **beta** | `0.1` | **`0.2`** | command line |" in report  # the recipe's 0.1
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert f"- git commit: {head.stdout.strip() if head.returncode == 0 else 'not a git repository'}" in report
    assert "mini_qwen_dpo.py --config" in report and "transformers 5." in report

    write_stage_report(str(out), "dpo", args)  # no model to score: said so, not invented
    assert "held-out bits per byte (`mini_data/heldout/heldout.txt`): not measured" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["heldout_bits_per_byte"] is None


def test_pipeline_card_links_the_stage_and_eval_reports(tmp_path):
    results = tmp_path / "results"
    for stage, bits in (("pt", 2.5), ("sft", 2.75)):
        (results / stage).mkdir(parents=True)
        summary = stage_summary({"global_step": 6, "max_steps": 6, "log_history": _history()}, stage, bits)
        (results / stage / "report.json").write_text(json.dumps(summary))
    (results / "eval").mkdir()
    (results / "eval" / "report.md").write_text("# eval\n")

    main(["pipeline", str(results)])
    card = (results / "report.md").read_text()
    assert "| pt | [pt/report.md](pt/report.md) | 6 | 3.1k | 0.65 | 2.5000 | 1200 | 35.0% |" in card
    assert "| sft | [sft/report.md](sft/report.md) | 6 | 3.1k | 0.65 | 2.7500 |" in card
    assert "| dpo | not run |" in card and "Evaluation: [eval/report.md](eval/report.md)" in card

    (results / "eval" / "report.md").unlink()
    command = subprocess.run([sys.executable, "-m", "utils.report", "pipeline", str(results)], cwd=REPO,
                             capture_output=True, text=True)
    assert command.returncode == 0, command.stderr[-2000:]
    assert "Evaluation: not run" in (results / "report.md").read_text()
