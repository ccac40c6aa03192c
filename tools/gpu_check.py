"""One GPU check, ready for the first GPU a user (or this project) gets: `bash run.sh gpu-check` (under 8 minutes on
one H100). Every row runs the real stage scripts in a process of its own and lands in one Markdown table,
results/gpu_check/gpu_check.md, a failed row saying why:

1. FA2 packing: PT `packing: document` rows under the real flash-attn kernels, each document's logits against the
   same document run alone (the CPU tests check the same with reference kernels, tests/test_fa2_paths.py);
2. ZeRO-2 bf16 DPO, 5 steps at lr 5e-7 from an SFT checkpoint: the saved dtype and the share of weights that moved
   (the fp32 master must be saved: >= 99%);
3. the memory plan against measured peak memory: the full PT recipe (1B, its micro-batch) for a few steps on the
   repo's mini data, on each launcher that fits one GPU (plain python, DeepSpeed ZeRO-2 with one process);
4. tokens/s and MFU of those runs (the throughput callback's numbers), with and without Liger's kernels.

    python -m tools.gpu_check [--output_dir results/gpu_check] [--dry_run]
"""

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from utils.config import REPO_ROOT
from utils.errors import run_main

PT_STEPS = 4


def fa2_packing_check() -> dict:
    """PT `document` rows of the tiny model in bf16 under the real flash-attn kernels: the largest difference
    between a document's logits in its packed row and the same document run alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from utils.packing import PretrainCollator, pack_documents
    from utils.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    config = AutoConfig.from_pretrained(REPO_ROOT / "models" / "mini_qwen_tiny")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="flash_attention_2",
                                             dtype=torch.bfloat16).cuda()
    lines = (REPO_ROOT / "mini_data" / "heldout" / "heldout.txt").read_text(encoding="utf-8").splitlines()
    docs = [tokenizer(line)["input_ids"][:40] for line in lines if line.strip()][:12]
    samples = pack_documents(docs, 64, "document", tokenizer.eos_token_id)[:4]
    batch = PretrainCollator(tokenizer.pad_token_id, "flash_attention_2")(samples)
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
    worst = 0.0
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
        for row, positions in enumerate(inputs["position_ids"]):
            starts = (positions == 0).nonzero().flatten().tolist() + [positions.numel()]
            for start, end in zip(starts, starts[1:]):
                alone = model(input_ids=inputs["input_ids"][row:row + 1, start:end], use_cache=False).logits
                worst = max(worst, (logits[row, start:end] - alone[0].float()).abs().max().item())
    return {"rows": len(samples), "max_abs_diff": worst}


def command_rows(output_dir: Path) -> list[tuple[str, list[str]]]:
    """(name, command) of every row, in order; later rows read what earlier ones wrote."""
    python, launch = [sys.executable], [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                        "accelerate_config.yaml", "--num_processes", "1"]
    pt = ["mini_qwen_pt.py", "--config", "configs/pt.yaml", "--data_files", "mini_data/pt", "--max_steps",
          str(PT_STEPS), "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
          "--cache_dir", str(output_dir / "cache")]
    sft = ["mini_qwen_sft.py", "--config", "configs/demo_sft.yaml", "--output_dir", str(output_dir / "sft"),
           "--cache_dir", str(output_dir / "cache"), "--max_steps", "20", "--bf16", "true", "--use_cpu", "false",
           "--report_to", "none", "--save_strategy", "no"]
    dpo = ["mini_qwen_dpo.py", "--config", "configs/demo_dpo.yaml", "--init_from", str(output_dir / "sft"),
           "--output_dir", str(output_dir / "dpo_zero2"), "--cache_dir", str(output_dir / "cache"), "--bf16", "true",
           "--use_cpu", "false", "--learning_rate", "5e-7", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
           "--max_steps", "5", "--report_to", "none", "--save_strategy", "no"]
    rows = [("fa2 packing", [*python, "-m", "tools.gpu_check", "--fa2_packing"]),
            ("sft checkpoint for dpo", [*python, *sft]),
            ("dpo zero2 prepare", [*python, *dpo, "--prepare_only"]),
            ("dpo zero2 bf16, 5 steps", [*launch, *dpo])]
    for launcher, prefix in (("single", python), ("zero2", launch)):
        for liger in ("false", "true"):
            name = f"pt {launcher}{' liger' if liger == 'true' else ''}"
            out = ["--output_dir", str(output_dir / name.replace(" ", "_")), "--use_liger_kernel", liger]
            if launcher == "zero2":
                rows.append((f"{name} prepare", [*python, *pt, *out, "--prepare_only"]))
            rows.append((name, [*prefix, *pt, *out]))
            rows.append((f"{name} plan", [*python, *pt, *out, "--memory_plan", "--gpu", "H100", "--num_gpus", "1",
                                          "--launcher", launcher]))
    return rows


def last_log(output_dir: Path) -> dict:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "tokens_per_second" in entry][-1]


def weights_moved(start: Path, end: Path) -> str:
    from safetensors.torch import load_file

    before, after = load_file(start / "model.safetensors"), load_file(end / "model.safetensors")
    moved = sum(int((before[k].float() != after[k].float()).sum()) for k in before)
    total = sum(t.numel() for t in before.values())
    return f"{moved / total:.1%} of weights moved, saved as {sorted({str(t.dtype) for t in after.values()})}"


def outcome(name: str, result: subprocess.CompletedProcess, output_dir: Path) -> str:
    if result.returncode:
        return f"FAILED (exit {result.returncode}): {(result.stderr or result.stdout).strip().splitlines()[-1:]}"
    if name == "fa2 packing":
        return result.stdout.strip().splitlines()[-1]
    if name.startswith("dpo zero2 bf16"):
        return weights_moved(output_dir / "sft", output_dir / "dpo_zero2")
    if name.endswith(" plan"):
        return next(line for line in result.stdout.splitlines() if "total" in line)
    if name.startswith("pt ") and not name.endswith("prepare"):
        log = last_log(output_dir / name.replace(" ", "_"))
        return (f"{log['tokens_per_second']:,.0f} tokens/s, MFU {log.get('mfu', 0):.1%}, "
                f"peak {log.get('peak_gpu_memory_gib')} GiB")
    return "ok"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=REPO_ROOT / "results" / "gpu_check")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--fa2_packing", action="store_true", help="run only the FA2 packing row (needs a GPU)")
    args = parser.parse_args(argv)
    if args.fa2_packing:
        print(json.dumps(fa2_packing_check()))
        return
    rows = command_rows(args.output_dir)
    lines = ["| check | result | command |", "|---|---|---|"]
    for name, command in rows:
        if args.dry_run:
            print(f"{name}: {shlex.join(command)}")
            continue
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        lines.append(f"| {name} | {outcome(name, result, args.output_dir)} | `{shlex.join(command)}` |")
        print(lines[-1], flush=True)
    if not args.dry_run:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "gpu_check.md").write_text("\n".join(lines) + "\n")
        print(f"table: {args.output_dir / 'gpu_check.md'}")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
