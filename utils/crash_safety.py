"""Crash safety (seed 002): stop on a NaN/inf loss or a loss spike, say where to resume, and skip the bad data.

When a logged loss is not finite, or exceeds `anomaly_factor` x the median of the last `anomaly_window` logged
losses, AnomalyGuard stops training before anything else is saved, names the last good (complete) checkpoint and
the range of training-order sample positions consumed since it, and writes both to <output_dir>/anomaly.json.
Resuming with `--resume_from_checkpoint auto --skip_samples A:B` replays the same data order but gives the samples
in [A, B) no gradient, so a bad shard is stepped over without changing which data every other step sees.
"""

import logging
from dataclasses import dataclass, field

from utils.errors import ConfigError

logger = logging.getLogger("mini_qwen")


@dataclass
class CrashSafetyArguments:
    anomaly_factor: float = field(default=3.0, metadata={
        "help": "stop when a logged loss exceeds this times the running median, if that is positive (0 disables; "
                "NaN/inf always stop)"})
    anomaly_window: int = field(default=20, metadata={"help": "logged losses in the running median"})
    anomaly_min_history: int = field(default=5, metadata={"help": "logged losses needed before spikes are judged"})
    skip_samples: list[str] = field(default_factory=list, metadata={
        "help": "training-order sample ranges A:B to give no gradient, e.g. the range anomaly.json names"})


def global_batch(args) -> int:
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def parse_ranges(specs: list[str]) -> list[tuple[int, int]]:
    ranges = []
    for spec in specs:
        try:
            start, end = (int(part) for part in spec.split(":"))
        except ValueError:
            raise ConfigError(f"--skip_samples: expected START:END, got {spec!r}") from None
        if not 0 <= start < end:
            raise ConfigError(f"--skip_samples: empty or negative range {spec!r}")
        ranges.append((start, end))
    return ranges


class SkipSamplesMixin:
    """Put before a Trainer class, and give it `skip_samples=crash_args.skip_samples`: micro-batches whose
    training-order positions meet a skip range contribute a zero loss (still backpropagated, so DDP/DeepSpeed ranks
    and gradient accumulation stay in step)."""

    def __init__(self, *args, skip_samples: list[str] = (), **kwargs):
        self.skip_ranges = parse_ranges(skip_samples)
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.skip_ranges and model.training and not return_outputs:
            step = self.state.global_step
            if getattr(self, "_skip_step", None) != step:
                self._skip_step, self._micro_batch = step, 0
            width = self.args.per_device_train_batch_size * self.args.world_size
            first = (step * self.args.gradient_accumulation_steps + self._micro_batch) * width
            self._micro_batch += 1
            if any(start < first + width and first < end for start, end in self.skip_ranges):
                logger.warning("skipping samples %d-%d (--skip_samples)", first, first + width)
                return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
