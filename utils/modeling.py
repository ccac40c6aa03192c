"""Model construction shared by every stage: config checks, attention backend, precision, generation defaults."""

import importlib.util
import json
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel, set_seed

logger = logging.getLogger("mini_qwen")

# Qwen2.5-Instruct's sampling defaults. The original's checkpoints got an empty generation_config, so everything it
# evaluated was greedy with no repetition penalty, which makes small models loop.
GENERATION_DEFAULTS = dict(
    do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1, max_new_tokens=512,
    bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643,
)


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
        raise ValueError(f"{source}: " + "; ".join(problems))


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


def load_model_config(path: str | Path) -> PretrainedConfig:
    path = Path(path)
    if path.is_file():
        config = AutoConfig.for_model(**json.loads(path.read_text()))
    elif (path / "config.json").is_file():
        config = AutoConfig.from_pretrained(path)
    else:
        raise FileNotFoundError(f"model config not found: {path} (expected a config.json or a folder holding one)")
    check_model_config(config, str(path))
    return config


def build_model(model_config: str | None, init_from: str | None, attn_implementation: str = "auto",
                seed: int = 42) -> PreTrainedModel:
    """A causal LM in float32: randomly initialised from `model_config`, or loaded from the checkpoint `init_from`.
    The random init is seeded (the Trainer seeds only after the model exists), so a run can be repeated exactly.

    Weights stay float32 (the optimizer's master copy) and bf16 comes from autocast: an AdamW update of lr 1e-5 or
    5e-7 is far below a bf16 weight's resolution (about |w| * 2^-8) and would be rounded away.
    """
    attention = pick_attention(attn_implementation)
    set_seed(seed)
    if init_from:
        if not (Path(init_from) / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint not found: {init_from} (no config.json there)")
        check_model_config(AutoConfig.from_pretrained(init_from), init_from)
        model = AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.float32, attn_implementation=attention)
        source = init_from
    else:
        config = load_model_config(model_config)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attention)
        source = f"{model_config} (random init)"
    model.generation_config = GenerationConfig(**GENERATION_DEFAULTS)
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("model: %s, %s parameters, attention=%s, weights float32", source, f"{parameters:,}", attention)
    return model
