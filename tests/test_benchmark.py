"""The benchmark script runs on CPU on the tiny config and reports every field (its numbers are not asserted)."""

import pytest

from conftest import REPO
from utils.benchmark import flops_per_token, main, peak_flops


@pytest.mark.parametrize("flags", [["--stage", "pt"], ["--stage", "pt", "--recipe", "original"],
                                   ["--stage", "sft", "--padding_free"], ["--stage", "sft"],
                                   ["--stage", "dpo"], ["--stage", "dpo", "--precompute_ref"]])
def test_step_benchmark_reports_all_fields(flags, tmp_path):
    (result,) = main(["step", *flags, "--model_config", "models/mini_qwen_tiny", "--micro_batch", "2",
                      "--seq_len", "32", "--steps", "2", "--warmup", "1", "--output", str(tmp_path / "r.jsonl")])
    assert result["tokens_per_second"] > 0 and result["step_seconds_median"] > 0
    assert result["parameters"] == 9_798_208 and result["peak_memory_gb"] > 0
    assert {"attention", "weights", "optimizer", "micro_batch", "seq_len", "padding_free", "precompute_ref", "liger",
            "compile", "activation_checkpointing", "fused_adamw"} <= set(result["settings"])
    assert result["settings"]["weights"] == "float32"  # on CPU both recipes keep fp32
    assert {"torch", "transformers", "trl"} <= set(result["versions"])
    assert (tmp_path / "r.jsonl").read_text().count("\n") == 1


def test_mfu_formula_and_peak_table():
    from types import SimpleNamespace

    config = SimpleNamespace(num_hidden_layers=48, hidden_size=1024)
    # 6 N + 12 L H S for the 1B config at 1024 tokens: ~6.6 GFLOP per token, the figure the issue quotes.
    assert flops_per_token(config, 998_810_624, 1024) == 6 * 998_810_624 + 12 * 48 * 1024 * 1024
    assert abs(flops_per_token(config, 998_810_624, 1024) / 1e9 - 6.6) < 0.05
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("Tesla T4") == 65e12
    assert peak_flops("some CPU") is None


def test_data_prep_benchmark_compares_both_pipelines_and_worker_counts():
    from utils.data import load_records

    results = main(["data_prep", "--corpus", str(REPO / "mini_data" / "pt"), "--repeat", "1",
                    "--block_size", "128", "--workers", "1", "2"])
    assert [(r["pipeline"], r["workers"]) for r in results] == [("ours", 1), ("ours", 2), ("original", 1)]
    one_worker, two_workers, original = results
    documents = len(load_records(str(REPO / "mini_data" / "pt"), "pt")[0])
    assert one_worker["documents"] == original["documents"] == documents
    assert one_worker["tokens"] == two_workers["tokens"] >= original["tokens"]  # the original drops map-batch tails
    assert two_workers["worker_peak_rss_mb"] > 0 and one_worker["worker_peak_rss_mb"] is None
    assert all(r["tokens_per_second"] > 0 and r["peak_rss_mb"] > 0 for r in results)


@pytest.mark.parametrize("moments, state_bytes_per_parameter", [("bf16", 4), ("8bit", 2)])
def test_lean_recipe_reports_memory_by_kind(moments, state_bytes_per_parameter):
    (result,) = main(["step", "--recipe", "lean", "--lean_moments", moments, "--model_config", "models/mini_qwen_tiny",
                      "--micro_batch", "2", "--seq_len", "32", "--steps", "1", "--warmup", "1", "--track_memory"])
    settings = result["settings"]
    assert (settings["weights"], settings["optimizer"], settings["activation_checkpointing"]) == (
        "bfloat16", "_AdamW" if moments == "bf16" else "AdamW8bit", True)
    memory = result["memory_breakdown_gb"]
    bf16_bytes = round(result["parameters"] * 2 / 2**30, 3)
    assert memory["weights"] == memory["gradients"] == bf16_bytes  # accumulating: the gradients are there
    # two moments, in bf16 or in 8 bits (+ block scales)
    expected_state = result["parameters"] * state_bytes_per_parameter / 2**30
    assert expected_state <= memory["optimizer_state"] + 0.001 < 1.1 * expected_state + 0.001
    assert memory["total"] >= sum(memory[k] for k in ("weights", "gradients", "optimizer_state", "activations"))


def test_data_prep_under_a_memory_cap():
    from utils.benchmark import memory_cgroup

    try:
        memory_cgroup(1024).rmdir()
    except SystemExit:
        pytest.skip("no writable memory cgroup here (needs Linux and root)")
    (ours,) = main(["data_prep", "--corpus", str(REPO / "mini_data" / "pt"), "--repeat", "2",
                    "--block_size", "128", "--pipelines", "ours", "--memory_limit_mb", "1024"])
    assert ours["memory_limit_mb"] == 1024 and 0 < ours["peak_rss_mb"] <= 1024


def test_lean_curve_runs_the_pt_stage_twice_and_compares(tmp_path):
    from pathlib import Path

    (result,) = main(["lean_curve", "--max_steps", "4", "--window", "2", "--output_dir", str(tmp_path / "runs"),
                      "--data_files", str(REPO / "mini_data" / "pt"), "--block_size", "32",  # bf16 on CPU is slow
                      "--per_device_train_batch_size", "2", "--cache_dir", str(tmp_path / "cache"),
                      "--dataloader_num_workers", "0", "--disable_tqdm", "true"])
    assert result["steps"] == 4 and set(result["final_loss"]) == {"full", "lean"}
    assert set(result["heldout_bits_per_byte"]) == {"full precision", "lean"}
    assert 0 <= result["final_relative_gap"] <= result["max_relative_gap"] < 0.5
    assert Path(result["figure"]).stat().st_size > 10_000
    assert (tmp_path / "runs" / "lean" / "model.safetensors").exists()
    assert (tmp_path / "runs" / "full_precision" / "model.safetensors").exists()
