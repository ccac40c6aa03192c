"""Model construction shared by every stage: config checks, attention backend, precision, generation defaults."""

import importlib.util
import json
import logging
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig,
                          PretrainedConfig, PreTrainedModel, set_seed)

from utils.checkpoint import CheckpointError
from utils.compat import require
from utils.errors import ConfigError, MissingInputError

logger = logging.getLogger("mini_qwen")

# Qwen2.5-Instruct's sampling defaults. The original's checkpoints got an empty generation_config, so everything it
# evaluated was greedy with no repetition penalty, which makes small models loop.
GENERATION_DEFAULTS = dict(
    do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1, max_new_tokens=512,
)


def generation_token_ids(tokenizer) -> dict:
    """What generation starts, stops and pads with, from the tokenizer the checkpoint is saved with: a chat reply
    ends at its end-of-turn token (the tokenizer's eos, <|im_end|>), raw text at the end of the document (the pad
    token, <|endoftext|>), as Qwen2.5-Instruct's generation_config has it."""
    return {"bos_token_id": tokenizer.pad_token_id, "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": [tokenizer.eos_token_id, tokenizer.pad_token_id]}


def check_model_config(config: PretrainedConfig, source: str = "model config") -> None:
    """Fail before anything is built when the shape is impossible (seed FAQ 5)."""
    problems = []
    if config.hidden_size % config.num_attention_heads:
        problems.append(f"hidden_size {config.hidden_size} is not divisible by num_attention_heads "
                        f"{config.num_attention_heads}")
    elif (config.hidden_size // config.num_attention_heads) % 2:
        problems.append(f"head dimension {config.hidden_size // config.num_attention_heads} must be even for RoPE")
    if config.num_attention_heads % config.num_key_value_heads:
        problems.append(f"num_attention_heads {config.num_attention_heads} is not divisible by num_key_value_heads "
                        f"{config.num_key_value_heads}")
    if config.vocab_size < 151665:
        problems.append(f"vocab_size {config.vocab_size} is smaller than the Qwen2.5 tokenizer (151665 tokens)")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def pick_attention(requested: str = "auto") -> str:
    """flash_attention_2 when it is installed and the GPU supports it (Ampere or newer), else PyTorch sdpa."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        if torch.cuda.get_device_capability()[0] >= 8:
            return "flash_attention_2"
    return "sdpa"


def resolve_mixed_precision(training_args) -> None:
    """bf16 needs an Ampere-or-newer GPU: on older GPUs (T4, V100) fall back to fp16 instead of failing."""
    if training_args.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        logger.warning("bf16 is not supported on %s: training with fp16 autocast instead",
                       torch.cuda.get_device_name())
        training_args.bf16, training_args.fp16 = False, True


WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# transformers' names for torchao's low-bit AdamW, which can round bf16 weights stochastically.
STOCHASTIC_ROUNDING_OPTIMIZERS = ("adamw_torch_8bit", "adamw_torch_4bit")


def check_weight_precision(weights_dtype: str, stochastic_rounding: bool, training_args) -> None:
    """bf16 weights only with stochastic rounding. A plain AdamW step on a bf16 weight rounds to nearest, and an
    update below half a bf16 step (about |w| * 2^-9) is lost every time; rounding up or down at random with the
    right odds keeps it in expectation (torchao's AdamW: `stochastic_rounding`, or its 8/4-bit variants with
    `optim_args: bf16_stochastic_round=True`)."""
    if weights_dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"weights_dtype must be one of {list(WEIGHT_DTYPES)}, got {weights_dtype!r}")
    if stochastic_rounding and weights_dtype != "bfloat16":
        raise ConfigError(f"stochastic_rounding rounds onto bf16 weights; weights_dtype is {weights_dtype}")
    if weights_dtype == "float32":
        return
    if training_args.deepspeed or training_args.world_size > 1:
        # ZeRO keeps its own fp32 master weights; and under DDP each rank would round its own way.
        raise ConfigError("weights_dtype bfloat16 (the lean preset) is for one process without DeepSpeed; launch it "
                         "with plain python, or use configs/pt.yaml on several GPUs")
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError(f"weights_dtype bfloat16 needs a GPU with bf16 (Ampere or newer), not "
                         f"{torch.cuda.get_device_name()}; keep --weights_dtype float32")
    if stochastic_rounding:
        return
    options = dict(item.split("=", 1) for item in (training_args.optim_args or "").replace(" ", "").split(",") if item)
    if training_args.optim not in STOCHASTIC_ROUNDING_OPTIMIZERS or options.get("bf16_stochastic_round", "").lower() \
            not in ("true", "1"):
        raise ConfigError(
            f"weights_dtype bfloat16 with optim {training_args.optim.value!r} and optim_args "
            f"{training_args.optim_args!r} would round small updates away. Use --stochastic_rounding true "
            f"(configs/pt_lean.yaml), or --optim {'|'.join(STOCHASTIC_ROUNDING_OPTIMIZERS)} --optim_args "
            f"bf16_stochastic_round=True, or keep --weights_dtype float32")


def stochastic_rounding_adamw(training_args) -> tuple[type, dict]:
    """For the Trainer's `optimizer_cls_and_kwargs`: torchao's AdamW, which keeps its moments in the weights' dtype
    (bf16) and rounds each update onto the bf16 weights stochastically. On the demo model it tracked full precision
    to within 0.1% over 200 steps where 8-bit moments lagged by up to 6% (docs/BENCHMARKS.md)."""
    from torchao.optim import _AdamW  # exported by torchao.optim for this use: bf16 training with stochastic rounding

    return _AdamW, {"lr": training_args.learning_rate, "betas": (training_args.adam_beta1, training_args.adam_beta2),
                    "eps": training_args.adam_epsilon, "weight_decay": training_args.weight_decay,
                    "bf16_stochastic_round": True}


def load_model_config(path: str | Path) -> PretrainedConfig:
    path = Path(path)
    if path.is_file():
        config = AutoConfig.for_model(**json.loads(path.read_text()))
    elif (path / "config.json").is_file():
        config = AutoConfig.from_pretrained(path)
    else:
        raise MissingInputError(f"model config not found: {path} (expected a config.json or a folder holding one)")
    check_model_config(config, str(path))
    return config


def build_model(model_config: str | None, init_from: str | None, attn_implementation: str = "auto",
                seed: int = 42, weights_dtype: str = "float32", tokenizer=None) -> PreTrainedModel:
    """A causal LM: randomly initialised from `model_config`, or loaded from the checkpoint `init_from`, with the
    sampling defaults and, given the stage's tokenizer, its stop and pad tokens in its generation_config.
    The random init is seeded (the Trainer seeds only after the model exists), so a run can be repeated exactly.

    Weights are float32 by default (the optimizer's master copy) and bf16 comes from autocast: an AdamW update of
    lr 1e-5 or 5e-7 is far below a bf16 weight's resolution (about |w| * 2^-8) and would be rounded away.
    bfloat16 weights halve weight and gradient memory and are only sound with stochastic rounding
    (check_weight_precision).
    """
    dtype = WEIGHT_DTYPES[weights_dtype]
    attention = pick_attention(attn_implementation)
    set_seed(seed)
    if init_from:
        if not (Path(init_from) / "config.json").is_file():
            raise MissingInputError(f"checkpoint not found: {init_from} (no config.json there)")
        check_model_config(AutoConfig.from_pretrained(init_from), init_from)
        model = AutoModelForCausalLM.from_pretrained(init_from, dtype=dtype, attn_implementation=attention)
        source = init_from
    else:
        config = load_model_config(model_config)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
        source = f"{model_config} (random init)"
    model.generation_config = GenerationConfig(**GENERATION_DEFAULTS,
                                               **(generation_token_ids(tokenizer) if tokenizer else {}))
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("model: %s, %s parameters, attention=%s, weights %s", source, f"{parameters:,}", attention,
                weights_dtype)
    return model


def load_checkpoint(path: str, device: str):
    """A saved model (float32; bf16 on a bf16 GPU) and its tokenizer, in eval mode, for generation and scoring."""
    if not (Path(path) / "config.json").is_file():
        raise CheckpointError(f"{path}: no checkpoint there (config.json missing)")
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=pick_attention("auto"))
    from utils.tokenizer import load_tokenizer

    return model.to(device).eval(), load_tokenizer(path)


def build_reward_model(init_from: str, tokenizer, attn_implementation: str = "auto", seed: int = 42) -> PreTrainedModel:
    """A checkpoint with a one-number score head (new, seeded random init) in place of its LM head, float32: a
    reward model for TRL's RewardTrainer, which GRPOTrainer later loads as a reward function from its folder."""
    set_seed(seed)
    if not (Path(init_from) / "config.json").is_file():
        raise MissingInputError(f"checkpoint not found: {init_from} (no config.json there)")
    check_model_config(AutoConfig.from_pretrained(init_from), init_from)
    model = AutoModelForSequenceClassification.from_pretrained(
        init_from, num_labels=1, dtype=torch.float32, attn_implementation=pick_attention(attn_implementation))
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at each row's last non-pad token
    logger.info("reward model: %s with a new score head, %s parameters", init_from,
                f"{sum(p.numel() for p in model.parameters()):,}")
    return model


def score_only_labelled_positions_on_cpu() -> None:
    """TRL's fused LM head (trl.trainer.utils.add_fused_lm_head, SFT and DPO) projects only the positions that have
    a label on devices with Triton, but every position elsewhere, so that tile shapes stay fixed for compilers such
    as Neuron's. On a CPU that fixed shape buys nothing: the prompt and padding positions, most of a DPO batch, cost
    151,936-wide projections and are then masked out. This lets the CPU take the labelled-positions path too (its
    torch tiles, not Triton, still do the arithmetic; the result is the same log-probabilities). Measured on the
    tiny model: see docs/BENCHMARKS.md, "CPU: TRL's LM head". The switch is TRL-internal: probed (utils.compat)."""
    require("trl_fused_head_switch")
    import trl.trainer.utils as trl_utils

    use_triton = trl_utils._use_triton
    if getattr(use_triton, "cpu_compact", False):
        return

    def compact_on_cpu(device: torch.device) -> bool:
        return device.type == "cpu" or use_triton(device)

    compact_on_cpu.cpu_compact, compact_on_cpu.original = True, use_triton
    trl_utils._use_triton = compact_on_cpu
