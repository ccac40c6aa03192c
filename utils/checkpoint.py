"""Checkpoints that a crash cannot corrupt, `auto` resume, and final models that load anywhere."""

import json
import logging
import re
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger("mini_qwen")

COMPLETE_MARKER = "checkpoint_complete"
STAGE_FILE = "mini_qwen_stage.json"


class CheckpointCompleteCallback(TrainerCallback):
    """Marks a checkpoint folder complete once the Trainer has written all of it (weights, optimizer, scheduler,
    RNG state, trainer_state.json). A crash while saving leaves no marker, so `auto` resume skips that folder."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / COMPLETE_MARKER).write_text(f"{state.global_step}\n")


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)
             and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """`auto`: the newest complete checkpoint in output_dir, or a fresh start if there is none; a path: that
    checkpoint, which must exist."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "auto":
        checkpoints = complete_checkpoints(output_dir)
        if not checkpoints:
            logger.info("resume=auto: no complete checkpoint in %s, starting from scratch", output_dir)
            return None
        logger.info("resume=auto: resuming from %s", checkpoints[-1])
        return str(checkpoints[-1])
    if not Path(resume_from_checkpoint).is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: no such checkpoint folder {resume_from_checkpoint}")
    return resume_from_checkpoint


def save_final_model(trainer, tokenizer, output_dir: str, stage: str) -> None:
    """Model, tokenizer (with the chat template) and generation_config in one folder that
    `AutoModelForCausalLM.from_pretrained` + `AutoTokenizer.from_pretrained` load with no project code, plus
    trainer_state.json (the logged curves), and mini_qwen_stage.json saying which stage made it (the evaluator picks raw-text or chat mode from it)."""
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
        trainer.state.save_to_json(str(Path(output_dir) / "trainer_state.json"))
        (Path(output_dir) / STAGE_FILE).write_text(json.dumps({"stage": stage}) + "\n")
        logger.info("final model, tokenizer and generation_config saved to %s", output_dir)
