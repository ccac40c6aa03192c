"""The DPO stage's other losses and methods on the repo's preference pairs, each a recipe flag: TRL's DPO loss
family (alone and weighted together), ORPO, SimPO and KTO (from pairs, and from prompt/completion/label and
messages/label files); and the reward-model stage on the same pairs, with its held-out accuracy, that GRPO then uses
as a reward.

At the first step the policy is its own reference (DPO, KTO): every log-ratio is 0, so each family's loss has a value
of its own, from its formula; ORPO's and SimPO's losses are checked against the terms they log beside it."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, cpu_flags

BETA = 0.1


def run(method_flags: list[str], init_from, tmp_path, *extra: str, stage: str = "dpo") -> list[dict]:
    from mini_qwen_dpo import main as dpo
    from mini_qwen_rm import main as rm

    main, beta = (dpo, ["--beta", str(BETA)]) if stage == "dpo" else (rm, [])  # a reward model has no beta
    main(["--config", str(REPO / "configs" / f"demo_{stage}.yaml"), *cpu_flags(tmp_path / "out", tmp_path / "cache"),
          "--init_from", str(init_from), "--learning_rate", "1e-4", "--lr_scheduler_type", "constant",
          "--warmup_steps", "0", "--max_length", "128", "--save_strategy", "no", *beta, *method_flags, *extra])
    return json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]


def moved(before_dir, after_dir) -> float:
    before, after = load_file(before_dir / "model.safetensors"), load_file(after_dir / "model.safetensors")
    return sum(int((before[k] != after[k]).sum()) for k in before) / sum(t.numel() for t in before.values())


def log_sigmoid(x: float) -> float:
    return float(torch.nn.functional.logsigmoid(torch.tensor(x, dtype=torch.float64)))


@pytest.mark.parametrize("loss_flags, first_loss", [
    (["--loss_type", "hinge"], 1.0),                                  # relu(1 - beta * 0)
    (["--loss_type", "ipo"], (1 / (2 * BETA)) ** 2),                  # (0 - 1 / (2 beta))^2
    (["--loss_type", "robust", "--label_smoothing", "0.2"], math.log(2)),
    (["--loss_type", "sigmoid", "hinge", "--loss_weights", "0.8", "0.2"], 0.8 * math.log(2) + 0.2),
], ids=["hinge", "ipo", "robust", "sigmoid+hinge"])
def test_dpo_loss_family(sft_checkpoint, tmp_path, loss_flags, first_loss):
    history = run(loss_flags, sft_checkpoint, tmp_path, "--per_device_train_batch_size", "2", "--max_steps", "2")
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[0] == pytest.approx(first_loss, rel=1e-5) and losses[1] != losses[0]
    assert moved(sft_checkpoint, tmp_path / "out") > 0.9


def test_orpo_loss_is_nll_minus_beta_log_odds_ratio(sft_checkpoint, tmp_path):
    history = run(["--method", "orpo"], sft_checkpoint, tmp_path, "--per_device_train_batch_size", "2",
                  "--max_steps", "2")
    first = next(entry for entry in history if "loss" in entry)
    assert first["loss"] == pytest.approx(first["nll_loss"] - BETA * first["log_odds_ratio"], rel=1e-4)
    assert moved(sft_checkpoint, tmp_path / "out") > 0.9
    assert json.loads((tmp_path / "out" / "mini_qwen_stage.json").read_text()) == {"stage": "orpo"}


def test_simpo_loss_is_the_margin_minus_gamma_without_nll(sft_checkpoint, tmp_path):
    history = run(["--method", "simpo", "--simpo_gamma", "0.5"], sft_checkpoint, tmp_path,
                  "--per_device_train_batch_size", "1", "--max_steps", "2")
    first = next(entry for entry in history if "loss" in entry)
    # one pair per step: -log sigmoid(beta * (mean log p chosen - mean log p rejected) - gamma), CPO's NLL off
    assert first["loss"] == pytest.approx(-log_sigmoid(first["rewards/margins"] - 0.5), rel=1e-4)
    assert first["nll_loss"] == 0
    assert moved(sft_checkpoint, tmp_path / "out") > 0.9


def test_kto_reads_labelled_replies_and_starts_at_half(sft_checkpoint, tmp_path):
    from utils.formats import load_records

    pairs, _ = load_records(str(REPO / "mini_data" / "dpo"), "dpo")
    data = tmp_path / "kto"
    data.mkdir()
    # TRL's unpaired shape, in its two spellings: prompt/completion/label and messages/label
    (data / "prompt_completion.jsonl").write_text("".join(json.dumps(
        {"prompt": pair["prompt"][-1]["content"], "completion": pair[side][0]["content"], "label": side == "chosen"},
        ensure_ascii=False) + "\n" for pair in pairs[:10] for side in ("chosen", "rejected")))
    (data / "messages.jsonl").write_text("".join(json.dumps(
        {"messages": pair["prompt"] + pair[side], "label": "true" if side == "chosen" else "false"},
        ensure_ascii=False) + "\n" for pair in pairs[10:20] for side in ("chosen", "rejected")))
    history = run(["--method", "kto", "--data_files", str(data)], sft_checkpoint, tmp_path,
                  "--per_device_train_batch_size", "4", "--max_steps", "2")
    first = next(entry for entry in history if "loss" in entry)
    assert first["loss"] == pytest.approx(0.5, rel=1e-5) and first["kl"] == 0  # 1 - sigmoid(beta * (0 - 0))
    assert moved(sft_checkpoint, tmp_path / "out") > 0.9
    (report_file,) = (tmp_path / "cache").glob("kto-*/report.json")
    assert json.loads(report_file.read_text())["records"]["kept"] == 40


def test_reward_model_reports_heldout_accuracy_and_scores_grpo(sft_checkpoint, tmp_path):
    from mini_qwen_grpo import main as grpo

    history = run(["--heldout_fraction", "0.2"], sft_checkpoint, tmp_path / "rm",
                  "--per_device_train_batch_size", "4", "--max_steps", "4", stage="rm")
    evaluations = [entry["eval_accuracy"] for entry in history if "eval_accuracy" in entry]
    assert len(evaluations) == 2  # before and after training, on the same held-out pairs
    report = json.loads((tmp_path / "rm" / "out" / "report.json").read_text())
    assert report["heldout_accuracy"]["end"] == evaluations[-1] and report["heldout_bits_per_byte"] is None
    assert "accuracy on held-out pairs" in (tmp_path / "rm" / "out" / "report.md").read_text()
    config = json.loads((tmp_path / "rm" / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and len(config["id2label"]) == 1

    grpo(["--config", str(REPO / "configs" / "demo_grpo.yaml"), *cpu_flags(tmp_path / "grpo", tmp_path / "cache"),
          "--init_from", str(sft_checkpoint), "--max_steps", "1", "--max_completion_length", "8",
          "--reward_funcs", "answer_format", str(tmp_path / "rm" / "out"), "--reward_weights", "0", "1"])
    (logged,) = [entry for entry in json.loads((tmp_path / "grpo" / "trainer_state.json").read_text())["log_history"]
                 if "reward" in entry]
    (model_key,) = [key for key in logged if key.startswith("rewards/") and key.endswith("/mean")
                    and "answer_format" not in key]
    assert logged["reward"] == pytest.approx(logged[model_key], abs=1e-6) and logged["reward"] != 0
