"""A reward model: a score head on the SFT model, trained on prompt / chosen / rejected pairs to score the chosen
answer higher (TRL's RewardTrainer), its accuracy on held-out pairs measured before and after training. GRPO can
then use it as a reward (`mini_qwen_grpo.py --reward_funcs ... results/rm`).

    # tiny CPU demo (from the demo SFT output)
    python demo/demo_rm.py
    # one GPU
    python mini_qwen_rm.py --config configs/rm.yaml                      # from results/sft
    # N GPUs, DeepSpeed ZeRO-2
    accelerate launch --config_file accelerate_config.yaml --num_processes 8 mini_qwen_rm.py --config configs/rm.yaml
    # prepare the data only (every core), e.g. before a multi-GPU launch
    python mini_qwen_rm.py --config configs/rm.yaml --prepare_only

The pairs are those of the DPO stage (any shape it reads). A pair whose prompt is over max_prompt_length, or whose
prompt + answer is over max_length, is counted and left out. Every YAML key is also a --flag.
"""

import sys
from dataclasses import dataclass, field

import utils  # noqa: F401  (first: it silences import-time noise, see utils/__init__.py)
from trl import RewardConfig, RewardTrainer

from utils.config import parse_stage_args, repo_path, start_run
from utils.crash_safety import SkipSamplesMixin
from utils.errors import ConfigError, run_main
from utils.files import SkipCounter, files_fingerprint, resolve_data_files
from utils.modeling import build_reward_model, score_only_labelled_positions_on_cpu
from utils.muon import MuonArguments, muon_optimizer
from utils.preference import hold_out, preference_conversations
from utils.prepare import DataArguments, code_fingerprint, prepare_or_load, tokenizer_fingerprint
from utils.throughput import ThroughputArguments
from utils.tokenizer import load_stage_tokenizer
from utils.training import (before_training, load_if_finished, save_and_report, stage_callbacks,
                            stop_if_interrupted, write_data_report)


@dataclass
class RewardScriptArguments(DataArguments, ThroughputArguments, MuonArguments):
    data_files: list[str] = field(default_factory=lambda: ["mini_data/dpo"], metadata={
        "help": "preference files, folders or globs (Infinity-Preference, prompt/chosen/rejected strings, ShareGPT)"})
    init_from: str = field(default="results/sft", metadata={"help": "the SFT checkpoint the score head goes on"})
    tokenizer_path: str | None = field(default=None, metadata={"help": "default: the tokenizer saved with init_from"})
    max_prompt_length: int = field(default=512, metadata={"help": "pairs whose prompt is longer are left out"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto | sdpa | eager | flash_attention_2"})
    heldout_fraction: float = field(default=0.1, metadata={
        "help": "share of the pairs held out to measure the reward model's accuracy on"})


class SkippingRewardTrainer(SkipSamplesMixin, RewardTrainer):
    """RewardTrainer that can skip a bad stretch of data on resume (--skip_samples, utils.crash_safety)."""


def prepare_dataset(script_args, tokenizer, training_args, logger):
    files = resolve_data_files([repo_path(f) for f in script_args.data_files])
    key = {"files": files_fingerprint(files), "tokenizer": tokenizer_fingerprint(tokenizer),
           "max_prompt_length": script_args.max_prompt_length, "max_length": training_args.max_length,
           "rows": "conversations", "code": code_fingerprint("mini_qwen_rm.py")}
    preparation = preference_conversations(files, tokenizer, key, script_args.max_prompt_length,
                                           max_length=training_args.max_length)
    dataset, report = prepare_or_load(preparation, repo_path(script_args.cache_dir), script_args.data_workers,
                                      training_args.world_size, script_args.min_kept_fraction)
    logger.info(SkipCounter.from_dict(report["records"]).report(f"preference data ({len(files)} files)"))
    write_data_report(training_args, report)
    return dataset


def main(argv: list[str] | None = None):
    script_args, lora_args, crash_args, tracker_args, training_args = parse_stage_args(
        RewardScriptArguments, RewardConfig, argv)
    if lora_args.use_peft:
        raise ConfigError("the reward model trains a new score head on the whole model; LoRA is not supported here")
    logger = start_run(training_args, tracker_args)
    score_only_labelled_positions_on_cpu()

    init_from = repo_path(script_args.init_from)
    tokenizer = load_stage_tokenizer(repo_path(script_args.tokenizer_path), init_from, script_args.prepare_only)
    dataset = prepare_dataset(script_args, tokenizer, training_args, logger)
    if script_args.prepare_only:
        return
    train_dataset, eval_dataset = hold_out(dataset, script_args.heldout_fraction, training_args.seed)
    logger.info("reward model: %d pairs to train on, %d held out", len(train_dataset), len(eval_dataset))

    model = build_reward_model(init_from, tokenizer, script_args.attn_implementation, training_args.seed)
    trainer = SkippingRewardTrainer(
        skip_samples=crash_args.skip_samples,
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=stage_callbacks(crash_args, ("loss", "accuracy", "margin"), script_args),
    )
    muon_optimizer(trainer, script_args)
    checkpoint = before_training(trainer)
    before = trainer.evaluate() if not checkpoint else None
    if not load_if_finished(trainer, checkpoint):
        trainer.train(resume_from_checkpoint=checkpoint)
    stop_if_interrupted(trainer, "rm")
    after = trainer.evaluate()
    if before:  # train() starts a new log history: the starting point goes back to its front
        trainer.state.log_history.insert(0, {**before, "step": 0})
    logger.info("reward model on %d held-out pairs: accuracy %s -> %.3f", len(eval_dataset),
                f"{before['eval_accuracy']:.3f}" if before else "(resumed)", after["eval_accuracy"])
    save_and_report(trainer, tokenizer, "rm", score_heldout_text=False)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
