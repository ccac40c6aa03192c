"""Pretraining: a Qwen2.5-architecture model from random init (or an existing checkpoint) on packed documents.

    # tiny CPU demo (mini_data, tiny model, block 128): a few minutes
    python demo/demo_pt.py
    # one GPU
    python mini_qwen_pt.py --config configs/pt.yaml
    # N GPUs, DeepSpeed ZeRO-2 (see accelerate_config.yaml)
    accelerate launch --config_file accelerate_config.yaml --num_processes 8 mini_qwen_pt.py --config configs/pt.yaml
    # in the background
    bash run.sh pt --gpus 8 --bg
    # continued pretraining of a checkpoint with LoRA adapters (seed 004)
    python mini_qwen_pt.py --config configs/pt.yaml --init_from results/pt --use_peft --lora_r 64
    # 16 GB-class GPU: bf16 weights and AdamW moments, stochastic rounding, activation checkpointing
    python mini_qwen_pt.py --config configs/pt_lean.yaml
    # resume after a crash: the newest complete checkpoint in output_dir
    python mini_qwen_pt.py --config configs/pt.yaml --resume_from_checkpoint auto
    # tokenize and pack only (every core; before a multi-GPU launch, or on a CPU machine before renting GPUs)
    python mini_qwen_pt.py --config configs/pt.yaml --prepare_only

Every key of the YAML is also a --flag (the flag wins), including every TrainingArguments field.
"""

import sys
from dataclasses import dataclass, field

import utils  # noqa: F401  (first: it silences import-time noise, see utils/__init__.py)
from transformers import Trainer, TrainingArguments

from utils.config import parse_stage_args, repo_path, start_run
from utils.crash_safety import SkipSamplesMixin
from utils.errors import run_main
from utils.files import SkipCounter, files_fingerprint, resolve_data_files
from utils.lora import apply_lora
from utils.modeling import build_model, check_weight_precision, stochastic_rounding_adamw
from utils.muon import MuonArguments, muon_optimizer
from utils.packing import PACKING_MODES, PackingStats, PretrainCollator, pretraining_preparation
from utils.prepare import DataArguments, code_fingerprint, prepare_or_load, tokenizer_fingerprint
from utils.throughput import ThroughputArguments
from utils.tokenizer import load_tokenizer
from utils.training import (before_training, load_if_finished, save_and_report, stage_callbacks,
                            stop_if_interrupted, write_data_report)


@dataclass
class PretrainArguments(DataArguments, ThroughputArguments, MuonArguments):
    # data (and cache_dir, data_workers, prepare_only from DataArguments)
    data_files: list[str] = field(default_factory=lambda: ["mini_data/pt"], metadata={
        "help": "pretraining files, folders or globs (parquet/jsonl/json/txt with a `text` column)"})
    block_size: int = field(default=1024, metadata={"help": "tokens per training sample"})
    packing: str = field(default="concat", metadata={
        "help": f"{'|'.join(PACKING_MODES)}: concatenate into blocks; the same with attention kept inside each "
                "document; or one document per sample, padded"})
    min_quality_score: float | None = field(default=None, metadata={
        "help": "skip IndustryCorpus2 documents whose quality_score is below this"})
    # model
    model_config: str = field(default="models/mini_qwen_1b", metadata={
        "help": "config.json (or its folder) of the model to initialise randomly"})
    init_from: str | None = field(default=None, metadata={
        "help": "continue pretraining this checkpoint instead of a random init"})
    tokenizer_path: str | None = field(default=None, metadata={
        "help": "tokenizer folder; default: models/Qwen2.5-0.5B-Instruct if downloaded, else the offline rebuild"})
    attn_implementation: str = field(default="auto", metadata={
        "help": "auto (flash_attention_2 if installed on an Ampere+ GPU, else sdpa) | sdpa | eager | flash_attention_2"})
    weights_dtype: str = field(default="float32", metadata={
        "help": "float32 (master weights, bf16 autocast) | bfloat16 (half the weight and gradient memory; only with "
                "a stochastic-rounding optimizer, see configs/pt_lean.yaml)"})
    stochastic_rounding: bool = field(default=False, metadata={
        "help": "with bf16 weights: torchao's AdamW with bf16 moments, rounding updates stochastically (replaces "
                "--optim)"})


def prepare_dataset(script_args, tokenizer, training_args, logger):
    """Tokenize and pack once, with every core (utils.prepare); other ranks and reruns reuse the cached Arrow file."""
    files = resolve_data_files([repo_path(f) for f in script_args.data_files])
    key = {"files": files_fingerprint(files), "tokenizer": tokenizer_fingerprint(tokenizer),
           "block_size": script_args.block_size, "packing": script_args.packing,
           "min_quality_score": script_args.min_quality_score, "code": code_fingerprint()}
    preparation = pretraining_preparation(files, tokenizer, script_args.block_size, script_args.packing,
                                          script_args.min_quality_score, key)
    dataset, report = prepare_or_load(preparation, repo_path(script_args.cache_dir), script_args.data_workers,
                                      training_args.world_size, script_args.min_kept_fraction)
    logger.info(SkipCounter.from_dict(report["records"]).report(f"pretraining data ({len(files)} files)"))
    stats = PackingStats(**{k: v for k, v in report["packing"].items() if k != "padding_fraction"})
    logger.info(stats.report(script_args.packing, script_args.block_size))
    write_data_report(training_args, report)
    return dataset


class PretrainTrainer(SkipSamplesMixin, Trainer):
    """Trainer that can leave out the micro-batches of --skip_samples (after a bad data shard)."""


def main(argv: list[str] | None = None):
    script_args, lora_args, crash_args, tracker_args, training_args = parse_stage_args(
        PretrainArguments, TrainingArguments, argv)
    logger = start_run(training_args, tracker_args)
    check_weight_precision(script_args.weights_dtype, script_args.stochastic_rounding, training_args)

    tokenizer = load_tokenizer(repo_path(script_args.tokenizer_path))
    train_dataset = prepare_dataset(script_args, tokenizer, training_args, logger)
    if script_args.prepare_only:
        return

    model = build_model(repo_path(script_args.model_config), repo_path(script_args.init_from),
                        script_args.attn_implementation, training_args.seed, script_args.weights_dtype, tokenizer)
    model = apply_lora(model, lora_args, logger)

    callbacks = stage_callbacks(crash_args, throughput_args=script_args)
    trainer = PretrainTrainer(
        skip_samples=crash_args.skip_samples,
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=PretrainCollator(tokenizer.pad_token_id, model.config._attn_implementation),
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizer_cls_and_kwargs=stochastic_rounding_adamw(training_args) if script_args.stochastic_rounding else None,
    )
    muon_optimizer(trainer, script_args)
    checkpoint = before_training(trainer)
    if not load_if_finished(trainer, checkpoint):
        trainer.train(resume_from_checkpoint=checkpoint)
    stop_if_interrupted(trainer, "pt")
    save_and_report(trainer, tokenizer, "pt")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
