"""Checkpoints that a crash cannot corrupt, `auto` resume, and final models that load anywhere."""

import json
import logging
import re
from pathlib import Path

import xxhash

from utils.errors import UserError

logger = logging.getLogger("mini_qwen")

COMPLETE_MARKER = "checkpoint_complete"
STAGE_FILE = "mini_qwen_stage.json"


class CheckpointError(UserError):
    """A checkpoint that this run cannot resume as asked."""


def batch_geometry(args) -> dict:
    return {"world_size": args.world_size, "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "global_batch": args.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps}


def _describe(geometry: dict) -> str:
    return (f"{geometry['world_size']} process(es) x micro-batch {geometry['per_device_train_batch_size']} x "
            f"accumulation {geometry['gradient_accumulation_steps']} = {geometry['global_batch']} samples per step")


def check_resumable(checkpoint: str, args, deepspeed: bool) -> None:
    """Stop before training when `checkpoint` cannot be continued faithfully by this launch.

    - Another global batch: the step count, the data position (steps x samples per step) and the schedule would
      all mean something else. The same global batch on another number of processes is fine: the Trainer skips
      the same samples either way (each rank skips its share).
    - A DeepSpeed checkpoint without DeepSpeed, or the reverse: the optimizer state is where the other kind does
      not look (the Trainer would go on with a fresh optimizer).
    - A ZeRO-2 checkpoint on another number of processes: its optimizer state is partitioned per rank, and
      DeepSpeed fails deep inside its loader; its universal-checkpoint tool re-partitions it.
    """
    marker = Path(checkpoint) / COMPLETE_MARKER
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError):
        return  # written before markers held the geometry: nothing to check against
    now = batch_geometry(args)
    zero_folders = sorted(Path(checkpoint).glob("global_step*"))
    if bool(zero_folders) != deepspeed:
        written, running, launcher = (
            ("DeepSpeed", "without it", "accelerate_config.yaml") if zero_folders else
            ("plain PyTorch (no DeepSpeed)", "under DeepSpeed", "python, torchrun or accelerate_config_ddp.yaml"))
        raise CheckpointError(f"{checkpoint}: written by a {written} run, and this run is {running}: its optimizer "
                              f"state would not be found. Resume with the launcher that wrote it ({launcher}).")
    if saved["global_batch"] != now["global_batch"]:
        per_step = now["world_size"] * now["per_device_train_batch_size"]
        hint = (f" Resume with --gradient_accumulation_steps {saved['global_batch'] // per_step} to keep it."
                if saved["global_batch"] % per_step == 0 else " Choose a micro-batch and accumulation that give it.")
        raise CheckpointError(
            f"{checkpoint}: written with {_describe(saved)}; this run has {_describe(now)}. The step count, data "
            f"position and learning-rate schedule are in steps of {saved['global_batch']} samples.{hint}")
    if zero_folders and saved["world_size"] != now["world_size"]:
        step_folder = zero_folders[-1]
        raise CheckpointError(
            f"{checkpoint}: a DeepSpeed ZeRO-2 checkpoint of {saved['world_size']} processes, whose optimizer state is "
            f"split into {saved['world_size']} parts; this launch has {now['world_size']}. Resume with "
            f"{saved['world_size']} processes, or re-partition it with DeepSpeed's universal-checkpoint tool:\n"
            f"  python -m deepspeed.checkpoint.ds_to_universal --input_folder {step_folder} "
            f"--output_folder {step_folder}_universal && echo {step_folder.name}_universal > {checkpoint}/latest\n"
            f"and add \"checkpoint\": {{\"load_universal\": true}} to configs/ds_zero2.json for the resumed run.")


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)
             and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _file_hash(path: Path) -> str:
    # xxh3 (datasets depends on xxhash): 8.8 GB/s against blake2b's 0.74 GB/s (one core, measured), which would add
    # ~16 s to every save and every resume of a 1B run's 12 GB checkpoint. It finds damage, not tampering.
    with open(path, "rb") as handle:
        digest = xxhash.xxh3_128()
        while chunk := handle.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(folder: Path) -> dict[str, dict]:
    """Every file of a checkpoint (DeepSpeed's global_step*/ folder included) with its size and xxh3_128 hash,
    for its completion marker (the marker itself, and its half-written copy, left out)."""
    return {str(path.relative_to(folder)): {"bytes": path.stat().st_size, "xxh3_128": _file_hash(path)}
            for path in sorted(folder.rglob("*")) if path.is_file() and not path.name.startswith(COMPLETE_MARKER)}


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """What differs between a checkpoint and the file list in its completion marker (a file truncated, missing or
    changed since the save), or None. Sizes are compared first, so a truncated file is named without reading
    every file. A folder without a marker, or with a marker of the old format (no file list: written before
    markers listed the files), has nothing to check against and passes, as before."""
    folder = Path(checkpoint)
    try:
        listed = json.loads((folder / COMPLETE_MARKER).read_text()).get("files")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return f"{COMPLETE_MARKER}: unreadable ({err})"
    if listed is None:
        return None
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name}: missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name}: {path.stat().st_size:,} bytes, the marker says {expected['bytes']:,}"
    for name, expected in listed.items():
        if _file_hash(folder / name) != expected["xxh3_128"]:
            return f"{name}: same size ({expected['bytes']:,} bytes) but other contents than when it was saved"
    return None


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """`auto`: the newest complete checkpoint in output_dir that matches its marker (checkpoint_problem), or a
    fresh start if there is none; a path: that checkpoint, which must exist and match its marker.

    Every rank runs this and reaches the same answer from the same files; ranks on one node hash files that are
    in the page cache after the first read."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "auto":
        for checkpoint in reversed(complete_checkpoints(output_dir)):
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                logger.info("resume=auto: resuming from %s", checkpoint)
                return str(checkpoint)
            logger.warning("resume=auto: skipping %s, which changed since it was saved: %s", checkpoint, problem)
        logger.info("resume=auto: no complete, intact checkpoint in %s, starting from scratch", output_dir)
        return None
    if not Path(resume_from_checkpoint).is_dir():
        raise CheckpointError(f"{resume_from_checkpoint}: no such checkpoint folder (--resume_from_checkpoint)")
    problem = checkpoint_problem(resume_from_checkpoint)
    if problem:
        raise CheckpointError(f"{resume_from_checkpoint} changed since it was saved: {problem}. Resume from an "
                              "earlier checkpoint, or with --resume_from_checkpoint auto (the newest one intact)")
    return resume_from_checkpoint


def save_final_model(trainer, tokenizer, output_dir: str, stage: str) -> None:
    """Model, tokenizer (with the chat template) and generation_config in one folder that
    `AutoModelForCausalLM.from_pretrained` + `AutoTokenizer.from_pretrained` load with no project code, plus
    trainer_state.json (the logged curves), and mini_qwen_stage.json saying which stage made it (the evaluator
    picks raw-text or chat mode from it). Under DeepSpeed ZeRO-1/2 the weights saved are the fp32 master."""
    if trainer.is_deepspeed_enabled and master_weights_into_module(trainer):
        if trainer.is_world_process_zero():
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(output_dir)
    else:
        trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
        trainer.state.save_to_json(str(Path(output_dir) / "trainer_state.json"))
        (Path(output_dir) / STAGE_FILE).write_text(json.dumps({"stage": stage}) + "\n")
        logger.info("final model, tokenizer and generation_config saved to %s", output_dir)


def master_weights_into_module(trainer) -> bool:
    """Under DeepSpeed with bf16 the module holds bf16 copies and the optimizer the fp32 master, partitioned over
    the ranks. Trainer.save_model would write the bf16 module: at DPO's lr 5e-7 most updates are below bf16's
    resolution, so the saved model would barely differ from its start (measured: 1.6% of the weights moved, against
    100% in the master), and its clone of the state dict unties lm_head from the embeddings (+311 MB at 1B). After
    the last step the optimizer is done with, so every rank (the gather is a collective) puts the whole fp32 master
    back into the module, in place, which keeps the tied weights tied; rank 0 then saves it as any model. Frozen
    parameters (LoRA's base) have no master and stay as they are; ZeRO-3 keeps its own save. Returns False where
    nothing was done."""
    from deepspeed.utils import safe_get_full_fp32_param

    if trainer.accelerator.state.deepspeed_plugin.zero_stage not in (1, 2):
        return False
    model = trainer.accelerator.unwrap_model(trainer.model)
    if getattr(model, "peft_config", None):
        return False  # the adapters are what is saved; Trainer.save_model writes them
    for param in model.parameters():
        master = safe_get_full_fp32_param(param)
        if master is not None:
            param.data = master.to(param.device)
    return True
