"""The library internals the repo uses are probed (utils.compat): present on the locked versions, one line and exit 2
when gone; the DPO stage's own tokenization is exactly TRL's; the lock tool's wheel plan follows constraints.txt."""

import importlib
from types import SimpleNamespace

import pytest
from datasets import Dataset

from conftest import REPO, cpu_flags
from tools import deps
from utils import compat
from utils.errors import ConfigError, run_main
from utils.formats import load_records
from utils.prepare import UnitStats

# How each internal disappears in a release that moved it: (module, attribute to delete).
REMOVED = {"dpo_prepare_dataset": ("trl", "DPOTrainer._prepare_dataset"),
           "trl_fused_head_switch": ("trl.trainer.utils", "_use_triton"),
           "trainer_load_from_checkpoint": ("transformers", "Trainer._load_from_checkpoint"),
           "swanlab_callback_table": ("transformers.integrations.integration_utils", "INTEGRATION_TO_CALLBACK")}


def test_every_internal_is_present_on_the_installed_versions():
    assert set(REMOVED) == set(compat.INTERNALS)
    for name in compat.INTERNALS:
        compat.require(name)


@pytest.mark.parametrize("name", sorted(REMOVED))
def test_a_missing_internal_stops_with_package_found_and_tested_versions(name, monkeypatch):
    module, attribute = REMOVED[name]
    owner = importlib.import_module(module)
    *path, last = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    monkeypatch.delattr(owner, last)
    package = compat.INTERNALS[name][0]
    with pytest.raises(ConfigError) as refused:
        compat.require(name)
    message = str(refused.value)
    assert message.startswith(f"{package} {compat.installed_version(package)} has no ")
    assert f"tested with {package} {compat.locked_versions()[package]}" in message
    assert "\n" not in message


def test_the_dpo_stage_refuses_a_trl_without_the_hook_before_loading_anything(monkeypatch, capsys, tmp_path):
    from trl import DPOTrainer

    from mini_qwen_dpo import main

    monkeypatch.delattr(DPOTrainer, "_prepare_dataset")
    with pytest.raises(SystemExit) as stopped:
        run_main(main, ["--config", str(REPO / "configs" / "demo_dpo.yaml"),
                        *cpu_flags(tmp_path / "out", tmp_path / "cache"), "--init_from", str(tmp_path / "nothing")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith("error: trl ")
    assert not (tmp_path / "out").exists()


def test_dpo_preparation_gives_exactly_trls_rows(tokenizer):
    """mini_qwen_dpo.py replaces DPOTrainer._prepare_dataset with its own tokenization (in utils.prepare's workers):
    on the repo's real pairs both give the same prompt_ids / chosen_ids / rejected_ids."""
    from trl import DPOConfig, DPOTrainer

    from mini_qwen_dpo import preference_preparation

    pairs, _ = load_records(str(REPO / "mini_data" / "dpo" / "test-00000-of-00001.parquet"), "dpo")
    pairs = pairs[:12]
    args = DPOConfig(output_dir="unused", max_length=None, report_to=[], use_cpu=True, bf16=False)
    script_args = SimpleNamespace(max_prompt_length=100_000)
    ours = [preference_preparation([], tokenizer, script_args, args, {}).shape(pair, UnitStats()) for pair in pairs]
    trls = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), Dataset.from_list(pairs), tokenizer,
                                       args, "train")
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    assert len(ours) == len(trls) == 12
    assert [{c: row[c] for c in columns} for row in ours] == [{c: row[c] for c in columns} for row in trls]
    assert all(row["chosen_ids"] != row["rejected_ids"] for row in ours)  # real pairs, not an empty comparison


def test_lock_file_pins_every_requirement_exactly():
    locked = compat.locked_versions()
    for line in (REPO / "requirements.txt").read_text().splitlines():
        spec = line.split("#")[0].strip()
        name = compat.normalise(spec.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip()) if spec else ""
        if name and name != "torch":
            assert name in locked, f"{name} is in requirements.txt but not in constraints.txt"
    assert "torch" not in locked  # the one package left to the user's machine


def test_wheels_plan_is_the_lock_without_torchs_cuda_stack_and_flash_attn(tmp_path, monkeypatch, capsys):
    commands = []
    monkeypatch.setattr(deps, "run", lambda command, **kwargs: commands.append(command))
    lock = tmp_path / "constraints.txt"
    lock.write_text("# a comment\naccelerate==1.16.0\ntriton==3.8.0\nnvidia-cublas==13.1\nflash-attn==2.8.3\n"
                    "Jinja2==3.1.6\nliger-kernel==0.8.5\n")
    monkeypatch.setattr(compat, "CONSTRAINTS", lock)
    monkeypatch.setattr(deps, "locked_versions", lambda: compat.locked_versions(lock))
    deps.main(["wheels", str(tmp_path / "wheels")])
    (command,) = commands
    assert command[-3:] == ["accelerate==1.16.0", "jinja2==3.1.6", "liger-kernel==0.8.5"]
    assert "-c constraints.txt" in capsys.readouterr().out
