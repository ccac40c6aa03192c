"""LoRA (seed 004: continued pretraining or fine-tuning that trains adapters only), and merging adapters back.

    python -m utils.lora merge results/pt_lora results/pt_merged

The flags are trl.ModelConfig's LoRA fields under the same names, so a TRL recipe's LoRA lines carry over. Not
ModelConfig itself: beside LoRA it declares model_name_or_path, dtype and attn_implementation, which the stages
have in their own form (PT builds from a config file; weights_dtype is checked against stochastic rounding), and
4/8-bit loading flags that the stages do not implement: flags that would parse and then do nothing.
"""

import argparse
import sys
from dataclasses import dataclass, field

from utils.errors import run_main


@dataclass
class LoraArguments:
    use_peft: bool = field(default=False, metadata={"help": "train LoRA adapters instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "module names to adapt"})
    lora_modules_to_save: list[str] = field(default_factory=list, metadata={
        "help": "modules trained in full beside the adapters, e.g. embed_tokens for new vocabulary"})


def apply_lora(model, lora_args: LoraArguments, logger):
    if not lora_args.use_peft:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
                        target_modules=lora_args.lora_target_modules,
                        modules_to_save=lora_args.lora_modules_to_save or None, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA r=%d alpha=%d on %s: %s of %s parameters trainable", lora_args.lora_r, lora_args.lora_alpha,
                ",".join(lora_args.lora_target_modules), f"{trainable:,}", f"{total:,}")
    return model


def merge_adapters(adapter_dir: str, output_dir: str) -> None:
    """Fold LoRA adapters into their base model and save a plain checkpoint with the tokenizer."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.float32)
    merged = model.merge_and_unload()
    merged.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(output_dir)
    print(f"merged {adapter_dir} into {output_dir}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge LoRA adapters into the base model")
    merge.add_argument("adapter_dir")
    merge.add_argument("output_dir")
    args = parser.parse_args(argv)
    merge_adapters(args.adapter_dir, args.output_dir)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
