"""The benchmark script runs on CPU on the tiny config and reports every field (its numbers are not asserted)."""

import json

import pytest
import torch

from conftest import REPO
from tools.benchmark import SUITE_ROWS, flops_per_token, main, peak_flops


def test_bench_tiny_runs_every_row_in_a_process_of_its_own_and_writes_the_table(tmp_path):
    import subprocess

    table = tmp_path / "suite.md"
    run = subprocess.run(["bash", str(REPO / "run.sh"), "bench", "--tiny", "--output_md", str(table),
                          "--output", str(tmp_path / "rows.jsonl")], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    by_name = {row["name"]: row for row in rows}
    assert list(by_name)[:len(SUITE_ROWS)] == [name for name, _ in SUITE_ROWS]
    # liger-kernel is not installed here: that row says so and the suite goes on
    assert by_name["PT, ours + Liger kernels"]["error"] == "not installed: liger_kernel"
    measured = [row for row in rows if "tokens_per_second" in row]
    assert len(measured) == len(rows) - 3  # all but Liger and the two "largest micro-batch" summaries
    for row in measured:
        assert row["tokens_per_second"] > 0 and row["parameters"] == 9_798_208 and row["mfu"] is None
        assert row["command"].startswith("python -m tools.benchmark step ") and "--model_config models/mini_qwen_tiny" \
            in row["command"]
    settings = {name: by_name[name]["settings"] for name in by_name if "settings" in by_name[name]}
    assert settings["SFT, padding-free"]["padding_free"] and not settings["SFT, padded batches"]["padding_free"]
    assert settings["DPO, precomputed reference"]["precompute_ref"]
    assert settings["PT, ours + activation checkpointing"]["activation_checkpointing"]
    assert settings["PT, ours + torch.compile"]["compile"]
    assert settings["DPO, reference forward every step"]["micro_batch"] == 2  # --tiny's sizes win over the row's
    lean = by_name["lean preset, memory by kind"]
    assert lean["settings"]["weights"] == "bfloat16" and lean["settings"]["optimizer"] == "_AdamW"
    memory, bf16_bytes = lean["memory_breakdown_gb"], round(lean["parameters"] * 2 / 2**30, 3)
    assert memory["weights"] == memory["gradients"] == bf16_bytes
    assert 2 * bf16_bytes <= memory["optimizer_state"] + 0.001 < 2.2 * bf16_bytes + 0.001  # two bf16 moments
    assert by_name["PT, ours: largest micro-batch that fits"]["largest_micro_batch"] == 4  # nothing fails on the CPU
    text = table.read_text()
    assert text.count("\n| ") == len(rows) + 1 and "did not run: not installed: liger_kernel" in text
    assert f"`{by_name['SFT, padding-free']['command']}`" in text


def test_flops_per_token_equals_what_torch_counts_for_a_training_step_of_the_1b_config():
    """MFU's numerator against torch's own FLOP counter over every matmul of a forward and backward of the real 1B
    config at 1024 tokens, attention included (on the meta device: shapes only, no arithmetic). Norms, activations
    and bias adds are the only FLOPs 6N + 12LHS leaves out: attention alone is 10% of the total here."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    from utils.modeling import load_model_config

    config = load_model_config(str(REPO / "models" / "mini_qwen_1b"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    parameters = sum(p.numel() for p in model.parameters())
    seq_len = 1024
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device="meta")
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    assert flops_per_token(config, parameters, seq_len) * seq_len == pytest.approx(counter.get_total_flops(), rel=1e-3)
    assert peak_flops("NVIDIA H100 80GB HBM3") == peak_flops("NVIDIA H800") == 989e12  # dense bf16, no sparsity
    assert peak_flops("some CPU") is None


def test_data_prep_benchmark_compares_both_pipelines_and_worker_counts():
    from utils.formats import load_records

    results = main(["data_prep", "--corpus", str(REPO / "mini_data" / "pt"), "--repeat", "1",
                    "--block_size", "128", "--workers", "1", "2"])
    assert [(r["pipeline"], r["workers"]) for r in results] == [("ours", 1), ("ours", 2), ("original", 1)]
    one_worker, two_workers, original = results
    documents = len(load_records(str(REPO / "mini_data" / "pt"), "pt")[0])
    assert one_worker["documents"] == original["documents"] == documents
    assert one_worker["tokens"] == two_workers["tokens"] >= original["tokens"]  # the original drops map-batch tails
    assert two_workers["worker_peak_rss_mb"] > 0 and one_worker["worker_peak_rss_mb"] is None
    assert all(r["tokens_per_second"] > 0 and r["peak_rss_mb"] > 0 for r in results)


@pytest.mark.parametrize("moments, state_bytes_per_parameter", [("8bit", 2)])  # bf16: the suite test's lean row
def test_lean_recipe_reports_memory_by_kind(moments, state_bytes_per_parameter):
    (result,) = main(["step", "--recipe", "lean", "--lean_moments", moments, "--model_config", "models/mini_qwen_tiny",
                      "--micro_batch", "2", "--seq_len", "32", "--steps", "1", "--warmup", "0", "--track_memory"])
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
    from tools.benchmark import memory_cgroup

    try:
        memory_cgroup(1024).rmdir()
    except SystemExit:
        pytest.skip("no writable memory cgroup here (needs Linux and root)")
    (ours,) = main(["data_prep", "--corpus", str(REPO / "mini_data" / "pt"), "--repeat", "2",
                    "--block_size", "128", "--pipelines", "ours", "--memory_limit_mb", "1024"])
    # The cgroup kills a process over its cap (the benchmark then stops, naming exit -9), so finishing is the proof.
    # RSS also counts shared library pages the cgroup need not charge (another process read them in first): with
    # another test process beside it, it read 1,056 MB here.
    assert ours["memory_limit_mb"] == 1024 and ours["peak_rss_mb"] > 0


def test_lean_curve_runs_the_pt_stage_twice_and_compares(tmp_path):
    """Also the proof that the lean preset's 8-bit variant trains (the shipped bf16 one: tests/test_lean.py)."""
    from safetensors import safe_open

    (result,) = main(["lean_curve", "--lean_moments", "8bit", "--max_steps", "4", "--window", "2",
                      "--output_dir", str(tmp_path / "runs"), "--data_files", str(REPO / "mini_data" / "pt"),
                      "--block_size", "32", "--per_device_train_batch_size", "2",  # bf16 on CPU is slow
                      "--learning_rate", "1e-2", "--cache_dir", str(tmp_path / "cache"),
                      "--dataloader_num_workers", "0", "--disable_tqdm", "true"])
    assert result["steps"] == 4 and set(result["final_loss"]) == {"full", "lean"}
    runs = {name: tmp_path / "runs" / name for name in ("full_precision", "lean")}
    for name, run in runs.items():
        state = json.loads((run / "trainer_state.json").read_text())
        curve = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
        assert len(curve) == 4 and curve[-1] < curve[0] - 0.15, (name, curve)  # noise: ~0.05
        report = json.loads((run / "report.json").read_text())
        assert result["heldout_bits_per_byte"]["full precision" if name == "full_precision" else "lean"] == round(
            report["heldout_bits_per_byte"], 4)
    assert 0 <= result["final_relative_gap"] <= result["max_relative_gap"] < 0.5
    assert "adamw_torch_8bit" in (runs["lean"] / "report.md").read_text()
    with safe_open(str(runs["lean"] / "model.safetensors"), "pt") as weights:
        assert weights.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    with safe_open(str(runs["full_precision"] / "model.safetensors"), "pt") as weights:
        assert weights.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert (tmp_path / "runs" / "lean_vs_full.png").stat().st_size > 10_000
