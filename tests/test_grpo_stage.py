"""The GRPO stage on the repo's bilingual math problems: a tiny model, fine-tuned on those problems first (the recipe:
GRPO starts from an SFT checkpoint), raises its mean reward within a few steps; each reward is logged on its own;
the run ends with the final model, loss.png and a report. The built-in rewards and the problem loader on their own."""

import json

import pytest

from conftest import REPO, cpu_flags
from utils.formats import load_records
from utils.rewards import answer_format, correct_answer, final_number, resolve_reward_funcs


def digit_share(completions, **kwargs) -> list[float]:
    """A reward a tiny model learns in a few steps (more digits in the answer), used through `module:function`."""
    texts = [completion[0]["content"] for completion in completions]
    return [sum(char.isdigit() for char in text) / max(len(text), 1) for text in texts]


@pytest.fixture(scope="module")
def math_sft_checkpoint(pt_checkpoint, tmp_path_factory):
    from mini_qwen_sft import main

    root = tmp_path_factory.mktemp("math_sft")
    problems, _ = load_records(str(REPO / "mini_data" / "grpo"), "grpo")
    solutions = [json.loads(line) for path in sorted((REPO / "mini_data" / "grpo").glob("*.jsonl"))
                 for line in path.read_text().splitlines()]
    assert len(solutions) == len(problems)
    (root / "math.jsonl").write_text("".join(json.dumps({"prompt": row["question"], "response": row["answer"]},
                                                        ensure_ascii=False) + "\n" for row in solutions))
    main(["--config", str(REPO / "configs" / "demo_sft.yaml"), *cpu_flags(root / "out", root / "cache"),
          "--init_from", str(pt_checkpoint), "--data_files", str(root / "math.jsonl"), "--identity_file", "",
          "--learning_rate", "5e-3", "--max_steps", "30", "--save_strategy", "no"])
    return root / "out"


def test_mean_reward_rises_and_each_reward_is_logged(math_sft_checkpoint, tmp_path):
    from mini_qwen_grpo import main

    out = tmp_path / "out"
    main(["--config", str(REPO / "configs" / "demo_grpo.yaml"), *cpu_flags(out, tmp_path / "cache"),
          "--init_from", str(math_sft_checkpoint), "--logging_steps", "2", "--max_steps", "8",
          "--learning_rate", "5e-3", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
          "--max_completion_length", "16",
          # only the learnable reward counts; the two built-in ones are logged beside it
          "--reward_funcs", "test_grpo_stage:digit_share", "answer_format", "correct_answer",
          "--reward_weights", "1", "0", "0"])

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "reward" in entry]
    assert len(logged) == 4
    for name in ("digit_share", "answer_format", "correct_answer"):
        assert all(f"rewards/{name}/mean" in entry for entry in logged)
    # generation timed apart from training (utils/throughput.py): both throughputs, and the share generating
    assert all(entry["generation_tokens_per_second_per_device"] > 0 and entry["tokens_per_second"] > 0
               and 0 < entry["generation_time_fraction"] < 1 for entry in logged)
    # weights 1, 0, 0: the mean reward is the digit share's
    assert all(entry["reward"] == pytest.approx(entry["rewards/digit_share/mean"], abs=1e-6) for entry in logged)
    assert logged[-1]["reward"] > logged[0]["reward"] + 0.1, [entry["reward"] for entry in logged]

    assert (out / "loss.png").stat().st_size > 10_000 and (out / "model.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["stage"] == "grpo" and report["rewards"]["reward"]["end"] == logged[-1]["reward"]
    assert "rewards/digit_share/mean" in (out / "report.md").read_text()


def test_rewards_score_the_final_number_and_the_format():
    completions = [[{"role": "assistant", "content": text}] for text in (
        "3 + 4 = 7\n#### 7", "7 apples", "#### 8", "the answer is seven", "#### 1,234.0\n", "#### 7\nmore text")]
    assert correct_answer(completions, answer=["7", "7", "7", "7", "1234", "7"]) == [1, 0, 0, 0, 1, 1]
    assert answer_format(completions) == [1, 0.25, 1, 0, 0.25, 0.25]  # "1,234.0": a number, not the plain form
    assert final_number("总共8+3=11元。\n#### 11") == 11.0 and final_number("11 元") is None


def test_reward_funcs_resolve_names_imports_and_reward_models(sft_checkpoint):
    from utils.errors import ConfigError

    assert resolve_reward_funcs(["correct_answer", "test_grpo_stage:digit_share", str(sft_checkpoint)]) == [
        correct_answer, digit_share, str(sft_checkpoint)]
    with pytest.raises(ConfigError, match="unknown reward function 'exact'"):
        resolve_reward_funcs(["exact"])
    with pytest.raises(ConfigError, match="test_grpo_stage:nothing"):
        resolve_reward_funcs(["test_grpo_stage:nothing"])


def test_problems_load_in_both_shapes(tmp_path):
    problems, skipped = load_records(str(REPO / "mini_data" / "grpo"), "grpo")
    assert len(problems) == 80 and not skipped.skipped
    assert sum(any("\u4e00" <= char <= "\u9fff" for char in row["question"]) for row in problems) == 40
    # GSM8K_zh's shape: the Chinese question, the final number alone, both splits in one file
    (tmp_path / "gsm8k_zh.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in [
        {"question": "Tom has 3 apples.", "answer": "#### 3", "question_zh": "汤姆有3个苹果。", "answer_zh": "3个",
         "answer_only": "3", "split": "train"},
        {"question": "x", "answer": "#### 1", "question_zh": "测试题", "answer_zh": "1", "answer_only": "1",
         "split": "test"},
        {"question": "y", "answer": "y", "question_zh": "没有答案", "answer_zh": "?", "answer_only": "?",
         "split": "train"}]))
    rows, counter = load_records(str(tmp_path / "gsm8k_zh.jsonl"), "grpo")
    assert rows == [{"question": "汤姆有3个苹果。", "answer": "3", "system": None}]
    assert counter.skipped == {"not the train split (test)": 1,
                               "answer has no final number (a last line '#### <number>', or a number alone)": 1}


def test_grpo_with_lora_trains_adapters_only(math_sft_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from mini_qwen_grpo import main

    out = tmp_path / "lora"
    main(["--config", str(REPO / "configs" / "demo_grpo.yaml"), *cpu_flags(out, tmp_path / "cache"),
          "--init_from", str(math_sft_checkpoint), "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8",
          "--learning_rate", "1e-2", "--max_steps", "2", "--max_completion_length", "8",
          "--reward_funcs", "test_grpo_stage:digit_share", "--reward_weights", "1"])
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert not (out / "model.safetensors").exists()  # adapters only; `python -m utils.lora merge` joins them
    adapters = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in adapters.items())  # B starts at 0
