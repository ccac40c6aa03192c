"""Direct preference optimisation of an SFT checkpoint on prompt / chosen / rejected pairs.

    # tiny CPU demo (from the demo SFT output)
    python demo/demo_dpo.py
    # one GPU
    python mini_qwen_dpo.py --config configs/dpo.yaml                     # from results/sft
    python mini_qwen_dpo.py --config configs/dpo.yaml --init_from results/sft/checkpoint-N   # an earlier epoch
    # N GPUs, DeepSpeed ZeRO-2
    accelerate launch --config_file accelerate_config.yaml --num_processes 8 mini_qwen_dpo.py --config configs/dpo.yaml
    # reference log-probs computed once up front: no reference model in memory during training
    python mini_qwen_dpo.py --config configs/dpo.yaml --precompute_ref_log_probs true

Weights stay float32 under bf16 autocast: the original's lr 5e-7 updates on bf16 weights were rounded away.
Pairs with identical answers, empty answers or a prompt over max_prompt_length are counted and left out.
Every YAML key is also a --flag.
"""

import sys
from dataclasses import dataclass, field

from trl import DPOConfig, DPOTrainer

from utils.cache import build_or_load
from utils.chat import count_tokens
from utils.config import parse_stage_args, repo_path
from utils.data import SkipCounter, SkipRecord, files_fingerprint, iter_normalized, resolve_data_files
from utils.modeling import build_model
from utils.peft_utils import apply_lora
from utils.tokenizer import load_tokenizer
from utils.training import stage_callbacks, train_and_save, with_skip_samples, write_data_report


@dataclass
class DPOScriptArguments:
    data_files: list[str] = field(default_factory=lambda: ["mini_data/dpo"], metadata={
        "help": "preference files, folders or globs (Infinity-Preference, prompt/chosen/rejected strings, ShareGPT)"})
    init_from: str = field(default="results/sft", metadata={"help": "the SFT checkpoint to optimise"})
    tokenizer_path: str | None = field(default=None, metadata={"help": "default: the tokenizer saved with init_from"})
    max_prompt_length: int = field(default=512, metadata={"help": "pairs whose prompt is longer are left out"})
    cache_dir: str = field(default="cache", metadata={"help": "where prepared pairs are kept for reuse"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto | sdpa | eager | flash_attention_2"})


def preference_rows(files, tokenizer, max_prompt_length, report):
    counter = SkipCounter()

    def check(pair):
        prompt_tokens = count_tokens(pair["prompt"], tokenizer)
        if prompt_tokens > max_prompt_length:
            raise SkipRecord(f"prompt longer than max_prompt_length={max_prompt_length}")
        return pair

    yield from iter_normalized(files, "dpo", counter, check)
    report.update(records=counter.to_dict())


def prepare_dataset(script_args, tokenizer, training_args, logger):
    files = resolve_data_files([repo_path(f) for f in script_args.data_files])
    key = {"files": files_fingerprint(files), "vocab": len(tokenizer), "template": tokenizer.chat_template,
           "max_prompt_length": script_args.max_prompt_length, "version": 1}
    with training_args.main_process_first(desc="prepare preference pairs"):
        dataset, report = build_or_load(
            repo_path(script_args.cache_dir), "dpo", key,
            lambda report: preference_rows(files, tokenizer, script_args.max_prompt_length, report),
            log=logger.info)
    logger.info(SkipCounter.from_dict(report["records"]).report(f"preference data ({len(files)} files)"))
    write_data_report(training_args, report)
    return dataset


def main(argv: list[str] | None = None):
    script_args, lora_args, crash_args, training_args, logger = parse_stage_args(
        DPOScriptArguments, DPOConfig, argv)

    init_from = repo_path(script_args.init_from)
    tokenizer = load_tokenizer(repo_path(script_args.tokenizer_path) or init_from)
    train_dataset = prepare_dataset(script_args, tokenizer, training_args, logger)

    model = build_model(None, init_from, script_args.attn_implementation, training_args.seed)
    model = apply_lora(model, lora_args, logger)

    callbacks = stage_callbacks(crash_args, ("loss", "rewards/accuracies", "rewards/margins"))
    trainer = with_skip_samples(DPOTrainer, crash_args)(
        model=model,
        ref_model=None,  # TRL builds the frozen reference itself (or disables the adapters under LoRA)
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    train_and_save(trainer, tokenizer, "dpo")


if __name__ == "__main__":
    main(sys.argv[1:])
