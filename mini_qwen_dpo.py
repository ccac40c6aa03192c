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
    # prepare the data only (every core), e.g. before a multi-GPU launch
    python mini_qwen_dpo.py --config configs/dpo.yaml --prepare_only
    # other preference losses of TRL's DPOTrainer, alone or weighted together
    python mini_qwen_dpo.py --config configs/dpo.yaml --loss_type ipo
    python mini_qwen_dpo.py --config configs/dpo.yaml --loss_type sigmoid sft --loss_weights 1.0 0.5
    # other methods on the same data: ORPO, SimPO, KTO (pairs unpaired, or prompt/completion/label data)
    python mini_qwen_dpo.py --config configs/dpo.yaml --method orpo --learning_rate 5e-6
    python mini_qwen_dpo.py --config configs/dpo.yaml --method simpo --beta 2.0 --simpo_gamma 1.0
    python mini_qwen_dpo.py --config configs/dpo.yaml --method kto

A reward model on the same pairs is a stage of its own: mini_qwen_rm.py.

Weights stay float32 under bf16 autocast: the original's lr 5e-7 updates on bf16 weights were rounded away.
Pairs with identical answers, empty answers or a prompt over max_prompt_length are counted and left out.
Every YAML key is also a --flag; with --method other than dpo, the flags are those of that method's TRL config:
the recipe's DPO-only keys are not used (the parser prints them), and the same keys given as flags are refused.
"""

import sys
from dataclasses import dataclass, field, fields

import utils  # noqa: F401  (first: it silences import-time noise, see utils/__init__.py)
import pyarrow as pa
from datasets import Features, List, Value
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.data_utils import common_prefix_length
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from utils.chat import ChatTokens, check_template_matches
from utils.compat import require
from utils.config import parse_stage_args, recipe_value, repo_path, start_run
from utils.crash_safety import SkipSamplesMixin
from utils.errors import ConfigError, run_main
from utils.files import SkipCounter, SkipRecord, files_fingerprint, resolve_data_files
from utils.lora import apply_lora
from utils.modeling import build_model, score_only_labelled_positions_on_cpu
from utils.muon import MuonArguments, muon_optimizer
from utils.preference import preference_conversations
from utils.prepare import (DataArguments, Preparation, code_fingerprint, prepare_or_load,
                           tokenizer_fingerprint)
from utils.throughput import ThroughputArguments
from utils.tokenizer import load_stage_tokenizer
from utils.training import (before_training, load_if_finished, save_and_report, stage_callbacks,
                            stop_if_interrupted, write_data_report)


# --method: TRL's trainer and config for each; all but dpo tokenize the normalised conversations themselves.
# simpo is CPO's loss_type "simpo" with CPO's NLL term off (cpo_alpha 0: the SimPO paper's loss); CPO itself is
# `--method simpo --cpo_alpha 1.0 --loss_type sigmoid`.
METHODS = {"dpo": (DPOConfig, DPOTrainer), "orpo": (ORPOConfig, ORPOTrainer), "simpo": (CPOConfig, CPOTrainer),
           "kto": (KTOConfig, KTOTrainer)}
# Set before the command line's flags, so a flag still wins; the recipe's loss_type is DPOTrainer's and never these.
METHOD_DEFAULTS = {"simpo": ["--loss_type", "simpo", "--cpo_alpha", "0"], "kto": ["--loss_type", "kto"]}


@dataclass
class DPOScriptArguments(DataArguments, ThroughputArguments, MuonArguments):
    data_files: list[str] = field(default_factory=lambda: ["mini_data/dpo"], metadata={
        "help": "preference files, folders or globs (Infinity-Preference, prompt/chosen/rejected strings, ShareGPT)"})
    init_from: str = field(default="results/sft", metadata={"help": "the SFT checkpoint to optimise"})
    tokenizer_path: str | None = field(default=None, metadata={"help": "default: the tokenizer saved with init_from"})
    max_prompt_length: int = field(default=512, metadata={"help": "pairs whose prompt is longer are left out"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto | sdpa | eager | flash_attention_2"})
    method: str = field(default="dpo", metadata={"help": f"{' | '.join(METHODS)}: the preference method"})


def preference_preparation(files, tokenizer, script_args, training_args, key) -> Preparation:
    """Normalised pairs → prompt_ids / chosen_ids / rejected_ids, exactly as TRL's DPOTrainer tokenizes
    conversational pairs (the prompt with the generation prompt; each answer from where the tokenized prompt and
    prompt + answer diverge), each message tokenized once. Runs in the preparation workers."""
    chat = ChatTokens(tokenizer)
    check_template_matches(tokenizer, chat)  # the saved template must render what is trained on

    def shape(pair, stats):
        prompt_bodies = [chat.body(m) for m in pair["prompt"]]
        prompt_part = chat.encode_bodies(pair["prompt"], prompt_bodies)[0]
        prompt_ids = prompt_part + chat.generation_prompt
        if len(prompt_ids) > script_args.max_prompt_length:
            raise SkipRecord(f"prompt longer than max_prompt_length={script_args.max_prompt_length}")
        chosen = prompt_part + chat.encode_conversation(pair["chosen"])
        rejected = prompt_part + chat.encode_conversation(pair["rejected"])
        prompt_length = min(common_prefix_length(prompt_ids, chosen), common_prefix_length(prompt_ids, rejected))
        if training_args.max_length is not None and training_args.truncation_mode == "keep_start" \
                and prompt_length >= training_args.max_length:
            raise SkipRecord(f"prompt alone fills max_length={training_args.max_length}")
        stats.tokens += len(chosen) + len(rejected) - prompt_length
        return {"prompt_ids": prompt_ids[:prompt_length], "chosen_ids": chosen[prompt_length:],
                "rejected_ids": rejected[prompt_length:]}

    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    schema = pa.schema([(column, pa.list_(pa.int32())) for column in columns])
    return Preparation("dpo", files, key, shape, schema, Features({c: List(Value("int32")) for c in columns}))


class PreparedDPOTrainer(SkipSamplesMixin, DPOTrainer):
    """DPOTrainer on rows that utils.prepare tokenized as TRL would: TRL 1.16 has no switch to skip its own
    tokenization, which would repeat the work on the main process while every other rank waits in a barrier.
    `_prepare_dataset` is TRL-internal: probed at start-up (utils.compat), and tests/test_compat.py checks that
    preference_preparation gives exactly TRL's own rows."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def prepare_dataset(script_args, tokenizer, training_args, logger):
    files = resolve_data_files([repo_path(f) for f in script_args.data_files])
    key = {"files": files_fingerprint(files), "tokenizer": tokenizer_fingerprint(tokenizer),
           "max_prompt_length": script_args.max_prompt_length, "code": code_fingerprint("mini_qwen_dpo.py")}
    if script_args.method == "dpo":
        key.update(max_length=training_args.max_length, truncation_mode=training_args.truncation_mode)
        preparation = preference_preparation(files, tokenizer, script_args, training_args, key)
    else:
        unpaired = script_args.method == "kto"
        key.update(rows="unpaired" if unpaired else "conversations", max_length=None)
        preparation = preference_conversations(files, tokenizer, key, script_args.max_prompt_length, unpaired)
    dataset, report = prepare_or_load(preparation, repo_path(script_args.cache_dir), script_args.data_workers,
                                      training_args.world_size, script_args.min_kept_fraction)
    logger.info(SkipCounter.from_dict(report["records"]).report(f"preference data ({len(files)} files)"))
    write_data_report(training_args, report)
    return dataset


def parse_method_args(argv: list[str]):
    """The stage's arguments with the TRL config of --method (peeked from the command line or the recipe)."""
    method = recipe_value(argv, "method", "dpo")
    if method not in METHODS:
        raise ConfigError(f"unknown --method {method!r}: one of {', '.join(METHODS)}")
    config_class = METHODS[method][0]
    # The DPO recipe's keys that this method's config lacks: not used, and said so (utils.config.parse_config).
    dpo_only = {f.name for f in fields(DPOConfig)} - {f.name for f in fields(config_class)}
    return parse_stage_args(DPOScriptArguments, config_class, METHOD_DEFAULTS.get(method, []) + argv,
                            unused_recipe_keys=(dpo_only, f"DPO-only settings, not used by --method {method}"))


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    script_args, lora_args, crash_args, tracker_args, training_args = parse_method_args(argv)
    method = script_args.method
    if method == "dpo":
        require("dpo_prepare_dataset")
    logger = start_run(training_args, tracker_args)
    score_only_labelled_positions_on_cpu()

    init_from = repo_path(script_args.init_from)
    tokenizer = load_stage_tokenizer(repo_path(script_args.tokenizer_path), init_from, script_args.prepare_only)
    train_dataset = prepare_dataset(script_args, tokenizer, training_args, logger)
    if script_args.prepare_only:
        return

    model = build_model(None, init_from, script_args.attn_implementation, training_args.seed, tokenizer=tokenizer)
    model = apply_lora(model, lora_args, logger)

    plot_keys = {"kto": ("loss", "rewards/chosen", "rewards/rejected", "kl"),
                 "orpo": ("loss", "nll_loss", "log_odds_ratio", "rewards/accuracies")}
    callbacks = stage_callbacks(crash_args, plot_keys.get(method, ("loss", "rewards/accuracies", "rewards/margins")),
                                script_args)
    trainer_class = PreparedDPOTrainer if method == "dpo" else type(
        f"Skipping{METHODS[method][1].__name__}", (SkipSamplesMixin, METHODS[method][1]), {})
    # TRL builds the frozen reference itself (or disables the adapters under LoRA); ORPO and SimPO have none.
    reference = {"ref_model": None} if method in ("dpo", "kto") else {}
    trainer = trainer_class(
        skip_samples=crash_args.skip_samples,
        model=model,
        **reference,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    muon_optimizer(trainer, script_args)
    checkpoint = before_training(trainer)
    if not load_if_finished(trainer, checkpoint):
        trainer.train(resume_from_checkpoint=checkpoint)
    stop_if_interrupted(trainer, method)
    save_and_report(trainer, tokenizer, method)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
