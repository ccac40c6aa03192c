"""Group relative policy optimisation (GRPO) of an SFT or DPO checkpoint on problems with checkable answers.

    # tiny CPU demo (from the demo SFT output)
    python demo/demo_grpo.py
    # one GPU, from the DPO (or SFT) checkpoint, on GSM8K and its Chinese counterpart (prepare.sh --only grpo)
    python mini_qwen_grpo.py --config configs/grpo.yaml
    python mini_qwen_grpo.py --config configs/grpo.yaml --init_from results/sft
    # N GPUs, DeepSpeed ZeRO-2
    accelerate launch --config_file accelerate_config.yaml --num_processes 8 mini_qwen_grpo.py --config configs/grpo.yaml
    # LoRA; a reward model (mini_qwen_rm.py) as a third reward
    python mini_qwen_grpo.py --config configs/grpo.yaml --use_peft true
    python mini_qwen_grpo.py --config configs/grpo.yaml --reward_funcs correct_answer answer_format results/rm

For each problem the model samples `num_generations` answers; each answer's rewards (utils.rewards: the right final
number, the `#### <number>` format; or yours) are compared within its group, and the policy is pushed towards the
better ones. Each reward is logged on its own (rewards/<name>/mean) and drawn in loss.png.
Weights stay float32 under bf16 autocast, as in the other stages. Every YAML key is also a --flag.
"""

import re
import sys
from dataclasses import dataclass, field

import utils  # noqa: F401  (first: it silences import-time noise, see utils/__init__.py)
import pyarrow as pa
from datasets import Features, List, Value
from trl import GRPOConfig, GRPOTrainer

from utils.chat import DEFAULT_SYSTEM_PROMPT
from utils.config import parse_stage_args, repo_path, start_run
from utils.errors import ConfigError, run_main
from utils.files import SkipCounter, SkipRecord, files_fingerprint, resolve_data_files
from utils.lora import apply_lora
from utils.modeling import build_model, score_only_labelled_positions_on_cpu
from utils.muon import MuonArguments, muon_optimizer
from utils.prepare import (DataArguments, Preparation, code_fingerprint, prepare_or_load,
                           tokenizer_fingerprint)
from utils.rewards import resolve_reward_funcs
from utils.throughput import ThroughputArguments
from utils.tokenizer import load_stage_tokenizer
from utils.training import (before_training, load_if_finished, save_and_report, stage_callbacks,
                            stop_if_interrupted, write_data_report)

CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass
class GRPOScriptArguments(DataArguments, ThroughputArguments, MuonArguments):
    data_files: list[str] = field(default_factory=lambda: ["mini_data/grpo"], metadata={
        "help": "problem files, folders or globs (GSM8K-shaped question/answer, the answer ending in '#### N')"})
    init_from: str = field(default="results/dpo", metadata={"help": "the SFT or DPO checkpoint to optimise"})
    tokenizer_path: str | None = field(default=None, metadata={"help": "default: the tokenizer saved with init_from"})
    reward_funcs: list[str] = field(default_factory=lambda: ["correct_answer", "answer_format"], metadata={
        "help": "utils.rewards names, module:function, or a reward-model folder; weights: --reward_weights"})
    system_prompt: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata={
        "help": "for problems without a system column"})
    instruction_en: str = field(
        default="Solve it step by step, then write the final number on the last line as: #### <number>",
        metadata={"help": "added after an English question"})
    instruction_zh: str = field(default="请一步一步地解答，最后一行写出最终的数字，格式为：#### <数字>",
                                metadata={"help": "added after a Chinese question"})
    max_prompt_length: int = field(default=256, metadata={"help": "problems whose prompt is longer are left out"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto | sdpa | eager | flash_attention_2"})


MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


def problem_preparation(files, tokenizer, script_args, key) -> Preparation:
    """Normalised problems → a conversational prompt (system, question + the answer-format instruction in the
    question's language) and the expected number. GRPOTrainer applies the chat template itself when it samples."""

    def shape(problem, stats):
        instruction = script_args.instruction_zh if CJK.search(problem["question"]) else script_args.instruction_en
        prompt = [{"role": "system", "content": problem["system"] or script_args.system_prompt},
                  {"role": "user", "content": f"{problem['question'].strip()}\n{instruction}"}]
        length = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"])
        if length > script_args.max_prompt_length:
            raise SkipRecord(f"prompt longer than max_prompt_length={script_args.max_prompt_length}")
        stats.tokens += length
        return {"prompt": prompt, "answer": problem["answer"]}

    schema = pa.schema([("prompt", pa.list_(MESSAGE)), ("answer", pa.string())])
    features = Features({"prompt": List({"role": Value("string"), "content": Value("string")}),
                         "answer": Value("string")})
    return Preparation("grpo", files, key, shape, schema, features)


def prepare_dataset(script_args, tokenizer, training_args, logger):
    files = resolve_data_files([repo_path(f) for f in script_args.data_files])
    key = {"files": files_fingerprint(files), "tokenizer": tokenizer_fingerprint(tokenizer),
           "prompt": [script_args.system_prompt, script_args.instruction_en, script_args.instruction_zh,
                      script_args.max_prompt_length],
           "code": code_fingerprint("mini_qwen_grpo.py", "utils/rewards.py")}
    dataset, report = prepare_or_load(problem_preparation(files, tokenizer, script_args, key),
                                      repo_path(script_args.cache_dir), script_args.data_workers,
                                      training_args.world_size, script_args.min_kept_fraction)
    logger.info(SkipCounter.from_dict(report["records"]).report(f"GRPO problems ({len(files)} files)"))
    write_data_report(training_args, report)
    return dataset


def main(argv: list[str] | None = None):
    script_args, lora_args, crash_args, tracker_args, training_args = parse_stage_args(
        GRPOScriptArguments, GRPOConfig, argv)
    logger = start_run(training_args, tracker_args)
    score_only_labelled_positions_on_cpu()
    if crash_args.skip_samples:
        raise ConfigError("--skip_samples is not supported by the GRPO stage (its batches are groups of sampled "
                          "answers, not data rows): leave the bad problems out of data_files instead")
    reward_funcs = resolve_reward_funcs(script_args.reward_funcs, repo_path)

    init_from = repo_path(script_args.init_from)
    tokenizer = load_stage_tokenizer(repo_path(script_args.tokenizer_path), init_from, script_args.prepare_only)
    train_dataset = prepare_dataset(script_args, tokenizer, training_args, logger)
    if script_args.prepare_only:
        return

    model = build_model(None, init_from, script_args.attn_implementation, training_args.seed, tokenizer=tokenizer)
    model = apply_lora(model, lora_args, logger)

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    reward_keys = [f"rewards/{name}/mean" for name in trainer.reward_func_names]
    for callback in stage_callbacks(crash_args, ("loss", "reward", *reward_keys, "completions/mean_length"),
                                    script_args):
        trainer.add_callback(callback)
    muon_optimizer(trainer, script_args)
    checkpoint = before_training(trainer)
    if not load_if_finished(trainer, checkpoint):
        trainer.train(resume_from_checkpoint=checkpoint)
    stop_if_interrupted(trainer, "grpo")
    save_and_report(trainer, tokenizer, "grpo")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
