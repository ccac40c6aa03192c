"""The launch paths users run: accelerate + DeepSpeed ZeRO-2 with the repo's configs, and run.sh."""

import shutil
import subprocess

from conftest import REPO, skip_without


def test_shell_scripts_parse_and_pass_shellcheck():
    for script in ("run.sh", "prepare.sh", ".ci/run"):
        assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0, script
    if shutil.which("shellcheck") is None:
        skip_without("shellcheck not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", "run.sh", "prepare.sh", ".ci/run"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_run_sh_rejects_unknown_commands_and_bad_gpu_counts():
    unknown = subprocess.run(["bash", str(REPO / "run.sh"), "train"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown command 'train'" in unknown.stderr
    bad_gpus = subprocess.run(["bash", str(REPO / "run.sh"), "pt", "--gpus", "zero"], capture_output=True, text=True)
    assert bad_gpus.returncode == 2 and "--gpus needs a positive number" in bad_gpus.stderr


def test_run_sh_lean_pretrains_with_the_lean_recipe(tmp_path):
    # The lean recipe's bf16 weights without stochastic rounding are refused at start-up, before any data is read:
    # the refusal shows run.sh passed configs/pt_lean.yaml.
    result = subprocess.run(["bash", str(REPO / "run.sh"), "pt", "--lean", "--stochastic_rounding", "false", "--bf16",
                             "false", "--use_cpu", "true", "--output_dir", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "weights_dtype bfloat16 with optim" in result.stderr and "would round small updates away" in result.stderr


def test_gpu_check_rows_parse_as_the_stages_read_them(tmp_path):
    """run.sh gpu-check needs a GPU; its stage commands' flags are checked here through each PT row's memory plan,
    which parses every flag the training row passes and builds no model."""
    from tools.gpu_check import command_rows

    rows = dict(command_rows(tmp_path))
    assert {"fa2 packing", "dpo zero2 bf16, 5 steps", "pt single", "pt zero2 liger"} <= set(rows)
    for launcher in ("single", "zero2"):
        result = subprocess.run(rows[f"pt {launcher} plan"], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"{launcher} on 1 x H100" in result.stdout and "| **total** |" in result.stdout
    listed = subprocess.run(["bash", str(REPO / "run.sh"), "gpu-check", "--dry_run"], capture_output=True, text=True)
    assert listed.returncode == 0 and listed.stdout.count("\n") == len(rows)
