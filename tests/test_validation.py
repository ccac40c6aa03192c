"""Every setting is checked when the command line is parsed: a bad value, an unknown flag or recipe key, or a second
--config stops each stage with one line naming the setting (exit 2), before any data or model is touched.

Each run points --data_files at a path that does not exist: a check that came only after the data step would stop
with that error instead, and the output and cache folders would exist."""

import pytest
import yaml

import mini_qwen_dpo
import mini_qwen_grpo
import mini_qwen_pt
import mini_qwen_rm
import mini_qwen_sft
from conftest import REPO, cpu_flags
from utils.errors import ConfigError, run_main

MAINS = {"pt": mini_qwen_pt.main, "sft": mini_qwen_sft.main, "dpo": mini_qwen_dpo.main, "rm": mini_qwen_rm.main,
         "grpo": mini_qwen_grpo.main}

BAD = [  # (stage, flags, what the one line must say)
    ("pt", ["--block_size", "0"], "--block_size 0: must be >= 2"),  # was a ZeroDivisionError while packing
    ("pt", ["--block_size", "abc"], "--block_size"),  # argparse's own message, without its usage block
    ("pt", ["--learning_rate", "-1"], "--learning_rate -1.0: must be > 0"),  # was torch's ValueError
    ("pt", ["--learning_rate", "nan"], "--learning_rate nan: must be > 0"),
    ("pt", ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be >= 1"),
    ("pt", ["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: must be >= 1"),
    ("pt", ["--max_steps", "0"], "--max_steps 0: must be -1 or >= 1"),
    ("pt", ["--num_train_epochs", "0"], "--num_train_epochs 0.0: must be > 0"),
    ("pt", ["--warmup_steps", "-1"], "--warmup_steps -1.0: must be >= 0"),
    ("pt", ["--weight_decay", "-0.1"], "--weight_decay -0.1: must be >= 0"),
    ("pt", ["--max_grad_norm", "-1"], "--max_grad_norm -1.0: must be >= 0"),
    ("pt", ["--adam_beta2", "1"], "--adam_beta2 1.0: must be in [0, 1)"),
    ("pt", ["--save_steps", "0"], "--save_steps 0.0: must be > 0"),
    ("pt", ["--seed", "-1"], "--seed -1: must be in [0, 4294967295]"),
    ("pt", ["--packing", "zigzag"], "--packing 'zigzag': must be one of concat, document, none"),
    ("pt", ["--min_kept_fraction", "1.5"], "--min_kept_fraction 1.5: must be in [0, 1]"),
    ("pt", ["--data_workers", "0"], "--data_workers 0: must be >= 1"),
    ("pt", ["--anomaly_min_history", "0"], "--anomaly_min_history 0: must be >= 1"),
    ("pt", ["--lora_dropout", "1"], "--lora_dropout 1.0: must be in [0, 1)"),
    ("pt", ["--blok_size", "32"], "unknown flag --blok_size: did you mean --block_size?"),
    ("pt", ["--config", str(REPO / "configs" / "demo_pt.yaml")], "--config given 2 times"),
    ("sft", ["--turns", "last"], "--turns 'last': must be one of all, first"),
    ("sft", ["--max_length", "0"], "--max_length 0: must be >= 1"),
    ("sft", ["--identity_repeat", "-1"], "--identity_repeat -1: must be >= 0"),
    ("sft", ["--lr_scheduler_type", "cosine_with_min"], "--lr_scheduler_type"),
    ("sft", ["--learnig_rate", "1e-4"], "unknown flag --learnig_rate: did you mean --learning_rate?"),
    ("dpo", ["--beta", "0"], "--beta 0.0: must be > 0"),
    ("dpo", ["--max_prompt_length", "0"], "--max_prompt_length 0: must be >= 1"),
    ("rm", ["--heldout_fraction", "1"], "--heldout_fraction 1.0: must be in (0, 1)"),
    ("dpo", ["--label_smoothing", "0.5"], "--label_smoothing 0.5: must be in [0, 0.5)"),
    ("dpo", ["--adam_beta1", "-0.1"], "--adam_beta1 -0.1: must be in [0, 1)"),
    ("grpo", ["--num_generations", "1"], "--num_generations 1: must be >= 2"),
    ("grpo", ["--temperature", "0"], "--temperature 0.0: must be > 0"),
    ("grpo", ["--top_p", "1.5"], "--top_p 1.5: must be in (0, 1]"),
    ("grpo", ["--beta", "-0.1"], "--beta -0.1: must be >= 0"),  # GRPO's beta may be 0 (no KL term); not below
    ("grpo", ["--max_completion_length", "0"], "--max_completion_length 0: must be >= 1"),
    ("grpo", ["--reward_wieghts", "1"], "unknown flag --reward_wieghts: did you mean --reward_weights?"),
]


def stop_line(stage, argv, capsys, tmp_path) -> str:
    """Run the stage's entry point as its script does; return its one `error:` line after checking that it
    exited 2 with no traceback and wrote nothing."""
    with pytest.raises(SystemExit) as stopped:
        run_main(MAINS[stage], argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    return lines[0]


def stage_flags(stage, tmp_path) -> list[str]:
    return ["--config", str(REPO / "configs" / f"demo_{stage}.yaml"), *cpu_flags(tmp_path / "out", tmp_path / "cache"),
            "--data_files", str(tmp_path / "no-such-data")]


@pytest.mark.parametrize("stage, flags, expected", BAD, ids=[f"{s}{''.join(f)}" for s, f, _ in BAD])
def test_a_bad_setting_stops_the_stage_with_one_line_before_any_work(stage, flags, expected, capsys, tmp_path):
    line = stop_line(stage, stage_flags(stage, tmp_path) + flags, capsys, tmp_path)
    assert expected in line, line


def test_the_same_flags_with_good_values_get_past_parsing(capsys, tmp_path):
    """The control for the table: without the bad value, the run stops at the missing data instead."""
    line = stop_line("pt", stage_flags("pt", tmp_path), capsys, tmp_path)
    assert "no-such-data" in line


def test_a_recipe_key_typo_and_a_missing_recipe_are_one_line(capsys, tmp_path):
    recipe = yaml.safe_load((REPO / "configs" / "demo_pt.yaml").read_text())
    recipe["lerning_rate"] = recipe.pop("learning_rate")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    flags = stage_flags("pt", tmp_path)[2:]
    line = stop_line("pt", [f"--config={tmp_path / 'recipe.yaml'}", *flags], capsys, tmp_path)
    assert "unknown key 'lerning_rate' in the --config recipe: did you mean learning_rate?" in line
    line = stop_line("pt", ["--config", str(tmp_path / "nope.yaml"), *flags], capsys, tmp_path)
    assert "nope.yaml: no such recipe file" in line


def test_eval_decoding_flags_are_checked_too():
    from mini_qwen_eval import parse_args
    from utils.validation import check_namespace

    check_namespace(parse_args(["--model_path", "x"]))  # the defaults pass
    for flags, expected in [(["--temperature", "0"], "--temperature 0.0: must be > 0"),
                            (["--top_p", "0"], "--top_p 0.0: must be in (0, 1]"),
                            (["--max_new_tokens", "0"], "--max_new_tokens 0: must be >= 1"),
                            (["--sweep_repetition_penalty", "1.1", "-1"], "--sweep_repetition_penalty -1.0")]:
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace("[", r"\[")):
            check_namespace(parse_args(["--model_path", "x", *flags]))
