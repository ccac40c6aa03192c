"""What every stage does around `trainer.train()`: the callbacks, resume, the anomaly stop, the final save."""

from utils.callbacks import LossPlotCallback, SigtermCallback
from utils.checkpoint import CheckpointCompleteCallback, resolve_resume, save_final_model
from utils.crash_safety import AnomalyGuard, CrashSafetyArguments, SkipSamplesMixin, parse_ranges


def with_skip_samples(trainer_class, crash_args: CrashSafetyArguments):
    """`trainer_class` that gives the --skip_samples ranges no gradient."""
    return type(trainer_class.__name__, (SkipSamplesMixin, trainer_class),
                {"skip_ranges": parse_ranges(crash_args.skip_samples)})


def stage_callbacks(crash_args: CrashSafetyArguments, plot_keys=("loss", "grad_norm", "learning_rate")):
    guard = AnomalyGuard(crash_args)
    return [CheckpointCompleteCallback(), LossPlotCallback(plot_keys), SigtermCallback(), guard], guard


def train_and_save(trainer, tokenizer, guard: AnomalyGuard, stage: str) -> None:
    args = trainer.args
    trainer.train(resume_from_checkpoint=resolve_resume(args.resume_from_checkpoint, args.output_dir))
    if guard.tripped:
        # The weights in memory took the bad step: they are not saved.
        raise SystemExit(f"{stage}: training stopped at step {guard.tripped['step']} ({guard.tripped['problem']}); "
                         f"see {args.output_dir}/anomaly.json for the checkpoint and --skip_samples to resume with")
    save_final_model(trainer, tokenizer, args.output_dir, stage)
