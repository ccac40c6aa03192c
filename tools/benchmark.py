"""Measure what a training stage costs: tokens/s per device, MFU, peak memory, step-time spread; and the data prep.

    # one GPU, the real 1B config, our recipe vs. the original's, one JSON line + one Markdown row each
    python -m tools.benchmark step --stage pt --recipe ours --steps 20
    python -m tools.benchmark step --stage pt --recipe original --steps 20
    python -m tools.benchmark step --stage sft --padding_free            # vs. without the flag: padded batches
    python -m tools.benchmark step --stage dpo --precompute_ref            # vs. a reference forward every step
    # CPU: tokenize + pack throughput of our streaming pipeline vs. the original's datasets.map approach
    python -m tools.benchmark data_prep --corpus mini_data/pt --repeat 20
    python -m tools.benchmark data_prep --pipelines ours --workers 1 2 --repeat 200   # 1 vs 2 worker processes
    python -m tools.benchmark data_prep --stage sft --corpus mini_data/sft --repeat 40 --workers 1 2
    # the lean preset's loss curve against full precision (any PT flags after the options go to both runs)
    python -m tools.benchmark lean_curve --config configs/demo_pt.yaml --max_steps 200

The step benchmark drives the model and optimizer directly on synthetic token ids (the data pipeline is measured
separately by `data_prep`): forward with loss, backward, clip, AdamW step. It exists for comparisons the stage
scripts refuse to run (the original's bf16 weights under plain AdamW) and for isolated kernel choices; it does not
see what a stage adds (its collator, TRL's fused head, DeepSpeed, the callbacks). The stages' own speed and memory,
as users get them, come from the stage scripts themselves: `bash run.sh gpu-check` (tools/gpu_check.py) runs them
with `--max_steps` and reads the throughput callback's tokens/s, MFU and peak memory. Presets:
- `--recipe original`: bf16 weights updated in place by AdamW (the original's single-GPU numerics), sdpa or its
  flash-attention choice, micro-batch 12, block 1024, the full-logits loss.
- `--recipe ours` (default): fp32 master weights, bf16 autocast, fused AdamW on GPU; every optimisation is a flag.
- `--recipe lean` (configs/pt_lean.yaml): bf16 weights, torchao's AdamW with bf16 (or `--lean_moments 8bit`)
  moments and stochastic rounding, activation checkpointing.
`--track_memory` adds the peak by kind (weights, gradients, optimizer state, activations), exact on CPU too.

MFU = achieved FLOP/s / peak FLOP/s of the device, with FLOPs per token = 6·N (N = all parameters, embeddings
included, as the original's 18% figure used) + 12·L·H·S for attention (S = --seq_len), plus the reference forward
of a DPO step without --precompute_ref; the formula and the bf16 peak table are utils/throughput.py's, the same
as the training stages log.
Results are appended to --output (JSON lines); docs/BENCHMARKS.md records them with their commands.
"""

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


import torch

from utils.config import REPO_ROOT, repo_path, run_stage
from utils.errors import run_main
from utils.throughput import flops_per_token, peak_flops


def versions() -> dict:
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "python": platform.python_version()}


def synthetic_batch(stage: str, micro_batch: int, seq_len: int, padding_free: bool, generator) -> dict:
    """Token ids shaped like each stage's batches. SFT lengths follow a long-tailed distribution like
    Infinity-Instruct's (many short answers, some near the limit)."""
    vocab = 151643
    if stage == "sft":
        lengths = (torch.distributions.Exponential(1 / (seq_len * 0.35)).sample((micro_batch,)) + 32)
        lengths = lengths.clamp(max=seq_len).long().tolist()
        if padding_free:
            ids = torch.randint(0, vocab, (1, sum(lengths)), generator=generator)
            positions = torch.cat([torch.arange(n) for n in lengths])[None]
            return {"input_ids": ids, "position_ids": positions, "labels": ids.clone(), "real_tokens": sum(lengths)}
        ids = torch.randint(0, vocab, (micro_batch, max(lengths)), generator=generator)
        mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
        return {"input_ids": ids, "attention_mask": mask.long(), "labels": ids.masked_fill(~mask, -100),
                "real_tokens": sum(lengths)}
    ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=generator)
    return {"input_ids": ids, "labels": ids.clone(), "real_tokens": ids.numel()}


def dpo_loss(model, reference, batch, beta: float = 0.1, reference_logps=None):
    """Sigmoid DPO on a batch whose first half is 'chosen' and second half 'rejected'."""

    def sequence_logps(net, ids):
        logits = net(input_ids=ids).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)

    policy = sequence_logps(model, batch["input_ids"])
    if reference_logps is None:
        with torch.no_grad():
            reference_logps = sequence_logps(reference, batch["input_ids"])
    half = policy.shape[0] // 2
    margin = (policy[:half] - reference_logps[:half]) - (policy[half:] - reference_logps[half:])
    return -torch.nn.functional.logsigmoid(beta * margin).mean()


def memory_breakdown(model, optimizer, forward_backward) -> dict:
    """Peak tensor memory of a forward + backward that accumulates into existing gradients, by kind, from torch's
    MemTracker. It counts tensors, not a device allocator, so it works on CPU too: the 1B step's memory can be
    predicted without a GPU. The optimizer step is left out (torchao's is compiled, which dispatch modes do not
    allow); it works one parameter at a time, adding at most one parameter's temporaries."""
    from torch.distributed._tools.mem_tracker import MemTracker

    forward_backward()  # gradients exist, as in every micro-batch of gradient accumulation but the first
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        forward_backward()
    (peak,) = tracker.get_tracker_snapshot("peak").values()
    names = {"Parameter": "weights", "Gradient": "gradients", "Optstate": "optimizer_state",
             "Activation": "activations", "Temp": "temporaries", "Total": "total"}
    return {names[str(getattr(kind, "value", kind))]: round(size / 2**30, 3) for kind, size in peak.items()
            if str(getattr(kind, "value", kind)) in names}


def step_benchmark(args) -> dict:
    from transformers import AutoModelForCausalLM

    from utils.modeling import load_model_config, pick_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    original, lean = args.recipe == "original", args.recipe == "lean"
    config = load_model_config(repo_path(args.model_config))
    attention = pick_attention(args.attn_implementation)
    weight_dtype = torch.bfloat16 if lean or (original and device == "cuda") else torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=weight_dtype, attn_implementation=attention).to(device)
    if args.liger and not original:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    checkpointing = args.activation_checkpointing or lean
    if checkpointing:
        model.gradient_checkpointing_enable()
    if args.compile:
        model = torch.compile(model)
    reference = None
    if args.stage == "dpo" and not args.precompute_ref:
        reference = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                                     attn_implementation=attention).to(device).eval()
    parameters = sum(p.numel() for p in model.parameters())
    if lean:  # configs/pt_lean.yaml's optimizer: bf16 (or 8-bit) moments, stochastic rounding onto bf16 weights
        from torchao.optim import AdamW8bit, _AdamW

        optimizer = (_AdamW if args.lean_moments == "bf16" else AdamW8bit)(
            model.parameters(), lr=1e-5, weight_decay=0.1, bf16_stochastic_round=True)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1,
                                      fused=device == "cuda" and not original and args.fused_adamw)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.recipe == "ours" and device == "cuda")
    generator = torch.Generator().manual_seed(0)

    def forward_backward(batch):
        with autocast:
            if args.stage == "dpo":
                half = batch["input_ids"].shape[0] // 2
                precomputed = torch.zeros(2 * half, device=device) if args.precompute_ref else None
                loss = dpo_loss(model, reference, {"input_ids": batch["input_ids"][: 2 * half]},
                                reference_logps=precomputed)
            else:
                loss = model(**batch).loss
        loss.backward()

    step_times, tokens = [], 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        batch = synthetic_batch(args.stage, args.micro_batch, args.seq_len, args.padding_free, generator)
        real_tokens = batch.pop("real_tokens")
        batch = {k: v.to(device) for k, v in batch.items()}
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        forward_backward(batch)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            step_times.append(time.perf_counter() - start)
            tokens += real_tokens
    seconds = sum(step_times)
    tokens_per_second = tokens / seconds
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    peak = peak_flops(device_name) if device == "cuda" else None
    achieved = tokens_per_second * flops_per_token(config, parameters, args.seq_len,
                                                   reference_forward=reference is not None)
    result = {
        "stage": args.stage, "recipe": args.recipe, "device": device_name, "parameters": parameters,
        "tokens_per_second": round(tokens_per_second, 1), "mfu": round(achieved / peak, 4) if peak else None,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "step_seconds_median": round(statistics.median(step_times), 4),
        "step_seconds_spread": round(max(step_times) - min(step_times), 4),
        "settings": {"attention": attention, "weights": str(weight_dtype).replace("torch.", ""),
                     "autocast": "bf16" if args.recipe == "ours" and device == "cuda" else "none",
                     "optimizer": type(optimizer).__name__, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
                     "padding_free": args.padding_free, "precompute_ref": args.precompute_ref, "liger": args.liger,
                     "compile": args.compile, "activation_checkpointing": checkpointing,
                     "fused_adamw": optimizer.defaults.get("fused"), "steps": args.steps},
        "versions": versions(), "date": time.strftime("%Y-%m-%d"),
    }
    if args.track_memory:
        batch = synthetic_batch(args.stage, args.micro_batch, args.seq_len, args.padding_free, generator)
        batch.pop("real_tokens")
        result["memory_breakdown_gb"] = memory_breakdown(
            model, optimizer, lambda: forward_backward({k: v.to(device) for k, v in batch.items()}))
    return result


def _prep_ours(files: list[str], block_size: int, cache_dir: str, workers: int) -> int:
    """The PT stage's own data step (utils.prepare) with `workers` processes."""
    from utils.packing import pretraining_preparation
    from utils.prepare import prepare_or_load
    from utils.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    preparation = pretraining_preparation(files, tokenizer, block_size, "concat", None, {"t": time.time()})
    _, report = prepare_or_load(preparation, cache_dir, workers, world_size=1)
    return report["packing"]["tokens_kept"], report["preparation"]["seconds"]


def _prep_original(files: list[str], block_size: int, cache_dir: str, workers: int) -> int:
    """The original's approach: load_dataset → map(tokenize, batch 5000) → map(group into blocks, batch 5000)."""
    from itertools import chain

    from datasets import load_dataset

    from utils.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    dataset = load_dataset("parquet", data_files=files, split="train", columns=["text"], cache_dir=cache_dir)

    def tokenize(batch):
        return tokenizer([text + tokenizer.eos_token for text in batch["text"]], add_special_tokens=False)

    def group(batch):
        concatenated = list(chain.from_iterable(batch["input_ids"]))
        usable = len(concatenated) // block_size * block_size
        return {"input_ids": [concatenated[i: i + block_size] for i in range(0, usable, block_size)]}

    tokenized = dataset.map(tokenize, batched=True, batch_size=5000, remove_columns=dataset.column_names)
    blocks = tokenized.map(group, batched=True, batch_size=5000, remove_columns=tokenized.column_names)
    return len(blocks) * block_size, None


def _prep_child(which: str, files: list[str], block_size: int, cache_dir: str, workers: int) -> None:
    """Run one pipeline in this (child) process and print tokens, seconds and peak RSS as JSON (the main process's,
    and the largest of its worker processes'). `seconds` counts everything, tokenizer loading included;
    `prepare_seconds` only our data step itself (what more workers speed up)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process, as the comparison states
    torch.set_num_threads(1)
    start = time.perf_counter()
    tokens, prepare_seconds = (_prep_ours if which == "ours" else _prep_original)(files, block_size, cache_dir, workers)
    seconds = time.perf_counter() - start
    workers_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if workers > 1 else 0
    print(json.dumps({"pipeline": which, "workers": workers, "tokens": tokens, "seconds": round(seconds, 2),
                      "tokens_per_second": round(tokens / seconds), "prepare_seconds": prepare_seconds,
                      "prepare_tokens_per_second": round(tokens / prepare_seconds) if prepare_seconds else None,
                      "peak_rss_mb": round(
                          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "worker_peak_rss_mb": round(workers_rss / 1024) or None}))


def memory_cgroup(limit_mb: int) -> Path:
    """A memory cgroup capped at `limit_mb` (Linux, root; cgroup v1 or v2): the kernel reclaims or, past the cap,
    kills what runs in it, so a pipeline that finishes in it provably needed no more."""
    name = f"mini_qwen_bench_{os.getpid()}"
    for root, limit_file in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes"), ("/sys/fs/cgroup", "memory.max")):
        group = Path(root) / name
        try:
            group.mkdir(exist_ok=True)
            (group / limit_file).write_text(str(limit_mb * 2**20))
            return group
        except OSError:
            continue
    raise SystemExit("--memory_limit_mb needs a writable memory cgroup (Linux, as root)")


def conversation_prep_benchmark(args) -> list[dict]:
    """The SFT or DPO stage's own data step (`--prepare_only`, in a fresh process) on a corpus repeated --repeat
    times, once per --workers value: records per second of the data step itself (tokenizer loading excluded)."""
    import tempfile

    import pyarrow.parquet as pq

    from utils.files import resolve_data_files

    work = Path(tempfile.mkdtemp(prefix="mini_qwen_bench_", dir=args.work_dir))
    corpus = work / "corpus"
    corpus.mkdir()
    results = []
    try:
        for index, source in enumerate(resolve_data_files([repo_path(args.corpus)])):
            table = pq.read_table(source)
            # Row groups of one copy each: work units the size of the source file.
            with pq.ParquetWriter(corpus / f"part-{index}.parquet", table.schema) as writer:
                for _ in range(args.repeat):
                    writer.write_table(table)
        for workers in args.workers:
            output = subprocess.run(
                [sys.executable, str(REPO_ROOT / f"mini_qwen_{args.stage}.py"), "--config",
                 str(REPO_ROOT / "configs" / f"{args.stage}.yaml"), "--data_files", str(corpus), "--prepare_only",
                 "--data_workers", str(workers), "--cache_dir", str(work / f"cache-{workers}"),
                 "--output_dir", str(work / f"out-{workers}"), *(["--identity_repeat", "0"] if args.stage == "sft"
                                                                 else [])],
                capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
            if output.returncode:
                raise SystemExit(f"{args.stage} --prepare_only failed:\n{output.stderr[-3000:]}")
            report = json.loads((work / f"out-{workers}" / "data_report.json").read_text())
            step = report["preparation"]
            kept = report["records"]["kept"]
            results.append({"pipeline": f"{args.stage} (ours)", "workers": workers, "records": kept,
                            "skipped": sum(report["records"]["skipped"].values()), "tokens": report["tokens"],
                            "prepare_seconds": step["seconds"], "records_per_second": round(kept / step["seconds"]),
                            "corpus": args.corpus, "repeat": args.repeat, "versions": versions(),
                            "date": time.strftime("%Y-%m-%d")})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def data_prep_benchmark(args) -> list[dict]:
    """Both pipelines on the same corpus (the mini corpus repeated --repeat times), each in a fresh process. The
    corpus is written uncompressed, so its size on disk is the size of its text."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from utils.files import resolve_data_files

    work = Path(tempfile.mkdtemp(prefix="mini_qwen_bench_", dir=args.work_dir))
    base = pa.table({"text": pa.chunked_array([pq.read_table(f, columns=["text"]).column("text").cast(pa.string())
                                               for f in resolve_data_files([repo_path(args.corpus)])])})
    documents = base.num_rows * args.repeat
    with pq.ParquetWriter(work / "corpus.parquet", base.schema, compression="none", use_dictionary=False) as writer:
        for start in range(0, args.repeat, 10):  # row groups of 10 copies (work units), written as they are made
            writer.write_table(pa.concat_tables([base] * min(10, args.repeat - start)))
    group = memory_cgroup(args.memory_limit_mb) if args.memory_limit_mb else None
    results = []
    runs = [(which, workers) for which in args.pipelines for workers in (args.workers if which == "ours" else [1])]
    try:
        for which, workers in runs:
            output = subprocess.run(
                [sys.executable, "-m", "tools.benchmark", "_prep_child", which, str(work / "corpus.parquet"),
                 str(args.block_size), str(work / which), str(workers)], capture_output=True, text=True, cwd=REPO_ROOT,
                preexec_fn=(lambda: (group / "cgroup.procs").write_text(str(os.getpid()))) if group else None)
            if output.returncode:
                raise SystemExit(f"{which} failed (exit {output.returncode}; -9 is the memory cap):\n"
                                 f"{output.stderr[-3000:]}")
            result = json.loads(output.stdout.strip().splitlines()[-1])
            result.update(corpus_mb=round((work / "corpus.parquet").stat().st_size / 2**20, 1),
                          documents=documents, block_size=args.block_size, memory_limit_mb=args.memory_limit_mb,
                          versions=versions(), date=time.strftime("%Y-%m-%d"))
            results.append(result)
            shutil.rmtree(work / which, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if group:
            group.rmdir()
    return results


LEAN_FLAGS = {  # the numerics configs/pt_lean.yaml changes, with bf16 or 8-bit AdamW moments
    "bf16": ["--weights_dtype", "bfloat16", "--stochastic_rounding", "true", "--activation_checkpointing", "true"],
    "8bit": ["--weights_dtype", "bfloat16", "--optim", "adamw_torch_8bit", "--optim_args", "bf16_stochastic_round=True",
             "--activation_checkpointing", "true"],
}


def lean_curve_benchmark(args) -> dict:
    """The same PT run twice, full precision and with the lean preset's numerics, and how far apart their loss
    curves are: the largest relative gap between their `--window`-step means, and the final window's gap; and each
    run's held-out bits per byte from its report card."""
    from utils.plots import plot_runs, read_log_history

    output_dir = Path(repo_path(args.output_dir))
    histories, curves, heldout = {}, {}, {}
    for name, flags in (("full precision", []), ("lean", LEAN_FLAGS[args.lean_moments])):
        run_dir = output_dir / name.replace(" ", "_")
        run_stage("pt", ["--config", repo_path(args.config), "--output_dir", str(run_dir), "--max_steps",
                         str(args.max_steps), "--logging_steps", "1", "--save_strategy", "no",
                         "--resume_from_checkpoint", "", "--report_to", "none", *args.extra, *flags])
        histories[name] = read_log_history(run_dir)
        curves[name] = [e["loss"] for e in histories[name] if "loss" in e]
        heldout[name] = round(json.loads((run_dir / "report.json").read_text())["heldout_bits_per_byte"], 4)
    window = args.window

    def means(curve):
        return [statistics.mean(curve[i: i + window]) for i in range(0, len(curve) - window + 1, window)]

    full, lean = means(curves["full precision"]), means(curves["lean"])
    gaps = [abs(b - a) / a for a, b in zip(full, lean)]
    figure = plot_runs(histories, output_dir / "lean_vs_full.png", ("loss",),
                       title=f"lean preset vs full precision, {args.max_steps} steps")
    return {"benchmark": "lean_curve", "config": args.config, "lean_moments": args.lean_moments, "extra": args.extra,
            "steps": args.max_steps,
            "window": window, "max_relative_gap": round(max(gaps), 4), "final_relative_gap": round(gaps[-1], 4),
            "final_loss": {"full": round(full[-1], 4), "lean": round(lean[-1], 4)},
            "heldout_bits_per_byte": heldout, "figure": str(figure), "versions": versions(),
            "date": time.strftime("%Y-%m-%d")}


# Every GPU figure docs/BENCHMARKS.md asks for, as `step` flags: one process per row (memory and compile caches of
# one measurement never leak into the next).
SUITE_ROWS = [
    ("PT, the original's recipe", ["--stage", "pt", "--recipe", "original"]),
    ("PT, ours", ["--stage", "pt"]),
    ("PT, ours + Liger kernels", ["--stage", "pt", "--liger"]),
    ("PT, ours + torch.compile", ["--stage", "pt", "--compile"]),
    ("PT, ours + activation checkpointing", ["--stage", "pt", "--activation_checkpointing"]),
    ("SFT, padded batches", ["--stage", "sft"]),
    ("SFT, padding-free", ["--stage", "sft", "--padding_free"]),
    ("DPO, reference forward every step", ["--stage", "dpo", "--micro_batch", "8"]),
    ("DPO, precomputed reference", ["--stage", "dpo", "--micro_batch", "8", "--precompute_ref"]),
    ("lean preset, memory by kind", ["--recipe", "lean", "--micro_batch", "1", "--track_memory"]),
]
# The largest PT micro-batch that fits, for both recipes: these sizes in turn until one fails.
SUITE_MICRO_BATCHES = {"gpu": [12, 16, 24, 32, 48, 64, 96], "tiny": [2, 4]}
SUITE_TINY = ["--model_config", "models/mini_qwen_tiny", "--seq_len", "16", "--micro_batch", "2", "--steps", "2",
              "--warmup", "1", "--attn_implementation", "sdpa"]


def _suite_child(argv: list[str], connection) -> None:
    try:
        connection.send(main(["step", *argv], quiet=True)[0])
    except torch.OutOfMemoryError:
        connection.send({"error": "out of memory"})
    except ImportError as error:
        connection.send({"error": f"not installed: {error.name or error}"})
    except Exception as error:  # a row that cannot run is a row saying why, not the end of the suite
        connection.send({"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"})


def run_row(argv: list[str], timeout: float) -> dict:
    """`step` with `argv` in a forked process of its own: its result, or {"error": why it did not finish}. Forked,
    not spawned, so that no row pays for the imports again; the parent never touches CUDA, so forking is safe."""
    import multiprocessing

    receiver, sender = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=_suite_child, args=(argv, sender))
    child.start()
    sender.close()
    try:
        result = receiver.recv() if receiver.poll(timeout) else {"error": f"no result in {timeout:.0f} s"}
    except EOFError:  # the child died without a word: a crash in native code, or the kernel's OOM killer
        result = None
    child.join(5)
    if child.is_alive():
        child.kill()
        child.join()
    return result or {"error": f"the process died (exit code {child.exitcode})"}


def import_what_rows_use() -> None:
    """transformers and TRL load their model and trainer modules on first use (~4.5 s here): once in the parent,
    before the forks, instead of once per row. A model on the meta device touches no CUDA."""
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer, SFTTrainer  # noqa: F401 (TRL's lazy module imports each one's module here)

    from utils.modeling import load_model_config

    with torch.device("meta"):
        AutoModelForCausalLM.from_config(load_model_config("models/mini_qwen_tiny"))


def suite(args) -> list[dict]:
    """Each SUITE_ROWS measurement and the largest-micro-batch search, one row each, into a Markdown table."""
    tiny = SUITE_TINY if args.tiny else []
    rows = []

    def measure(name: str, flags: list[str]) -> dict:
        argv = [*flags, *tiny, *args.step_flags]
        result = {"name": name, "command": shlex.join(["python", "-m", "tools.benchmark", "step", *argv]),
                  **run_row(argv, args.row_timeout)}
        rows.append(result)
        outcome = result.get("error") or f"{result['tokens_per_second']:,} tokens/s"
        print(f"[{len(rows)}] {name}: {outcome}", flush=True)
        return result

    import_what_rows_use()
    for name, flags in SUITE_ROWS:
        measure(name, flags)
    for recipe in ("original", "ours"):
        fits = None
        for micro_batch in SUITE_MICRO_BATCHES["tiny" if args.tiny else "gpu"]:
            result = measure(f"PT, {recipe}: micro-batch {micro_batch}",
                             ["--stage", "pt", "--recipe", recipe, *tiny, "--micro_batch", str(micro_batch)])
            if "error" in result:
                break
            fits = micro_batch
        rows.append({"name": f"PT, {recipe}: largest micro-batch that fits", "command": "the rows above",
                     "largest_micro_batch": fits})
    output = Path(repo_path(args.output_md))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(suite_markdown(rows, args.tiny), encoding="utf-8")
    print(f"suite table written to {output}")
    return rows


def suite_markdown(rows: list[dict], tiny: bool) -> str:
    measured = next((row for row in rows if "versions" in row), {})
    environment = ", ".join(f"{name} {version}" for name, version in measured.get("versions", versions()).items())
    lines = [f"# Benchmark suite{' --tiny (the tiny model, same code paths)' if tiny else ''}", "",
             f"{time.strftime('%Y-%m-%d')}, device: {measured.get('device', 'n/a')}; {environment}", "",
             "| measurement | tokens/s per device | MFU | peak memory | step (median) | command |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if "largest_micro_batch" in row:
            cells = [f"largest that fits: {row['largest_micro_batch'] or 'none'}", "", "", ""]
        elif "error" in row:
            cells = [f"did not run: {row['error']}", "", "", ""]
        else:
            by_kind = row.get("memory_breakdown_gb")
            memory = f"{row['peak_memory_gb']} GB" + (
                f" ({', '.join(f'{kind} {gb} GB' for kind, gb in by_kind.items())})" if by_kind else "")
            cells = [f"{row['tokens_per_second']:,}", f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a (no GPU)",
                     memory, f"{row['step_seconds_median']} s"]
        lines.append(f"| {row['name']} | {' | '.join(cells)} | `{row['command']}` |")
    return "\n".join(lines) + "\n"


def markdown_row(result: dict) -> str:
    if result.get("benchmark") == "lean_curve":
        return (f"| lean_curve | {result['lean_moments']} moments, {result['steps']} steps | max gap "
                f"{result['max_relative_gap']:.2%} | final gap {result['final_relative_gap']:.2%} | final loss "
                f"{result['final_loss']} | held-out bits/byte {result['heldout_bits_per_byte']} |")
    if "records_per_second" in result:
        return (f"| data_prep | {result['pipeline']}, {result['workers']} worker(s) | {result['records']:,} records "
                f"({result['corpus']} x{result['repeat']}) | {result['records_per_second']:,} records/s | "
                f"{result['prepare_seconds']} s |")
    if "pipeline" in result:
        cap = f", cap {result['memory_limit_mb']} MB" if result["memory_limit_mb"] else ""
        workers = f", worker peak RSS {result['worker_peak_rss_mb']} MB" if result.get("worker_peak_rss_mb") else ""
        step_rate = result.get("prepare_tokens_per_second")
        step_rate = f" ({step_rate:,} in the data step)" if step_rate else ""
        return (f"| data_prep | {result['pipeline']}, {result.get('workers', 1)} worker(s) | {result['documents']} "
                f"docs, {result['corpus_mb']} MB | {result['tokens_per_second']:,} tokens/s{step_rate} | peak RSS "
                f"{result['peak_rss_mb']} MB{workers}{cap} |")
    settings = ", ".join(f"{k}={v}" for k, v in result["settings"].items())
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a"
    return (f"| {result['stage']} | {result['recipe']} | {result['device']} | {result['tokens_per_second']:,} | "
            f"{mfu} | {result['peak_memory_gb']} GB | {result['step_seconds_median']} s | {settings} |")


def main(argv=None, quiet: bool = False):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_prep_child":
        _, which, corpus, block_size, cache_dir, workers = argv
        return _prep_child(which, [corpus], int(block_size), cache_dir, int(workers))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    step = sub.add_parser("step", help="optimizer steps of a stage on the model")
    step.add_argument("--stage", choices=["pt", "sft", "dpo"], default="pt")
    step.add_argument("--recipe", choices=["ours", "original", "lean"], default="ours")
    step.add_argument("--model_config", default="models/mini_qwen_1b")
    step.add_argument("--attn_implementation", default="auto")
    step.add_argument("--micro_batch", type=int, default=12)
    step.add_argument("--seq_len", type=int, default=1024)
    step.add_argument("--steps", type=int, default=20)
    step.add_argument("--warmup", type=int, default=3)
    step.add_argument("--padding_free", action="store_true", help="SFT: samples concatenated, no padding")
    step.add_argument("--precompute_ref", action="store_true", help="DPO: no reference forward in the step")
    step.add_argument("--liger", action="store_true", help="Liger kernels (RMSNorm, SwiGLU, RoPE)")
    step.add_argument("--compile", action="store_true", help="torch.compile the model")
    step.add_argument("--activation_checkpointing", action="store_true")
    step.add_argument("--no_fused_adamw", dest="fused_adamw", action="store_false")
    step.add_argument("--lean_moments", choices=["bf16", "8bit"], default="bf16", help="AdamW moments of --recipe lean")
    step.add_argument("--track_memory", action="store_true",
                      help="one more forward+backward under torch's MemTracker: peak memory by kind (works on CPU)")
    prep = sub.add_parser("data_prep", help="tokenize + pack throughput, ours vs. the original's")
    prep.add_argument("--stage", choices=["pt", "sft", "dpo"], default="pt",
                      help="sft/dpo: that stage's --prepare_only on --corpus, records/s per --workers value")
    prep.add_argument("--corpus", default="mini_data/pt")
    prep.add_argument("--repeat", type=int, default=20, help="times the corpus is repeated")
    prep.add_argument("--block_size", type=int, default=1024)
    prep.add_argument("--pipelines", nargs="+", choices=["ours", "original"], default=["ours", "original"])
    prep.add_argument("--workers", type=int, nargs="+", default=[1],
                      help="worker processes of our pipeline, one run per value (the original's runs on one)")
    prep.add_argument("--memory_limit_mb", type=int, default=None,
                      help="run each pipeline in a memory cgroup capped at this (Linux, root)")
    prep.add_argument("--work_dir", default=None, help="where the corpus and caches go (default: the temp folder)")
    curve = sub.add_parser("lean_curve", help="loss curve of the lean preset vs full precision, same PT run")
    curve.add_argument("--config", default="configs/demo_pt.yaml", help="the PT recipe both runs share")
    curve.add_argument("--max_steps", type=int, default=200)
    curve.add_argument("--window", type=int, default=10, help="steps per mean when comparing the curves")
    curve.add_argument("--lean_moments", choices=["bf16", "8bit"], default="bf16")
    curve.add_argument("--output_dir", default="results/lean_curve")
    suite_parser = sub.add_parser("suite", help="every GPU measurement, one process each, into one Markdown table")
    suite_parser.add_argument("--tiny", action="store_true", help="the same rows on the tiny model (CPU, minutes)")
    suite_parser.add_argument("--row_timeout", type=float, default=600, help="seconds before a row is given up")
    suite_parser.add_argument("--output_md", default="results/bench/suite.md")
    for command in (step, prep, curve, suite_parser):
        command.add_argument("--output", default=None, help="append the JSON results to this file")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("lean_curve", "suite"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = args.step_flags = extra  # lean_curve: flags for both PT runs; suite: flags for every row

    if args.command == "suite":
        results = suite(args)
    elif args.command == "step":
        results = [step_benchmark(args)]
    elif args.command == "lean_curve":
        results = [lean_curve_benchmark(args)]
    elif args.stage != "pt":
        results = conversation_prep_benchmark(args)
    else:
        results = data_prep_benchmark(args)
    for result in results:
        if not quiet and args.command != "suite":
            print(json.dumps(result))
            print(markdown_row(result))
        if args.output:
            with open(repo_path(args.output), "a") as handle:
                handle.write(json.dumps(result) + "\n")
    return results


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
