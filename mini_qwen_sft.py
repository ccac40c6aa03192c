"""Supervised fine-tuning of a pretrained checkpoint on conversations, with loss on assistant tokens only.

    # tiny CPU demo (from the demo PT output)
    python demo/demo_sft.py
    # one GPU
    python mini_qwen_sft.py --config configs/sft.yaml --init_from results/pt
    # N GPUs, DeepSpeed ZeRO-2
    accelerate launch --config_file accelerate_config.yaml --num_processes 8 mini_qwen_sft.py --config configs/sft.yaml
    # the original's intent: first exchange only, no system prompt; or seed 000's mixed system prompts
    python mini_qwen_sft.py --config configs/sft.yaml --turns first --system_prompt_strategy none
    python mini_qwen_sft.py --config configs/sft.yaml --system_prompt_strategy mixed
    # faster: samples packed into rows without padding (attention kept inside each sample)
    python mini_qwen_sft.py --config configs/sft.yaml --packing true

Loss masking uses the chat template's {% generation %} markers (TRL's assistant_only_loss): every assistant token,
its <|im_end|> included, is trained; no system or user token is. Over-long samples lose their oldest turns first,
then the middle of their prompt, never their answer (counts are printed). Every YAML key is also a --flag.
"""

import random
import sys
from collections import Counter
from dataclasses import dataclass, field

from trl import SFTConfig, SFTTrainer

from utils.cache import build_or_load
from utils.chat import (DEFAULT_SYSTEM_PROMPT, SYSTEM_PROMPT_STRATEGIES, TURN_MODES, add_system_prompt, fill_identity,
                        fit_to_length, select_turns)
from utils.config import parse_stage_args, repo_path
from utils.data import SkipCounter, files_fingerprint, iter_normalized, resolve_data_files
from utils.modeling import build_model
from utils.packing import DocumentMaskCollator
from utils.peft_utils import apply_lora
from utils.tokenizer import load_tokenizer
from utils.training import stage_callbacks, train_and_save, with_skip_samples, write_data_report


@dataclass
class SFTScriptArguments:
    data_files: list[str] = field(default_factory=lambda: ["mini_data/sft"], metadata={
        "help": "conversation files, folders or globs (Infinity-Instruct, ShareGPT, messages, alpaca, prompt/response)"})
    init_from: str = field(default="results/pt", metadata={"help": "the pretrained checkpoint to fine-tune"})
    tokenizer_path: str | None = field(default=None, metadata={"help": "default: the tokenizer saved with init_from"})
    turns: str = field(default="all", metadata={
        "help": f"{'|'.join(TURN_MODES)}: train every assistant turn, or only the first exchange"})
    system_prompt_strategy: str = field(default="none", metadata={
        "help": f"{'|'.join(SYSTEM_PROMPT_STRATEGIES)}: as in the data; one default prompt; 50% default, 50% by category"})
    system_prompt: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "the default system prompt"})
    identity_file: str | None = field(default=None, metadata={
        "help": "identity Q&A with {{name}}/{{author}} placeholders mixed in, e.g. mini_data/identity/identity.jsonl"})
    identity_name: str = field(default="mini_qwen", metadata={"help": "fills {{name}} in the identity data"})
    identity_author: str = field(default="the mini_qwen authors", metadata={"help": "fills {{author}}"})
    identity_repeat: int = field(default=3, metadata={"help": "times the (small) identity set is repeated"})
    cache_dir: str = field(default="cache", metadata={"help": "where prepared conversations are kept for reuse"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto | sdpa | eager | flash_attention_2"})


def conversation_rows(files, tokenizer, script_args, max_length, seed, report):
    """Normalised conversations → chosen turns → system prompt → fitted into max_length."""
    counter = SkipCounter()
    fitted = Counter()
    rng = random.Random(seed)

    def shape(record):
        messages = select_turns(record["messages"], script_args.turns)
        messages = add_system_prompt(messages, record["category"], script_args.system_prompt_strategy, rng,
                                     script_args.system_prompt)
        messages, action = fit_to_length(messages, tokenizer, max_length)
        fitted[action or "fits"] += 1
        return {"messages": messages}

    yield from iter_normalized(files, "sft", counter, shape)
    report.update(records=counter.to_dict(), fitting=dict(fitted))
    if script_args.identity_file:
        identity_counter = SkipCounter()
        identity_files = resolve_data_files([repo_path(script_args.identity_file)])
        for _ in range(script_args.identity_repeat):
            yield from iter_normalized(identity_files, "sft", identity_counter, lambda record: shape(
                {**record, "messages": fill_identity(record["messages"], script_args.identity_name,
                                                     script_args.identity_author)}))
        report.update(identity=identity_counter.to_dict())


def prepare_dataset(script_args, tokenizer, training_args, logger):
    files = resolve_data_files([repo_path(f) for f in script_args.data_files])
    key = {"files": files_fingerprint(files), "vocab": len(tokenizer), "template": tokenizer.chat_template,
           "max_length": training_args.max_length, "turns": script_args.turns, "seed": training_args.seed,
           "system": [script_args.system_prompt_strategy, script_args.system_prompt],
           "identity": [script_args.identity_file and files_fingerprint([repo_path(script_args.identity_file)]),
                        script_args.identity_name, script_args.identity_author, script_args.identity_repeat],
           "version": 1}
    with training_args.main_process_first(desc="prepare conversations"):
        dataset, report = build_or_load(
            repo_path(script_args.cache_dir), "sft", key,
            lambda report: conversation_rows(files, tokenizer, script_args, training_args.max_length,
                                             training_args.seed, report),
            log=logger.info)
    logger.info(SkipCounter.from_dict(report["records"]).report(f"SFT data ({len(files)} files)"))
    if "identity" in report:
        logger.info(SkipCounter.from_dict(report["identity"]).report(
            f"identity data x{script_args.identity_repeat} ({script_args.identity_name}, {script_args.identity_author})"))
    logger.info("fitting into max_length=%d: %s", training_args.max_length,
                ", ".join(f"{action}: {count}" for action, count in sorted(report["fitting"].items())))
    write_data_report(training_args, report)
    return dataset


def main(argv: list[str] | None = None):
    script_args, lora_args, crash_args, training_args, logger = parse_stage_args(
        SFTScriptArguments, SFTConfig, argv)
    if training_args.max_length is None:
        raise ValueError("max_length must be set: over-long conversations are fitted to it before training")

    init_from = repo_path(script_args.init_from)
    tokenizer = load_tokenizer(repo_path(script_args.tokenizer_path) or init_from)
    train_dataset = prepare_dataset(script_args, tokenizer, training_args, logger)
    # Every row already fits max_length; padding-free batches need it unset (TRL's rule).
    if training_args.padding_free and not training_args.packing:
        training_args.max_length = None

    model = build_model(None, init_from, script_args.attn_implementation, training_args.seed)
    model = apply_lora(model, lora_args, logger)

    callbacks = stage_callbacks(crash_args)
    trainer = with_skip_samples(SFTTrainer, crash_args)(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if training_args.packing or training_args.padding_free:
        trainer.data_collator = DocumentMaskCollator(trainer.data_collator, model.config._attn_implementation)
    train_and_save(trainer, tokenizer, "sft")


if __name__ == "__main__":
    main(sys.argv[1:])
