"""A memory plan before any GPU is touched: what one training step of a stage holds per GPU, by part, against the
GPU's memory, and the largest micro-batch that fits with 10% headroom. No model is built.

    python mini_qwen_pt.py --config configs/pt.yaml --memory_plan --gpu H100 --num_gpus 8 [--launcher zero2]

(every stage script takes the same flags). At launch on a GPU each stage runs the same plan for the GPU it has and
refuses a configuration that will not fit, naming the micro-batch that does (`--skip_memory_check` to try anyway).

The parts, per GPU, N parameters, G GPUs, T tokens in a micro-batch (DPO: chosen + rejected rows):
- weights: N x 4 bytes (fp32, `weights_dtype: float32`) or N x 2 (bf16, the lean recipe); DeepSpeed with bf16 holds a
  bf16 module (2N), and ZeRO-3 a 1/G share of it. Autocast also caches a bf16 copy of each fp32 weight during a
  step (2N);
- gradients: as the weights (fp32: 4N) on one GPU and under DDP, plus DDP's buckets (another 4N); DeepSpeed bf16:
  2N under ZeRO-1, 2N/G under ZeRO-2 and 3;
- optimizer: AdamW's two moments, 8N (8-bit AdamW: 2N), plus DeepSpeed's fp32 master (4N), split over G under ZeRO;
- activations: what the forward keeps for the backward, per token and layer ACTIVATION_BYTES (43·hidden +
  11·intermediate + 6·kv width, measured: see below) without activation checkpointing; with it, the layer inputs
  (4·hidden per token and layer) plus one layer recomputed;
- logits path: the LM head's output and the loss: 13 bytes per token and vocabulary entry at the peak (the bf16
  logits, their fp32 copy, log-softmax kept for the backward, and its gradient) in PT; a chunk of them only where
  they are never materialised whole: TRL's fused LM head (SFT, DPO, GRPO, always) or Liger's fused linear
  cross-entropy (PT with `use_liger_kernel`);
- framework: the CUDA context, cuBLAS/NCCL workspaces and the caching allocator's fragmentation: 1.5 GB + 5%.

The per-token coefficients were measured with torch's MemTracker under FakeTensorMode (bf16 autocast over fp32
weights, sdpa, transformers' Qwen2) on configs apart from those the tests check them on: tests/test_memory_plan.py
compares the whole plan with the same independent count on a tiny and a mid-size config (within 15%). The GPU
numbers of `run.sh gpu-check` are the check against real peak memory.
"""

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

GIB = 1024 ** 3
# Usable memory per GPU class, in bytes (what torch.cuda reports as total, rounded down).
GPUS = {"H100": 79.1, "H800": 79.1, "H200": 139.8, "A100-80GB": 79.1, "A100-40GB": 39.4, "L40S": 44.4,
        "A6000": 47.5, "4090": 23.6, "3090": 23.6, "4080": 15.6, "V100-32GB": 31.7, "T4": 14.6}
LAUNCHERS = ("single", "ddp", "zero1", "zero2", "zero3")
HEADROOM = 0.10
FRAMEWORK_BYTES, FRAMEWORK_FRACTION = 1.5e9, 0.05
LOGITS_BYTES_PER_ENTRY = 13
CHUNK_TOKENS = 1024  # Liger's fused linear cross-entropy and TRL's fused LM head work through the tokens in chunks


def activation_bytes_per_token_layer(hidden: int, intermediate: int, kv_width: int) -> int:
    return 43 * hidden + 11 * intermediate + 6 * kv_width


@dataclass
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads, config.vocab_size,
                   bool(config.tie_word_embeddings))

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.hidden // self.heads

    @property
    def parameters(self) -> int:
        h, i, kv = self.hidden, self.intermediate, self.kv_width
        layer = h * h * 2 + h * kv * 2 + h + 2 * kv + 3 * h * i + 2 * h  # q, o, k, v (+ biases), MLP, 2 norms
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h


@dataclass
class StepShape:
    """One micro-batch of a stage: tokens per row, rows, and what else the stage holds."""
    micro_batch: int
    seq_len: int
    rows_per_sample: int = 1       # DPO: chosen and rejected
    reference_model: bool = False  # DPO without precomputed reference log-probs
    weights_bytes: int = 4         # 4: fp32 weights; 2: bf16 weights (the lean recipe)
    autocast: bool = True
    optimizer_bytes: int = 8       # AdamW's two fp32 moments per parameter; 2 for 8-bit AdamW
    activation_checkpointing: bool = False
    chunked_logits: bool = False  # Liger's fused cross-entropy, or TRL's fused LM head (SFT, DPO, GRPO)


def plan_parts(model: ModelShape, step: StepShape, launcher: str, gpus: int) -> dict[str, float]:
    """Bytes per GPU for each part of one training step (see the module docstring)."""
    n = model.parameters
    shards = gpus if launcher.startswith("zero") else 1
    deepspeed = launcher.startswith("zero")
    if deepspeed and step.autocast:  # DeepSpeed's bf16: a bf16 module, the fp32 master in the optimizer
        weights = 2 * n / (shards if launcher == "zero3" else 1)
        gradients = 2 * n / (1 if launcher == "zero1" else shards)
        optimizer = (step.optimizer_bytes + 4) * n / shards
    else:
        weights = step.weights_bytes * n + (2 * n if step.autocast and step.weights_bytes == 4 else 0)
        gradients = step.weights_bytes * n * (2 if launcher == "ddp" else 1)
        optimizer = step.optimizer_bytes * n / shards
    if step.reference_model:
        weights += step.weights_bytes * n
    tokens = step.micro_batch * step.rows_per_sample * step.seq_len
    per_layer = activation_bytes_per_token_layer(model.hidden, model.intermediate, model.kv_width)
    if step.activation_checkpointing:
        activations = tokens * (4 * model.hidden * model.layers + per_layer)
    else:
        activations = tokens * per_layer * model.layers
    logit_tokens = min(tokens, CHUNK_TOKENS) if step.chunked_logits else tokens
    logits = logit_tokens * model.vocab * LOGITS_BYTES_PER_ENTRY
    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations,
             "logits path": logits}
    parts["framework"] = FRAMEWORK_BYTES + FRAMEWORK_FRACTION * sum(parts.values())
    return parts


def largest_micro_batch(model: ModelShape, step: StepShape, launcher: str, gpus: int, memory: float) -> int:
    """The largest micro-batch whose plan stays under (1 - HEADROOM) of `memory` (0 when none does)."""
    best = 0
    for micro_batch in range(1, 257):
        trial = StepShape(**{**step.__dict__, "micro_batch": micro_batch})
        if sum(plan_parts(model, trial, launcher, gpus).values()) > (1 - HEADROOM) * memory:
            break
        best = micro_batch
    return best


def plan_table(model: ModelShape, step: StepShape, launcher: str, gpus: int, gpu: str, memory: float) -> str:
    parts = plan_parts(model, step, launcher, gpus)
    total = sum(parts.values())
    fits = total <= (1 - HEADROOM) * memory
    best = largest_micro_batch(model, step, launcher, gpus, memory)
    lines = [f"memory plan: {model.parameters / 1e9:.2f}B parameters, micro-batch {step.micro_batch} x "
             f"{step.rows_per_sample * step.seq_len} tokens, {launcher} on {gpus} x {gpu} ({memory / GIB:.1f} GiB)",
             "| part | GiB per GPU |", "|---|---|"]
    lines += [f"| {name} | {value / GIB:.1f} |" for name, value in parts.items()]
    lines.append(f"| **total** | **{total / GIB:.1f}** of {memory / GIB:.1f} |")
    verdict = "fits" if fits else "does NOT fit"
    lines.append(f"{verdict} with {HEADROOM:.0%} headroom; the largest micro-batch that fits: {best}")
    return "\n".join(lines)


def suggestion(step: StepShape, best: int, accumulation: int) -> str:
    """The flags that keep the global batch with a micro-batch that fits."""
    if best == 0:
        return "no micro-batch fits: turn on --activation_checkpointing true, Liger or a ZeRO launcher"
    global_rows = step.micro_batch * accumulation
    for micro_batch in range(best, 0, -1):
        if global_rows % micro_batch == 0:
            return (f"--per_device_train_batch_size {micro_batch} --gradient_accumulation_steps "
                    f"{global_rows // micro_batch} (the same global batch)")
    return f"--per_device_train_batch_size {best}"



@dataclass
class MemoryPlanArguments:
    memory_plan: bool = field(default=False, metadata={
        "help": "print the memory plan of this run (utils/memory_plan.py) and exit; builds no model"})
    gpu: str = field(default="H100", metadata={"help": f"with --memory_plan: the GPU class, one of {', '.join(GPUS)}"})
    num_gpus: int | None = field(default=None, metadata={
        "help": "with --memory_plan: GPUs in the launch (default: this launch's process count)"})
    launcher: str | None = field(default=None, metadata={
        "help": "single | ddp | zero1 | zero2 | zero3 (default: how this run launches; for --memory_plan with "
                "--num_gpus > 1, zero2 as run.sh --gpus N)"})
    skip_memory_check: bool = field(default=False, metadata={
        "help": "start on a GPU even where the plan says the run will not fit"})


def model_shape(script_args) -> tuple[ModelShape, str]:
    """The shape of the model the stage trains, from its config.json: the checkpoint it starts from, else the
    model config it builds (the 1B config when a checkpoint is not trained yet)."""
    from transformers import AutoConfig

    from utils.config import repo_path

    for folder in (getattr(script_args, "init_from", None), getattr(script_args, "model_config", None),
                   "models/mini_qwen_1b"):
        if folder and (Path(repo_path(folder)) / "config.json").is_file():
            return ModelShape.from_config(AutoConfig.from_pretrained(repo_path(folder))), folder
    raise ValueError("no model config found")


def step_shape(script_args, training_args) -> StepShape:
    if hasattr(script_args, "block_size"):  # PT
        seq_len = script_args.block_size
    elif hasattr(training_args, "max_completion_length") and hasattr(training_args, "num_generations"):  # GRPO
        seq_len = script_args.max_prompt_length + training_args.max_completion_length
    else:
        seq_len = training_args.max_length
    pairs = hasattr(training_args, "precompute_ref_log_probs")  # DPO-family: chosen and rejected rows
    lean = getattr(script_args, "weights_dtype", "float32") == "bfloat16"
    return StepShape(micro_batch=training_args.per_device_train_batch_size, seq_len=seq_len,
                     rows_per_sample=2 if pairs and hasattr(training_args, "loss_type") else 1,
                     reference_model=pairs and not training_args.precompute_ref_log_probs
                     and getattr(training_args, "beta", 0) > 0 and hasattr(training_args, "loss_type"),
                     weights_bytes=2 if lean else 4, autocast=bool(training_args.bf16 or training_args.fp16),
                     optimizer_bytes=optimizer_bytes(script_args, training_args),
                     activation_checkpointing=bool(training_args.activation_checkpointing),
                     chunked_logits=trl_fused_head(training_args) or (
                         bool(training_args.use_liger_kernel) and importlib.util.find_spec("liger_kernel") is not None))


def trl_fused_head(training_args) -> bool:
    """SFTTrainer, DPOTrainer and GRPOTrainer always score through TRL's fused LM head (add_fused_lm_head)."""
    from trl import DPOConfig, GRPOConfig, SFTConfig

    return isinstance(training_args, (SFTConfig, DPOConfig, GRPOConfig))


def optimizer_bytes(script_args, training_args) -> int:
    """Bytes of optimizer state per parameter: AdamW's two fp32 moments, two bf16 ones (the lean recipe's
    stochastic-rounding AdamW), or two 8-bit ones."""
    if getattr(script_args, "stochastic_rounding", False):
        return 4
    return 2 if "8bit" in str(training_args.optim) else 8


def launcher_of(training_args, num_gpus: int) -> str:
    if training_args.deepspeed_plugin is not None:
        return f"zero{training_args.deepspeed_plugin.zero_stage}"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "ddp"
    return "zero2" if num_gpus > 1 else "single"


def plan_or_check(plan_args: MemoryPlanArguments, script_args, training_args) -> None:
    """--memory_plan: print the plan and exit 0. Otherwise, on a GPU, stop a run that will not fit before any data
    or model is touched, with the flags that fit."""
    from utils.errors import ConfigError

    if plan_args.memory_plan:
        if plan_args.gpu not in GPUS:
            raise ConfigError(f"unknown --gpu {plan_args.gpu!r}: one of {', '.join(GPUS)}")
        gpus = plan_args.num_gpus or training_args.world_size
        launcher = plan_args.launcher or launcher_of(training_args, gpus)
        if launcher not in LAUNCHERS:
            raise ConfigError(f"unknown --launcher {launcher!r}: one of {', '.join(LAUNCHERS)}")
        model, source = model_shape(script_args)
        print(f"model shape from {source}/config.json")
        print(plan_table(model, step_shape(script_args, training_args), launcher, gpus, plan_args.gpu,
                         GPUS[plan_args.gpu] * GIB))
        raise SystemExit(0)
    if plan_args.skip_memory_check or getattr(script_args, "prepare_only", False) or not torch.cuda.is_available():
        return
    memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    gpus = training_args.world_size
    launcher, (model, _) = launcher_of(training_args, gpus), model_shape(script_args)
    step = step_shape(script_args, training_args)
    total = sum(plan_parts(model, step, launcher, gpus).values())
    if total > (1 - HEADROOM) * memory:
        best = largest_micro_batch(model, step, launcher, gpus, memory)
        raise ConfigError(
            f"the memory plan needs {total / GIB:.1f} GiB per GPU for micro-batch {step.micro_batch} on {launcher}, "
            f"over {1 - HEADROOM:.0%} of this GPU's {memory / GIB:.1f} GiB: use "
            f"{suggestion(step, best, training_args.gradient_accumulation_steps)}; the table: --memory_plan; "
            "--skip_memory_check to start anyway")
