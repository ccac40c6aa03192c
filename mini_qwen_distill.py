"""Distillation: a student learns a frozen teacher's next-token distributions (logit distillation), on the assistant
tokens of conversations (`--objective sft`, the SFT stage's data preparation) or on every token of raw text
(`--objective pt`, the PT stage's), either off-policy by forward KL(teacher || student) on the data (`--method kl`)
or by TRL's GKD (`--method gkd`): with probability `lmbda` the student answers the prompt itself and learns the
teacher's distributions on its own answer; `beta` blends forward KL (0) and reverse KL (1) into a generalised JSD.

    # tiny CPU demo (a tiny random teacher and student made on the spot; see demo/demo_distill.py)
    python demo/demo_distill.py
    # one GPU, a local Qwen2.5 teacher (same tokenizer, id for id; `bash prepare.sh --only teacher` fetches one)
    python mini_qwen_distill.py --config configs/distill.yaml --teacher_path models/Qwen2.5-1.5B-Instruct
    # on-policy GKD: half the batches answered by the student, generalised JSD halfway between both KLs
    python mini_qwen_distill.py --config configs/distill.yaml --method gkd --lmbda 0.5 --beta 0.5
    # pretraining-style: every token of mini_data/pt-shaped text, the teacher on a second GPU
    python mini_qwen_distill.py --config configs/distill.yaml --objective pt --teacher_device cuda:1

The teacher is frozen, bf16 on a GPU (fp32 on a CPU), on the trainer's device or on `--teacher_device`. It must
share the student's vocabulary: the two distributions are compared token id by token id. The KL is taken over the
full vocabulary, so every batch holds the student's and the teacher's full logits: keep batches small. Every YAML
key is also a --flag, GKDConfig's (lmbda, beta, temperature, max_new_tokens, seq_kd) included.
"""

import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import utils  # noqa: F401  (first: it silences import-time noise, see utils/__init__.py)
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from trl.experimental.gkd import GKDConfig, GKDTrainer

import mini_qwen_pt
from mini_qwen_sft import SFTScriptArguments, prepare_dataset as prepare_conversations
from utils.config import parse_stage_args, repo_path, start_run
from utils.crash_safety import SkipSamplesMixin
from utils.errors import ConfigError, run_main
from utils.lora import apply_lora
from utils.modeling import build_model
from utils.muon import muon_optimizer
from utils.tokenizer import load_stage_tokenizer
from utils.training import before_training, load_if_finished, save_and_report, stage_callbacks, stop_if_interrupted

METHODS = ("kl", "gkd")
OBJECTIVES = ("sft", "pt")


@dataclass
class DistillArguments(SFTScriptArguments):
    teacher_path: str = field(default="models/Qwen2.5-1.5B-Instruct", metadata={
        "help": "the teacher checkpoint (local folder; same tokenizer as the student)"})
    teacher_device: str | None = field(default=None, metadata={
        "help": "where the teacher runs, e.g. cuda:1; default: the trainer's device"})
    method: str = field(default="kl", metadata={
        "help": f"{'|'.join(METHODS)}: forward KL on the data; TRL's GKD (lmbda, beta, temperature)"})
    objective: str = field(default="sft", metadata={
        "help": f"{'|'.join(OBJECTIVES)}: assistant tokens of conversations; every token of raw text (pt_data_files)"})
    pt_data_files: list[str] = field(default_factory=lambda: ["mini_data/pt"], metadata={
        "help": "raw text for --objective pt, prepared as the PT stage does"})
    block_size: int = field(default=1024, metadata={"help": "--objective pt: tokens per sample (packed documents)"})


class DistillCollator:
    """Right-padded input_ids / attention_mask / labels (-100 off the loss) and, for GKD's on-policy steps, the
    prompts left-padded: everything before the last assistant answer. Rows without labels (raw text) are scored on
    every token and have no prompt."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(row["input_ids"]) for row in rows)
        batch = {"input_ids": torch.full((len(rows), width), self.pad_token_id),
                 "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
                 "labels": torch.full((len(rows), width), -100)}
        prompts = []
        for i, row in enumerate(rows):
            ids = torch.tensor(row["input_ids"])
            labels = torch.tensor(row["labels"]) if "labels" in row else ids
            batch["input_ids"][i, :len(ids)], batch["labels"][i, :len(ids)] = ids, labels
            batch["attention_mask"][i, :len(ids)] = 1
            unlabelled = (labels == -100).nonzero().flatten()  # the last answer starts after the last of these
            prompts.append(ids[:int(unlabelled[-1]) + 1] if len(unlabelled) else ids[:0])
        longest = max(len(p) for p in prompts)
        batch["prompts"] = torch.full((len(rows), longest), self.pad_token_id)
        batch["prompt_attention_mask"] = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            batch["prompts"][i, longest - len(prompt):] = prompt
            batch["prompt_attention_mask"][i, longest - len(prompt):] = 1
        return batch


class TeacherOnDevice(nn.Module):
    """The teacher on its own device: inputs go there, float32 logits come back to the student's device. The teacher
    is held outside the module tree, so the Trainer's device placement does not move it."""

    def __init__(self, teacher, device: str):
        super().__init__()
        self.__dict__["teacher"] = teacher.to(device)
        self.config, self.device_ = teacher.config, torch.device(device)

    def forward(self, input_ids, attention_mask):
        device = self.device_
        logits = self.teacher(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        return SimpleNamespace(logits=logits.to(input_ids.device, torch.float32))


class DistillTrainer(SkipSamplesMixin, GKDTrainer):
    """TRL's GKDTrainer (method kl: lmbda=0, beta=0, so forward KL on the data), able to leave out the micro-batches
    of --skip_samples and to run the teacher on its own device."""

    def __init__(self, *args, teacher_device: str | None = None, **kwargs):
        teacher = kwargs["teacher_model"]
        if teacher_device:
            kwargs["teacher_model"] = TeacherOnDevice(teacher, teacher_device)
        super().__init__(*args, **kwargs)
        self.teacher_model.requires_grad_(False)


def check_args(script_args, training_args):
    if script_args.method not in METHODS:
        raise ConfigError(f"--method {script_args.method!r}: one of {', '.join(METHODS)}")
    if script_args.objective not in OBJECTIVES:
        raise ConfigError(f"--objective {script_args.objective!r}: one of {', '.join(OBJECTIVES)}")
    if training_args.max_length is None:
        raise ConfigError("max_length must be set: over-long conversations are fitted to it before training")
    if training_args.packing or training_args.padding_free:
        raise ConfigError("distillation compares whole padded rows: set packing and padding_free to false")
    if script_args.method == "kl":
        training_args.lmbda, training_args.beta, training_args.seq_kd = 0.0, 0.0, False
    elif script_args.objective == "pt" and (training_args.lmbda > 0 or training_args.seq_kd):
        raise ConfigError("--objective pt has no prompts to answer: on-policy GKD needs lmbda 0 and seq_kd false")


def prepare_dataset(script_args, tokenizer, training_args, logger):
    if script_args.objective == "sft":
        return prepare_conversations(script_args, tokenizer, training_args, logger)
    pt_args = SimpleNamespace(data_files=script_args.pt_data_files, block_size=script_args.block_size,
                              packing="concat", min_quality_score=None, cache_dir=script_args.cache_dir,
                              data_workers=script_args.data_workers, min_kept_fraction=script_args.min_kept_fraction)
    return mini_qwen_pt.prepare_dataset(pt_args, tokenizer, training_args, logger)


def load_teacher(script_args, training_args, tokenizer, logger):
    """Frozen, eval mode, bf16 where the teacher runs on a GPU, fp32 on a CPU."""
    device = script_args.teacher_device or ("cpu" if training_args.use_cpu or not torch.cuda.is_available() else "cuda")
    weights = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    teacher = build_model(None, repo_path(script_args.teacher_path), script_args.attn_implementation,
                          training_args.seed, weights, tokenizer)
    logger.info("teacher: %s, %s on %s, frozen", script_args.teacher_path, weights, device)
    return teacher.eval().requires_grad_(False)


def save_tiny_model(folder, seed: int, initializer_range: float = 0.02, model_config: str = "models/mini_qwen_tiny"):
    """A randomly initialised tiny model with the repo's tokenizer, saved to `folder`: a stand-in teacher or student
    for the CPU demo (no download). A wide `initializer_range` gives a teacher with peaked distributions to learn."""
    from utils.modeling import load_model_config
    from utils.tokenizer import load_tokenizer

    config = load_model_config(repo_path(model_config))
    config.initializer_range = initializer_range
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)


def main(argv: list[str] | None = None):
    script_args, lora_args, crash_args, tracker_args, training_args = parse_stage_args(
        DistillArguments, GKDConfig, argv)
    logger = start_run(training_args, tracker_args)
    check_args(script_args, training_args)

    init_from = repo_path(script_args.init_from)
    tokenizer = load_stage_tokenizer(repo_path(script_args.tokenizer_path), init_from, script_args.prepare_only)
    train_dataset = prepare_dataset(script_args, tokenizer, training_args, logger)
    if script_args.prepare_only:
        return
    # Rows already hold input_ids and labels (assistant tokens only), fitted into max_length.
    training_args.assistant_only_loss = False

    model = build_model(None, init_from, script_args.attn_implementation, training_args.seed, tokenizer=tokenizer)
    model = apply_lora(model, lora_args, logger)
    teacher = load_teacher(script_args, training_args, tokenizer, logger)
    logger.info("distillation: method %s (lmbda %s, beta %s), objective %s", script_args.method, training_args.lmbda,
                training_args.beta, script_args.objective)

    trainer = DistillTrainer(
        skip_samples=crash_args.skip_samples,
        teacher_device=script_args.teacher_device,
        model=model,
        teacher_model=teacher,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=DistillCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=stage_callbacks(crash_args, throughput_args=script_args),
    )
    muon_optimizer(trainer, script_args)
    checkpoint = before_training(trainer)
    if not load_if_finished(trainer, checkpoint):
        trainer.train(resume_from_checkpoint=checkpoint)
    stop_if_interrupted(trainer, "distill")
    save_and_report(trainer, tokenizer, "distill")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
