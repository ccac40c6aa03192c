"""What every stage does around `trainer.train()`: the callbacks, resume, the anomaly stop, the final save."""

import json
import logging
from pathlib import Path

from transformers.trainer_callback import TrainerState

from utils.callbacks import (AnomalyGuard, CheckpointCompleteCallback, LossPlotCallback, PrecisionCallback,
                             SigtermCallback, ThroughputCallback)
from utils.checkpoint import check_resumable, resolve_resume, save_final_model
from utils.compat import require
from utils.crash_safety import CrashSafetyArguments
from utils.errors import ConfigError
from utils.report import write_stage_report
from utils.throughput import ThroughputArguments

logger = logging.getLogger("mini_qwen")


def stage_callbacks(crash_args: CrashSafetyArguments, plot_keys=("loss", "grad_norm", "learning_rate"),
                    throughput_args: ThroughputArguments | None = None):
    return [CheckpointCompleteCallback(), LossPlotCallback(plot_keys), SigtermCallback(), AnomalyGuard(crash_args),
            ThroughputCallback((throughput_args or ThroughputArguments()).peak_tflops), PrecisionCallback()]


def _callback(trainer, kind):
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, kind))


def before_training(trainer) -> str | None:
    """Log how the run is launched and return the checkpoint `--resume_from_checkpoint` names (`auto`: the newest
    complete one that is intact), after checking it can be resumed with this batch geometry."""
    args = trainer.args
    weights = str(next(trainer.model.parameters()).dtype).replace("torch.", "")
    precision = f"{weights} weights, " + ("bf16 autocast" if args.bf16 else "fp16 autocast" if args.fp16 else
                                          "no autocast")
    if trainer.is_deepspeed_enabled:
        zero_stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
        mixed = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
        # The dtypes DeepSpeed really holds are logged after the first step (PrecisionCallback): it casts later.
        logger.info("launch: DeepSpeed ZeRO-%d on %d process(es), %s (DeepSpeed keeps the module in %s, an fp32 "
                    "master in the optimizer, and saves the master)", zero_stage, args.world_size, mixed, mixed)
    else:
        optimizer, _ = trainer.optimizer_cls_and_kwargs or trainer.get_optimizer_cls_and_kwargs(args, trainer.model)
        logger.info("launch: %d process(es), no DeepSpeed, %s, optimizer %s", args.world_size, precision,
                    optimizer.__name__)
    # The throughput numbers must be in `logs` before the reporting integrations (tensorboard, wandb), which the
    # Trainer puts ahead of the stage's callbacks, read them in the same on_log call.
    trainer.callback_handler.callbacks.sort(key=lambda callback: not isinstance(callback, ThroughputCallback))
    decay_steps_from_fraction(trainer)
    checkpoint = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if checkpoint:
        check_resumable(checkpoint, args, trainer.is_deepspeed_enabled)
    return checkpoint


def decay_steps_from_fraction(trainer) -> None:
    """`lr_scheduler_type: warmup_stable_decay` with `lr_scheduler_kwargs: {decay_fraction: F}`: the last F of the
    run's steps decay (transformers' WSD schedule takes a step count, which a recipe cannot know before the data is
    prepared). Warmup is `warmup_steps`, the rest stays at the peak; `min_lr_ratio` is where the decay ends."""
    args = trainer.args
    kwargs = dict(args.lr_scheduler_kwargs or {})
    if "decay_fraction" not in kwargs:
        return
    if args.lr_scheduler_type != "warmup_stable_decay":
        raise ConfigError(f"lr_scheduler_kwargs decay_fraction is for lr_scheduler_type warmup_stable_decay, not "
                          f"{args.lr_scheduler_type}")
    fraction = float(kwargs.pop("decay_fraction"))
    if not 0 < fraction <= 1:
        raise ConfigError(f"lr_scheduler_kwargs decay_fraction {fraction}: must be in (0, 1]")
    kwargs["num_decay_steps"] = max(1, round(fraction * _last_step(trainer)))
    args.lr_scheduler_kwargs = kwargs
    logger.info("warmup-stable-decay: the last %d steps decay (%g of the run)", kwargs["num_decay_steps"], fraction)


def load_if_finished(trainer, checkpoint: str | None) -> bool:
    """True, with the checkpoint's weights and state loaded, when it is already at the run's last step: the stage
    then trains nothing and only writes the final model and report. (The Trainer would train one more step whenever
    that step does not end an epoch: it resumes the epoch's loop and checks max_steps only after a step; a 2-rank
    run resumed at 10 of 10 logged step 11/10.)"""
    if not checkpoint:
        return False
    state_file = Path(checkpoint) / "trainer_state.json"
    done = json.loads(state_file.read_text())["global_step"] if state_file.is_file() else 0
    if done < _last_step(trainer):
        return False
    logger.info("%s is at step %d, the last of this run: nothing to train; the final model and report are written "
                "from it", checkpoint, done)
    _load_finished(trainer, checkpoint)
    return True


def _last_step(trainer) -> int:
    """The run's max_steps as the Trainer computes it (from the epochs and the data when max_steps is not set)."""
    if trainer.args.max_steps > 0:
        return trainer.args.max_steps
    return trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]


def _load_finished(trainer, resume_from_checkpoint: str) -> None:
    """What the final save needs from a finished run's checkpoint: the weights and the state (its log history goes
    into the final trainer_state.json and the report)."""
    trainer.state = TrainerState.load_from_json(str(Path(resume_from_checkpoint) / "trainer_state.json"))
    if trainer.is_deepspeed_enabled:
        # The checkpoint's model.safetensors holds DeepSpeed's module (bf16 in a bf16 run); the final model is the
        # fp32 master (save_final_model), which ZeRO's own tool rebuilds on the CPU from the optimizer state.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        trainer.model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(resume_from_checkpoint))
    else:
        require("trainer_load_from_checkpoint")  # Trainer-internal: probed (utils.compat)
        trainer._load_from_checkpoint(resume_from_checkpoint)


def stop_if_interrupted(trainer, stage: str) -> None:
    """A run the anomaly guard or SIGTERM stopped exits non-zero saying why, before any final save: the last
    checkpoint is what to resume from (the weights in memory may have taken the bad step)."""
    guard = _callback(trainer, AnomalyGuard)
    if guard.tripped or _callback(trainer, SigtermCallback).received:
        end_processes(trainer)
    if guard.tripped:
        raise SystemExit(f"{stage}: training stopped at step {guard.tripped['step']} ({guard.tripped['problem']}); "
                         f"see {trainer.args.output_dir}/anomaly.json for the checkpoint and --skip_samples to resume "
                         "with")
    if _callback(trainer, SigtermCallback).received:
        raise SystemExit(f"{stage}: stopped by SIGTERM at step {trainer.state.global_step} after saving a checkpoint; "
                         "continue with --resume_from_checkpoint auto")


def save_and_report(trainer, tokenizer, stage: str, score_heldout_text: bool = True) -> None:
    """The final model in a folder that loads anywhere (utils.checkpoint.save_final_model), and its report card
    (utils.report, with the held-out bits per byte of a language model; a reward model has none)."""
    save_final_model(trainer, tokenizer, trainer.args.output_dir, stage)
    if trainer.is_world_process_zero():
        model = trainer.model if score_heldout_text else None
        logger.info("report card: %s", write_stage_report(trainer.args.output_dir, stage, trainer.args, model,
                                                          tokenizer))
    end_processes(trainer)


def end_processes(trainer) -> None:
    """Every rank waits for the others, then closes the process group and the trackers. A rank that left the
    script with its gloo/NCCL group still open while rank 0 wrote the report could abort at interpreter exit
    ("terminate called without an active exception"), and the launcher then killed rank 0 mid-write."""
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def write_data_report(training_args, report: dict) -> None:
    """<output_dir>/data_report.json: what preprocessing kept, skipped and why (also printed at the start)."""
    if training_args.process_index == 0:
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(training_args.output_dir) / "data_report.json").write_text(
            json.dumps(report, indent=2, ensure_ascii=False) + "\n")
