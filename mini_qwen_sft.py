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
    # reasoning and tool-use conversations (mini_data/sft_tools), the thinking read but not trained
    python mini_qwen_sft.py --config configs/sft.yaml --data_files mini_data/sft_tools --train_on_reasoning false
    # prepare the data only (every core), e.g. before a multi-GPU launch
    python mini_qwen_sft.py --config configs/sft.yaml --prepare_only

Loss masking uses the chat template's {% generation %} markers (TRL's assistant_only_loss): every assistant token,
its <|im_end|> included, is trained; no system or user token is. Tool calls are assistant text (<tool_call> blocks,
trained), tool results user text (<tool_response> blocks, not trained); `--train_on_reasoning false` leaves the
<think> blocks of answers out of the loss as well. Over-long samples lose their oldest turns first, then the middle
of their prompt, never their answer (counts are printed). Every YAML key is also a --flag.
"""

import random
import sys
import zlib
from dataclasses import dataclass, field

import utils  # noqa: F401  (first: it silences import-time noise, see utils/__init__.py)
import pyarrow as pa
from datasets import Features, List, Value
from trl import SFTConfig, SFTTrainer
from trl.data_utils import pack_dataset

from utils.chat import (DEFAULT_SYSTEM_PROMPT, SYSTEM_PROMPT_STRATEGIES, TURN_MODES, ChatTokens, add_system_prompt,
                        check_template_matches, fill_identity, select_turns)
from utils.config import parse_stage_args, repo_path, start_run
from utils.crash_safety import SkipSamplesMixin
from utils.errors import ConfigError, run_main
from utils.files import SkipCounter, files_fingerprint, resolve_data_files
from utils.formats import iter_normalized
from utils.lora import apply_lora
from utils.modeling import build_model, score_only_labelled_positions_on_cpu
from utils.muon import MuonArguments, muon_optimizer
from utils.packing import DocumentMaskCollator
from utils.prepare import (DataArguments, Preparation, UnitStats, code_fingerprint, default_workers, prepare_or_load,
                           tokenizer_fingerprint)
from utils.throughput import ThroughputArguments
from utils.tokenizer import load_stage_tokenizer
from utils.training import (before_training, load_if_finished, save_and_report, stage_callbacks,
                            stop_if_interrupted, write_data_report)


@dataclass
class SFTScriptArguments(DataArguments, ThroughputArguments, MuonArguments):
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
    train_on_reasoning: bool = field(default=True, metadata={
        "help": "train on the <think> blocks of answers; false: the model reads them, the loss skips them"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto | sdpa | eager | flash_attention_2"})


def conversation_preparation(files, tokenizer, script_args, training_args, key) -> Preparation:
    """Normalised conversations → chosen turns → system prompt → fitted into max_length → input_ids and labels,
    each message tokenized once (utils.chat.ChatTokens). Runs in the preparation workers; the identity set is
    added at the end by the main process."""
    chat = ChatTokens(tokenizer)
    check_template_matches(tokenizer, chat)  # the saved template must render what is trained on

    def shape(record, stats):
        messages = select_turns(record["messages"], script_args.turns)
        # One draw per conversation from its own seed, not a shared stream: any worker gives it the same prompt.
        rng = random.Random(zlib.crc32(f"{training_args.seed}\0{messages[-1]['content']}".encode()))
        messages = add_system_prompt(messages, record["category"], script_args.system_prompt_strategy, rng,
                                     script_args.system_prompt)
        messages, bodies, action = chat.fit(messages, training_args.max_length)
        input_ids, labels = chat.encode_bodies(messages, bodies, training_args.assistant_only_loss,
                                               script_args.train_on_reasoning)
        stats.tokens += len(input_ids)
        stats.counts[action or "fits"] += 1
        return {"input_ids": input_ids, "labels": labels}

    def identity_rows(report):
        counter, stats = SkipCounter(), UnitStats()
        identity_files = resolve_data_files([repo_path(script_args.identity_file)])
        for _ in range(script_args.identity_repeat):
            yield from iter_normalized(identity_files, "sft", counter, lambda record: shape(
                {**record, "messages": fill_identity(record["messages"], script_args.identity_name,
                                                     script_args.identity_author)}, stats))
        report.update(identity=counter.to_dict())

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
    features = Features({"input_ids": List(Value("int32")), "labels": List(Value("int32"))})
    return Preparation("sft", files, key, shape, schema, features,
                       extra_rows=identity_rows if script_args.identity_file else None)


def prepare_dataset(script_args, tokenizer, training_args, logger):
    files = resolve_data_files([repo_path(f) for f in script_args.data_files])
    key = {"files": files_fingerprint(files), "tokenizer": tokenizer_fingerprint(tokenizer),
           "max_length": training_args.max_length, "assistant_only_loss": training_args.assistant_only_loss,
           "train_on_reasoning": script_args.train_on_reasoning,
           "turns": script_args.turns, "seed": training_args.seed,
           "system": [script_args.system_prompt_strategy, script_args.system_prompt],
           "identity": [script_args.identity_file and files_fingerprint([repo_path(script_args.identity_file)]),
                        script_args.identity_name, script_args.identity_author, script_args.identity_repeat],
           "code": code_fingerprint("mini_qwen_sft.py")}
    dataset, report = prepare_or_load(conversation_preparation(files, tokenizer, script_args, training_args, key),
                                      repo_path(script_args.cache_dir), script_args.data_workers,
                                      training_args.world_size, script_args.min_kept_fraction)
    logger.info(SkipCounter.from_dict(report["records"]).report(f"SFT data ({len(files)} files)"))
    if "identity" in report:
        logger.info(SkipCounter.from_dict(report["identity"]).report(
            f"identity data x{script_args.identity_repeat} ({script_args.identity_name}, {script_args.identity_author})"))
    logger.info("fitting into max_length=%d: %s", training_args.max_length,
                ", ".join(f"{action}: {count}" for action, count in sorted(report["counts"].items())))
    write_data_report(training_args, report)
    if training_args.packing:
        # TRL's own packing (best-fit decreasing), run here rather than inside SFTTrainer so that `--prepare_only`
        # leaves its result in the datasets cache beside the prepared file and launched ranks just load it.
        dataset = pack_dataset(dataset, training_args.max_length, training_args.packing_strategy,
                               {"num_proc": script_args.data_workers or default_workers()})
    return dataset


class SFTStageTrainer(SkipSamplesMixin, SFTTrainer):
    """SFTTrainer that can leave out the micro-batches of --skip_samples (after a bad data shard)."""


def main(argv: list[str] | None = None):
    script_args, lora_args, crash_args, tracker_args, training_args = parse_stage_args(
        SFTScriptArguments, SFTConfig, argv)
    logger = start_run(training_args, tracker_args)
    score_only_labelled_positions_on_cpu()
    if training_args.max_length is None:
        raise ConfigError("max_length must be set: over-long conversations are fitted to it before training")

    init_from = repo_path(script_args.init_from)
    tokenizer = load_stage_tokenizer(repo_path(script_args.tokenizer_path), init_from, script_args.prepare_only)
    train_dataset = prepare_dataset(script_args, tokenizer, training_args, logger)
    if script_args.prepare_only:
        return
    # The rows already hold input_ids and labels (assistant tokens only, as assistant_only_loss asked), fitted into
    # max_length and packed when asked: TRL's own preparation would only tokenize them again, inside a barrier.
    training_args.assistant_only_loss = False
    training_args.dataset_kwargs = {**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    # Every row already fits max_length; padding-free batches need it unset (TRL's rule).
    if training_args.padding_free and not training_args.packing:
        training_args.max_length = None

    model = build_model(None, init_from, script_args.attn_implementation, training_args.seed, tokenizer=tokenizer)
    model = apply_lora(model, lora_args, logger)

    callbacks = stage_callbacks(crash_args, throughput_args=script_args)
    trainer = SFTStageTrainer(
        skip_samples=crash_args.skip_samples,
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if training_args.packing or training_args.padding_free:
        trainer.data_collator = DocumentMaskCollator(trainer.data_collator, model.config._attn_implementation)
    muon_optimizer(trainer, script_args)
    checkpoint = before_training(trainer)
    if not load_if_finished(trainer, checkpoint):
        trainer.train(resume_from_checkpoint=checkpoint)
    stop_if_interrupted(trainer, "sft")
    save_and_report(trainer, tokenizer, "sft")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
