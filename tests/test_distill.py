"""Distillation stage (mini_qwen_distill.py): the tiny SFT checkpoint teaches a random tiny model (same tokenizer).
The student's KL to the teacher falls; TRL's GKD loss with lmbda=0, beta=0 is forward KL(teacher || student) on the
labelled positions, computed here by hand (the teacher on the trainer's device or its own); on-policy GKD and the
raw-text objective run."""

import json

import pytest
import torch
from datasets import Dataset
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import REPO, cpu_flags
from mini_qwen_distill import DistillCollator, DistillTrainer, main, save_tiny_model
from utils.errors import ConfigError


def forward_kl(teacher, student, batch) -> torch.Tensor:
    """KL(teacher || student) per labelled position (logits at i predict token i + 1), averaged."""
    with torch.no_grad():
        logits = [m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                  for m in (teacher, student)]
    mask = batch["labels"][:, 1:] != -100
    teacher_logp, student_logp = (F.log_softmax(l[mask].double(), dim=-1) for l in logits)
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()


def rows(tokenizer):
    """Two conversations of different lengths: the answers labelled, the prompts not, the shorter one padded."""
    out = []
    for question, answer in [("What is 2 + 2?", "4."), ("Name a colour of the sky.", "Blue, on a clear day.")]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
        answer_ids = tokenizer(answer + "<|im_end|>\n")["input_ids"]
        out.append({"input_ids": prompt + answer_ids, "labels": [-100] * len(prompt) + answer_ids})
    return out


def run_stage(tmp_path, teacher, student, *flags):
    out = tmp_path / "out"
    main(["--config", str(REPO / "configs" / "demo_distill.yaml"), *cpu_flags(out, tmp_path / "cache"),
          "--teacher_path", str(teacher), "--init_from", str(student), *flags])
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A fresh random tiny student: the PT fixture is too close to its own 6-step SFT (KL ~1e-3) to show much."""
    folder = tmp_path_factory.mktemp("student")
    save_tiny_model(folder, seed=2)
    return folder


def test_student_kl_to_teacher_falls(tmp_path, tokenizer, student, sft_checkpoint):
    out = run_stage(tmp_path, sft_checkpoint, student, "--max_steps", "6")
    batch = DistillCollator(tokenizer.pad_token_id)(rows(tokenizer))  # not training data: the fall generalises
    teacher, before, after = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (sft_checkpoint, student, out))
    kl_before, kl_after = forward_kl(teacher, before, batch), forward_kl(teacher, after, batch)
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    print(f"KL(teacher || student) on held-out rows: {kl_before:.4f} -> {kl_after:.4f}; training losses {losses}")
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after, losses)


@pytest.mark.parametrize("teacher_device", [None, "cpu"], ids=["trainer_device", "own_device"])
def test_gkd_without_on_policy_or_blend_is_forward_kl(tmp_path, tokenizer, student, sft_checkpoint, teacher_device):
    from trl.experimental.gkd import GKDConfig

    student, teacher = (AutoModelForCausalLM.from_pretrained(p) for p in (student, sft_checkpoint))
    args = GKDConfig(output_dir=str(tmp_path), lmbda=0.0, beta=0.0, use_cpu=True, bf16=False, report_to=[],
                     max_length=256, per_device_train_batch_size=2)
    trainer = DistillTrainer(teacher_device=teacher_device, model=student, teacher_model=teacher.eval(), args=args,
                             train_dataset=Dataset.from_list(rows(tokenizer)),
                             data_collator=DistillCollator(tokenizer.pad_token_id), processing_class=tokenizer)
    batch = DistillCollator(tokenizer.pad_token_id)(rows(tokenizer))
    assert (batch["attention_mask"] == 0).any()  # padding is in play, and must stay out of the loss
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    expected = forward_kl(teacher, student, batch)
    print(f"GKD loss {loss.item():.6f}, forward KL by hand {expected.item():.6f}")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert expected > 0.01  # a real difference between the two models, not 0 == 0


def test_collator_prompt_is_everything_before_the_last_answer(tokenizer):
    batch = DistillCollator(tokenizer.pad_token_id)(rows(tokenizer))
    for i, row in enumerate(rows(tokenizer)):
        prompt_length = row["labels"].count(-100)
        kept = batch["prompt_attention_mask"][i].bool()
        assert batch["prompts"][i][kept].tolist() == row["input_ids"][:prompt_length]
        assert kept[-1]  # left-padded: the prompt ends where generation starts


@pytest.mark.parametrize("flags", [
    ["--method", "gkd", "--lmbda", "1.0", "--beta", "0.5", "--max_new_tokens", "8"],  # on-policy: student answers
    ["--objective", "pt", "--block_size", "64", "--pt_data_files", str(REPO / "mini_data" / "pt")],  # raw text
], ids=["gkd_on_policy", "pt_objective"])
def test_other_modes_train(tmp_path, pt_checkpoint, sft_checkpoint, flags):
    out = run_stage(tmp_path, sft_checkpoint, pt_checkpoint, "--max_steps", "2", *flags)
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(losses) == 2 and all(l == l and l >= 0 for l in losses)


def test_pt_objective_refuses_on_policy(tmp_path, pt_checkpoint, sft_checkpoint):
    with pytest.raises(ConfigError, match="on-policy"):
        run_stage(tmp_path, sft_checkpoint, pt_checkpoint, "--objective", "pt", "--method", "gkd")
